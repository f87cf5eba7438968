# -*- test-case-name: tests.test_mesh -*-
"""One link between two nodes: framing, handshake, heartbeats, and its lifecycle.

The lifecycle is a state machine (Automat)::

    handshaking --hello--> open --lost--> closed
         |                   |
         +------lost---------+

Entering ``open`` installs :meth:`_dispatch` as the handler of every frame
but a LinkHello, so the frames of an open link (one per event that crosses
it) skip the machine's per-input work; the machine still decides what a
frame means before the link opens, and what a second hello means after.

Both sides send a LinkHello, the dialer first.  The mesh checks it (cluster,
version, not ourselves) before the link opens; anything else before the
hello, a malformed frame, an oversize frame or a second hello is a protocol
violation: the link says Goodbye and closes.  Heartbeats keep an idle link
alive and carry acknowledgements; a link that hears nothing for
``heartbeat_timeout`` seconds is aborted.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING, Optional

from automat import MethodicalMachine
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meshd.mesh.framing import Deframer, FrameTooLarge, frame
from meshd.mesh.tls import LinkTLSFactory
from meshd.session import TurnBacklog
from meshd.mesh.wire import (
    Goodbye,
    GoodbyeCode,
    Heartbeat,
    Interest,
    LinkHello,
    Malformed,
    Peers,
    Routed,
    decode,
    encode_goodbye,
    encode_heartbeat,
    encode_hello,
)

if TYPE_CHECKING:
    from meshd.mesh.service import Mesh, PeerState

#: Send an acknowledgement at least every this many routed frames or bytes received.
ACK_EVERY = 512
ACK_EVERY_BYTES = 256 * 1024


@implementer(IPushProducer)
class Link(TurnBacklog, Protocol):
    log = Logger()
    _machine = MethodicalMachine()

    def __init__(self, mesh: "Mesh", dialed: bool, address: Optional[str] = None) -> None:
        self.mesh = mesh
        self.dialed = dialed
        self.address = address  # what we dialed, for dialed links
        self.peer: "Optional[PeerState]" = None
        self.remote: Optional[LinkHello] = None
        self.hello_sent = False
        self.closing = False
        self.farewell: Optional[Goodbye] = None  # the peer's Goodbye, if it said one
        #: Fires when a dialed link opens, fails if it closes first (see LinkEndpoint).
        self.opened: Deferred[Link] = Deferred()
        self._deframer = Deframer(mesh.settings.max_frame_size)
        self._last_received = self._last_sent = mesh.clock.seconds()
        self._unacked = 0
        self._unacked_bytes = 0
        self._ticker: Optional[LoopingCall] = None
        #: Random per dialed link; both ends use the dialer's to break ties.
        self.nonce = random.getrandbits(63) + 1 if dialed else 0
        self.clock = mesh.clock
        self._counting = False  # the transport's buffer has stayed full past a reactor turn
        self._arming = None
        self._backlog = 0  # written since then (see TurnBacklog)
        self._pending: list[bytes] = []  # written at the end of the reactor turn
        #: What a ClientService sees of this link once it opened (LinkEndpoint).
        self.handle: Optional[Protocol] = None
        #: Where frames other than a LinkHello go: the machine, until the link opens.
        self._on_frame = self._frame

    def __repr__(self) -> str:
        who = self.remote.node if self.remote else self.address or "?"
        return f"<Link {'to' if self.dialed else 'from'} {who}>"

    # -- states -------------------------------------------------------------------

    @_machine.state(initial=True)
    def _handshaking(self) -> None:
        "Waiting for the other side's LinkHello."

    @_machine.state()
    def _open(self) -> None:
        "Linked: routed frames, interest, peers and heartbeats flow both ways."

    @_machine.state()
    def _closed(self) -> None:
        "The connection is gone."

    # -- inputs -------------------------------------------------------------------

    @_machine.input()
    def _hello(self, message: LinkHello) -> None:
        "An acceptable LinkHello arrived."

    @_machine.input()
    def _frame(self, message) -> None:
        "Any frame other than a LinkHello arrived."

    @_machine.input()
    def _lost(self, reason: Failure) -> None:
        "The connection was lost."

    # -- outputs ------------------------------------------------------------------

    @_machine.output()
    def _become_open(self, message: LinkHello) -> None:
        self.remote = message
        if not self.dialed:
            self.send_hello()
        self._on_frame = self._dispatch
        self.mesh.link_opened(self, message)
        if not self.closing:
            self.opened.callback(self)

    @_machine.output()
    def _before_hello(self, message) -> None:
        if isinstance(message, Goodbye):  # the other side refused this link, and says why
            self.farewell = message
            self._close()
            self.mesh.refused_by_peer(self, message)
        else:
            self.violation(f"{type(message).__name__} before LinkHello")

    @_machine.output()
    def _handle(self, message) -> None:
        self._dispatch(message)

    def _dispatch(self, message) -> None:
        """Act on a frame of an open link."""
        if isinstance(message, Routed):
            self.mesh.routed_received(self, message)
            self._unacked += 1
            self._unacked_bytes += len(message.frame)
            if self._unacked >= ACK_EVERY or self._unacked_bytes >= ACK_EVERY_BYTES:
                self.send_heartbeat()
        elif isinstance(message, Heartbeat):
            if self.peer is not None:
                self.peer.outbox.ack(message.acked)
        elif isinstance(message, Interest):
            self.mesh.interest_received(self, message)
        elif isinstance(message, Peers):
            self.mesh.learn(message.peers)
        elif isinstance(message, Goodbye):
            self.farewell = message
            self._close()
        else:
            self.violation(f"unexpected {type(message).__name__}")

    @_machine.output()
    def _refused(self, reason: Failure) -> None:
        if not self.closing:
            self.mesh.link_refused(self, reason)
        self._not_opened(reason)

    @_machine.output()
    def _went_down(self, reason: Failure) -> None:
        self._not_opened(reason)  # closed as a duplicate before it was used
        self.mesh.link_lost(self, reason)

    def _not_opened(self, reason: Failure) -> None:
        if self.dialed and not self.opened.called:
            self.opened.errback(reason)

    @_machine.output()
    def _ignore(self, message) -> None:
        pass

    _handshaking.upon(_hello, enter=_open, outputs=[_become_open])
    _handshaking.upon(_frame, enter=_handshaking, outputs=[_before_hello])
    _handshaking.upon(_lost, enter=_closed, outputs=[_refused])
    _open.upon(_hello, enter=_open, outputs=[_before_hello])
    _open.upon(_frame, enter=_open, outputs=[_handle])
    _open.upon(_lost, enter=_closed, outputs=[_went_down])
    _closed.upon(_hello, enter=_closed, outputs=[_ignore])
    _closed.upon(_frame, enter=_closed, outputs=[_ignore])

    # -- Twisted ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.mesh.links.add(self)
        # Frames are small and latency matters: no Nagle delay.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self.transport.registerProducer(self, True)
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = self.clock
        self._ticker.start(self.mesh.settings.heartbeat_interval, now=False)
        if self.dialed:
            self.send_hello()

    def dataReceived(self, data: bytes) -> None:
        self._last_received = self.clock.seconds()
        try:
            frames = self._deframer.feed(data)
        except FrameTooLarge as e:
            self.violation(str(e))
            return
        for raw in frames:
            if self.closing:
                return
            try:
                message = decode(raw, self.peer.node if self.peer is not None else None)
            except Malformed as e:
                self.violation(f"malformed frame: {e}")
                return
            if isinstance(message, LinkHello):
                refusal = self.remote is None and self.mesh.check_hello(self, message)
                if refusal:
                    code, reason = refusal
                    self.goodbye(code, reason)
                    self.mesh.note_refusal(self, reason)
                    return
                self._hello(message)
            else:
                self._on_frame(message)

    def connectionLost(self, reason: Failure = None) -> None:
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self.mesh.links.discard(self)
        self._lost(reason)
        if self.handle is not None:
            self.handle.connectionLost(reason)

    # -- sending ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write an already framed frame; close a peer that stopped reading."""
        if self.closing:
            return
        if self._counting:
            self._backlog += len(data)
            if self._backlog > self.mesh.settings.queue_max_bytes:
                self.log.warn("{link}: the peer does not read; closing", link=self)
                self.closing = True  # no Goodbye: it would not be read either
                self.transport.unregisterProducer()
                self.transport.abortConnection()
                return
        pending = self._pending
        pending.append(data)
        if len(pending) == 1:
            self.mesh.flusher.mark(self)

    def flush(self) -> None:
        """Write this turn's frames in one piece: one TLS write, one send() (LinkTLSProtocol)."""
        pending = self._pending
        if pending and self.transport is not None:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self.transport.write(data)
            self._last_sent = self.clock.seconds()

    @property
    def dial_nonce(self) -> int:
        """The dialer's nonce of this link, the same number at both ends."""
        if self.dialed:
            return self.nonce
        return self.remote.nonce if self.remote is not None else 0

    def send(self, payload: bytes) -> None:
        self.write(frame(payload, self.mesh.settings.max_frame_size))

    def send_hello(self) -> None:
        self.send(encode_hello(replace(self.mesh.hello(), nonce=self.nonce)))
        self.hello_sent = True
        self.mesh.introduce(self)

    def send_heartbeat(self) -> None:
        self._unacked = self._unacked_bytes = 0
        acked = self.peer.received_seq if self.peer is not None else 0
        self.send(encode_heartbeat(acked))

    def goodbye(self, code: int, reason: str) -> None:
        """Say why, then close."""
        if self.closing:
            return
        self.send(encode_goodbye(code, reason))
        self._close()

    def _close(self) -> None:
        self.flush()
        self.closing = True
        # TLS only shuts down once no producer is registered.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def violation(self, reason: str) -> None:
        self.log.warn("Closing {link}: protocol violation: {reason}", link=self, reason=reason)
        self.mesh.note_refusal(self, reason)
        self.goodbye(GoodbyeCode.ProtocolViolation, reason)

    def _tick(self) -> None:
        now = self.clock.seconds()
        settings = self.mesh.settings
        if now - self._last_received > settings.heartbeat_timeout:
            self.log.warn(
                "{link}: nothing heard for {seconds:.1f}s; closing", link=self, seconds=now - self._last_received
            )
            self.goodbye(GoodbyeCode.HeartbeatTimeout, "heartbeat timeout")
            self.transport.abortConnection()
        elif self.remote is not None and (now - self._last_sent >= settings.heartbeat_interval or self._unacked):
            self.send_heartbeat()


@implementer(IStreamClientEndpoint)
class LinkEndpoint:
    """An endpoint whose connections are links that completed their handshake.

    ``ClientService`` dials through it, so a connection that fails before the
    LinkHello exchange (TLS refused, wrong cluster...) counts as a failed
    attempt and backs off, and only an open link counts as connected.
    """

    def __init__(self, mesh: "Mesh", address: str, endpoint: IStreamClientEndpoint, tls) -> None:
        self.mesh = mesh
        self.address = address
        self.endpoint = endpoint  # TCP; TLS (``tls``, the client options) goes on top here
        self.tls = tls

    def connect(self, factory) -> Deferred:
        links: list[Link] = []
        connecting = self.endpoint.connect(
            LinkTLSFactory(self.tls, True, LinkFactory(self.mesh, dialed=True, address=self.address))
        ).addCallback(lambda tls: tls.wrappedProtocol)

        def cancel(_: Deferred) -> None:
            connecting.cancel()
            if links and links[0].transport is not None:
                links[0].transport.abortConnection()

        result: Deferred = Deferred(cancel)

        def connected(link: Link) -> None:
            links.append(link)
            link.opened.addCallbacks(opened, failed)

        def opened(link: Link) -> None:
            handle = factory.buildProtocol(link.transport.getPeer())
            handle.makeConnection(link.transport)
            link.handle = handle
            result.callback(handle)

        def failed(failure: Failure) -> None:
            if not result.called:
                result.errback(failure)

        connecting.addCallbacks(connected, failed)
        return result


class LinkFactory(Factory):
    """Makes links for the mesh listener (``dialed=False``) or for one dialer."""

    noisy = False

    def __init__(self, mesh: "Mesh", dialed: bool, address: Optional[str] = None) -> None:
        self.mesh = mesh
        self.dialed = dialed
        self.address = address

    def buildProtocol(self, addr) -> Link:
        return Link(self.mesh, self.dialed, self.address)
