# -*- test-case-name: tests.test_link tests.test_mesh_trust -*-
"""One link between two nodes: framing, handshake, heartbeats, and its lifecycle.

Both sides send a LinkHello, the dialer first.  The mesh checks it (cluster,
version, the node id its certificate names, not ourselves) before the link
opens; anything else before the hello, a malformed frame, an oversize frame
or a second hello is a protocol violation: the link says Goodbye and closes.
A connection whose peer has not completed its LinkHello ``hello_timeout``
seconds after the connection was made (TLS handshake included) is closed,
however many bytes trickle in meanwhile.  Heartbeats keep an idle link
alive and carry acknowledgements; a link that hears nothing for
``heartbeat_timeout`` seconds says Goodbye and is aborted, and one whose
peer stops reading (``queue_max_bytes`` written while its transport stays
full) is aborted without a word, which would not be read either.

The lifecycle is a state machine (Automat's ``TypeMachineBuilder``) that owns
the link's state; :attr:`Link.closing`, :attr:`Link.is_open` and
:attr:`Link.hello_sent` are read from it.  Its transitions::

    state            input          next            what the link does
    ---------------  -------------  --------------  -----------------------------------------------
    connecting       accepted       awaiting_hello  nothing: the dialer speaks first
    connecting       dialed         hello_sent      send LinkHello, then Interest and Peers frames
    awaiting_hello,  received       (same)          read the first frame: it makes one of the
      hello_sent                                    inputs hello, refuse, violation or farewell
    awaiting_hello,  hello          open            (accepted: send LinkHello...); the mesh links
      hello_sent                                    the peer or closes a duplicate; fire
                                                    when_opened(); handle the rest of the read
    awaiting_hello,  refuse         closing         Goodbye saying why, close; counted
      hello_sent
    awaiting_hello,  farewell       closing         close; the peer refused us, and said why
      hello_sent
    open             (a read)       -               handled by plain code, not an input (below);
                                                    a violation (malformed, a second LinkHello,
                                                    what the mesh refuses) or a Goodbye becomes
                                                    that input and ends the read
    open             tick           open            a Heartbeat if nothing went out since the last
                                                    tick, or if acknowledgements are due
    handshaking*     tick           (same)          nothing
    open             late           open            nothing (opening cancels the deadline)
    open             farewell       closing         close (the peer's Goodbye is kept)
    handshaking*,    violation      closing         Goodbye ProtocolViolation, close; counted
      open
    handshaking*,    goodbye        closing         Goodbye with the caller's reason, close
      open
    handshaking*,    silent         closing         Goodbye HeartbeatTimeout, close, abort
      open
    handshaking*     late           closing         Goodbye HeartbeatTimeout ("no LinkHello"), close,
                                                    abort; logged (and counted once lost)
    handshaking*,    overflowed     closing         abort, without a Goodbye
      open
    handshaking*,    abort          closing         abort: the dialer stopped (its ClientService
      open                                          cancelled when_opened())
    closing          silent         closing         abort: the peer never finished closing
    handshaking*     lost           closed          "closed before linking": logged, counted;
                                                    when_opened() fails
    open, closing    lost           closed          when_opened() fails if pending; the mesh
                                                    forgets the link, queues and redials
    closing, closed  anything else  (same)          nothing: what still arrives is ignored

    * handshaking: awaiting_hello and hello_sent

An input made while the machine handles another (a frame's handling that
closes its own link, for instance) runs right after it, before the outer
call returns: Automat queues it.

Until the link opens, every read is one input (``received``, with every
whole frame of the read).  Once it is open, reads skip the machine: they
carry the routed frames, one per event that crosses the link, and Automat
(25.4) finds a transition by scanning its whole table, comparing states
with a Python-level ``__eq__``: about 0.2 us per transition passed, 2 to
11 us per input for this table depending on its (hash) order, against
well under 1 us for the plain loop.  The machine's state still decides:
:meth:`Link.dataReceived` reads it, as :attr:`Link.closing` does.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Optional, Protocol as TypingProtocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.address import UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meshd._io import Outlet
from meshd.mesh.framing import Deframer, FrameTooLarge, frame
from meshd.mesh.wire import (
    Answer,
    Goodbye,
    GoodbyeCode,
    Heartbeat,
    Interest,
    LinkHello,
    Malformed,
    Peers,
    Query,
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

# The machine's states, by name (what Link.state reads).
CONNECTING = "connecting"
AWAITING_HELLO = "awaiting_hello"
HELLO_SENT = "hello_sent"
OPEN = "open"
CLOSING = "closing"
CLOSED = "closed"

_SENDING = (HELLO_SENT, OPEN)  # states in which the link writes what it is given
_ENDED = (CLOSING, CLOSED)


class Violation(Exception):
    """A peer broke the mesh protocol; the message says how."""


class _Inputs(TypingProtocol):
    """What happens to a link: the inputs of its state machine."""

    def accepted(self) -> None:
        "The listener accepted this connection."

    def dialed(self) -> None:
        "This node's dial connected."

    def received(self, frames: list[bytes]) -> None:
        "The whole frames of one read."

    def hello(self, message: LinkHello, rest: list[bytes]) -> None:
        "The peer's LinkHello is acceptable; ``rest``: the frames after it in its read."

    def refuse(self, code: int, reason: str) -> None:
        "The mesh refuses the peer's LinkHello."

    def violation(self, reason: str) -> None:
        "The peer broke the protocol."

    def farewell(self, message: Goodbye) -> None:
        "The peer said Goodbye."

    def goodbye(self, code: int, reason: str) -> None:
        "This node closes the link, saying why."

    def abort(self) -> None:
        "Drop the connection now, without a word."

    def overflowed(self) -> None:
        "The peer stopped reading: ``queue_max_bytes`` was written while the transport stayed full."

    def silent(self) -> None:
        "Nothing was heard for ``heartbeat_timeout`` seconds."

    def late(self) -> None:
        "``hello_timeout`` seconds passed since the connection was made, and the link is not open."

    def tick(self) -> None:
        "A heartbeat interval passed."

    def lost(self, reason: Failure) -> None:
        "The connection is gone."


class Link(Protocol):
    """One connection with another node, dialed by this node or accepted by its listener."""

    log = Logger()
    _machine: _Inputs
    outlet: Outlet

    def __init__(self, mesh: "Mesh", dialed: bool, address: Optional[str] = None) -> None:
        self.mesh = mesh
        self.dialed = dialed
        self.address = address  # what we dialed, for dialed links
        self.peer: "Optional[PeerState]" = None
        self.remote: Optional[LinkHello] = None
        self.farewell: Optional[Goodbye] = None  # the peer's Goodbye, if it said one
        self.clock = mesh.clock
        #: Random per dialed link; both ends use the dialer's to break ties.
        self.nonce = random.getrandbits(63) + 1 if dialed else 0
        self._deframer = Deframer(mesh.settings.max_frame_size)
        self._last_received = self.clock.seconds()
        self._unacked = 0
        self._unacked_bytes = 0
        #: The link's last measured round-trip time in seconds (a Heartbeat's ping and its pong), if any.
        self.rtt: Optional[float] = None
        self._ticker: Optional[LoopingCall] = None
        self._hello_deadline = None  # the delayed call of the ``late`` input, until the link opens
        self._waiters: list[Deferred[Link]] = []  # when_opened()
        #: The machine's state; only the machine writes it (see _on).
        self._state = CONNECTING
        self._machine = _LinkMachine(self)

    def __repr__(self) -> str:
        who = self.remote.node if self.remote else self.address or "?"
        return f"<Link {'to' if self.dialed else 'from'} {who} {self._state}>"

    def log_fields(self) -> dict[str, str]:
        """Fields naming the other end in log events: ``address`` (``HOST:PORT``: dialed, or the
        connection's source), ``node`` (its id, or ``""`` before its LinkHello) and ``peer``, both in
        words (``node ID at HOST:PORT``)."""
        address = self.address
        if not address:
            try:
                where = self.transport.getPeer()
                address = f"{where.host}:{where.port}"
            except Exception:
                address = "?"
        node = str(self.remote.node) if self.remote is not None else ""
        peer = f"node {node} at {address}" if node else f"{address} (node not known yet)"
        return {"peer": peer, "address": address, "node": node}

    # -- what the machine says ------------------------------------------------------

    @property
    def state(self) -> str:
        """The name of the machine's state (see the module)."""
        return self._state

    @property
    def local(self) -> bool:
        """Whether the link runs over a Unix socket: with a worker of this host (see meshd.mesh.local)."""
        transport = self.transport
        return transport is not None and isinstance(transport.getHost(), UNIXAddress)

    @property
    def is_open(self) -> bool:
        """LinkHellos exchanged and accepted; not closing."""
        return self._state == OPEN

    @property
    def closing(self) -> bool:
        """This node closed the link or is closing it, or the connection is gone."""
        return self._state in _ENDED

    @property
    def hello_sent(self) -> bool:
        """This node's LinkHello (and the interests of that moment) went out, and the link is not closing."""
        return self._state in _SENDING

    def when_opened(self) -> Deferred["Link"]:
        """Fires with this link once it opens (and the mesh keeps it); fails if the connection ends first.

        Cancelling it aborts the link: a dialer's ``ClientService`` that
        stops while the handshake is under way.
        """
        if self._state == OPEN:
            return succeed(self)
        if self._state in _ENDED:
            return fail(ConnectionDone("the link closed before it opened"))
        waiter: Deferred[Link] = Deferred(self._cancel_waiter)
        self._waiters.append(waiter)
        return waiter

    def _cancel_waiter(self, waiter: Deferred) -> None:
        self._waiters.remove(waiter)
        self._machine.abort()

    # -- Twisted --------------------------------------------------------------------

    def connectionMade(self) -> None:
        mesh = self.mesh
        mesh.links.add(self)
        # Frames are small and latency matters: no Nagle delay.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self.outlet = Outlet(
            self.transport, mesh.turn, limit=mesh.settings.queue_max_bytes, on_overflow=self._machine.overflowed
        )
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = self.clock
        self._ticker.start(mesh.settings.heartbeat_interval, now=False)
        self._hello_deadline = self.clock.callLater(mesh.settings.hello_timeout, self._machine.late)
        if self.dialed:
            self._machine.dialed()
        else:
            self._machine.accepted()

    def dataReceived(self, data: bytes) -> None:
        self._last_received = self.clock.seconds()
        try:
            frames = self._deframer.feed(data)
        except FrameTooLarge as e:
            self._machine.violation(str(e))
            return
        if not frames:
            return
        if self._state == OPEN:
            self._dispatch(self._machine, frames)  # the hot path: see the module
        else:
            self._machine.received(frames)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._cancel_hello_deadline()
        self.mesh.links.discard(self)
        self.outlet.discard()
        self.outlet.transport = None
        self._machine.lost(reason)

    #: :meth:`connectionLost` under a name that ``ClientService``'s proxy
    #: passes on without telling its own machine (see :class:`DialEndpoint`).
    disconnected = connectionLost

    # -- what the mesh calls ----------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue an already framed frame for the end of the turn; nothing once the link is closing."""
        if self._state in _SENDING:
            self.outlet.write(data)

    def send(self, payload: bytes) -> None:
        self.write(frame(payload, self.mesh.settings.max_frame_size))

    def send_heartbeat(self, ping: bool = False, pong: int = 0) -> None:
        """Send a Heartbeat acknowledging what was received; with ``ping``, one the peer answers at
        once (the round trip is measured); with ``pong``, the answer to the peer's ping."""
        self._unacked = self._unacked_bytes = 0
        acked = self.peer.received_seq if self.peer is not None else 0
        stamp = max(1, int(self.clock.seconds() * 1_000_000)) if ping else 0
        self.send(encode_heartbeat(acked, stamp, pong))

    def _heard_heartbeat(self, message: Heartbeat) -> None:
        if self.peer is not None:
            self.peer.outbox.ack(message.acked)
        if message.ping:
            self.send_heartbeat(pong=message.ping)
        if message.pong:
            rtt = self.clock.seconds() - message.pong / 1_000_000
            if rtt >= 0:
                self.rtt = rtt
                self.mesh.metrics.mesh_rtt.observe(rtt)

    def goodbye(self, code: int, reason: str) -> None:
        """Say why, then close (nothing if the link is closing already)."""
        self._machine.goodbye(code, reason)

    @property
    def dial_nonce(self) -> int:
        """The dialer's nonce of this link, the same number at both ends."""
        if self.dialed:
            return self.nonce
        return self.remote.nonce if self.remote is not None else 0

    # -- what the machine's outputs use ----------------------------------------------------

    def _send_hello(self) -> None:
        self.send(encode_hello(replace(self.mesh.hello(), nonce=self.nonce)))
        self.mesh.introduce(self)

    def _say(self, code: int, reason: str) -> None:
        """Queue a Goodbye (past the check of the state: the link is closing already)."""
        self.outlet.write(frame(encode_goodbye(code, reason), self.mesh.settings.max_frame_size))

    def _close(self) -> None:
        """Write what is queued, then close."""
        self.outlet.flush()
        # TLS only shuts down once no producer is registered.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _abort(self) -> None:
        self.outlet.discard()
        self.transport.unregisterProducer()
        self.transport.abortConnection()

    def _cancel_hello_deadline(self) -> None:
        deadline, self._hello_deadline = self._hello_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _settle_waiters(self, outcome: "Link | Failure") -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    def _tick(self) -> None:
        if self.clock.seconds() - self._last_received > self.mesh.settings.heartbeat_timeout:
            self._machine.silent()
        else:
            self._machine.tick()

    def _dispatch(self, inputs: _Inputs, frames: list[bytes]) -> None:
        """Act on the frames of an open link, in order; stop at a Goodbye or a violation."""
        mesh = self.mesh
        peer = self.peer
        origin = peer.node if peer is not None else None
        for raw in frames:
            if self._state != OPEN:
                return  # what a frame's handling did closed the link (a peer that does not read...)
            try:
                message = decode(raw, origin)
            except Malformed as e:
                inputs.violation(f"malformed frame: {e}")
                return
            kind = type(message)
            try:
                if kind is Routed:
                    mesh.routed_received(self, message)
                    self._unacked += 1
                    self._unacked_bytes += len(message.frame)
                    if self._unacked >= ACK_EVERY or self._unacked_bytes >= ACK_EVERY_BYTES:
                        self.send_heartbeat()
                elif kind is Heartbeat:
                    self._heard_heartbeat(message)
                elif kind is Interest:
                    mesh.interest_received(self, message)
                elif kind is Peers:
                    mesh.learn(message.peers)
                elif kind is Query:
                    mesh.query_received(self, message)
                elif kind is Answer:
                    mesh.answer_received(self, message)
                elif kind is Goodbye:
                    inputs.farewell(message)
                    return
                else:
                    raise Violation("a second LinkHello")
            except Violation as e:
                inputs.violation(str(e))
                return


# -- the machine ---------------------------------------------------------------------

_builder = TypeMachineBuilder(_Inputs, Link)
_connecting = _builder.state(CONNECTING)
_awaiting_hello = _builder.state(AWAITING_HELLO)
_hello_sent = _builder.state(HELLO_SENT)
_open = _builder.state(OPEN)
_closing = _builder.state(CLOSING)
_closed = _builder.state(CLOSED)
_handshaking = (_awaiting_hello, _hello_sent)


def _on(input: Callable[..., None], sources, target=None) -> Callable:
    """Make the decorated function the output of ``input`` in each of ``sources``.

    The machine then enters ``target``, or stays where it is when
    ``target`` is None.  The link's ``_state`` is set before the output
    runs, so that what the output calls sees the state it is entering.
    """

    def register(output: Callable[..., None]) -> Callable[..., None]:
        for source in sources:
            entered = source if target is None else target
            source.upon(input).to(entered)(_entering(entered.name, output))
        return output

    return register


def _entering(name: str, output: Callable[..., None]) -> Callable[..., None]:
    def enter(inputs: _Inputs, link: Link, *args: object) -> None:
        link._state = name
        output(inputs, link, *args)

    enter.__name__ = output.__name__
    return enter


def _nothing(inputs: _Inputs, link: Link, *args: object) -> None:
    pass


@_on(_Inputs.accepted, [_connecting], _awaiting_hello)
def _wait_for_hello(inputs: _Inputs, link: Link) -> None:
    pass  # the dialer speaks first


@_on(_Inputs.dialed, [_connecting], _hello_sent)
def _greet(inputs: _Inputs, link: Link) -> None:
    link._send_hello()


@_on(_Inputs.received, _handshaking)
def _handshake(inputs: _Inputs, link: Link, frames: list[bytes]) -> None:
    try:
        message = decode(frames[0])
    except Malformed as e:
        inputs.violation(f"malformed frame: {e}")
        return
    if isinstance(message, LinkHello):
        refusal = link.mesh.check_hello(link, message)
        if refusal is not None:
            inputs.refuse(*refusal)
        else:
            inputs.hello(message, frames[1:])
    elif isinstance(message, Goodbye):  # the other side refused this link, and says why
        inputs.farewell(message)
    else:
        inputs.violation(f"{type(message).__name__} before LinkHello")


@_on(_Inputs.hello, _handshaking, _open)
def _become_open(inputs: _Inputs, link: Link, message: LinkHello, rest: list[bytes]) -> None:
    link._cancel_hello_deadline()
    link.remote = message
    if not link.dialed:
        link._send_hello()
    if link.mesh.link_opened(link, message):
        link._settle_waiters(link)
        if rest:
            link._dispatch(inputs, rest)
    # else the mesh keeps another link with that node and closed this one


@_on(_Inputs.refuse, _handshaking, _closing)
def _refuse(inputs: _Inputs, link: Link, code: int, reason: str) -> None:
    link._say(code, reason)
    link._close()
    link.mesh.hello_refused(link, code, reason)


@_on(_Inputs.farewell, _handshaking, _closing)
def _refused_by_peer(inputs: _Inputs, link: Link, message: Goodbye) -> None:
    link.farewell = message
    link._close()
    link.mesh.refused_by_peer(link, message)


@_on(_Inputs.tick, [_open])
def _beat(inputs: _Inputs, link: Link) -> None:
    link.send_heartbeat(ping=True)  # keeps an idle link alive, acknowledges, and measures the round trip


@_on(_Inputs.farewell, [_open], _closing)
def _peer_closes(inputs: _Inputs, link: Link, message: Goodbye) -> None:
    link.farewell = message
    link._close()


@_on(_Inputs.violation, [*_handshaking, _open], _closing)
def _violated(inputs: _Inputs, link: Link, reason: str) -> None:
    link.log.warn("Closing the mesh link with {peer}: protocol violation: {reason}", reason=reason,
                  **link.log_fields())
    link.mesh.note_refusal(link, reason)
    link._say(GoodbyeCode.ProtocolViolation, reason)
    link._close()


@_on(_Inputs.goodbye, [*_handshaking, _open], _closing)
def _say_goodbye(inputs: _Inputs, link: Link, code: int, reason: str) -> None:
    link._say(code, reason)
    link._close()


@_on(_Inputs.silent, [*_handshaking, _open], _closing)
def _timed_out(inputs: _Inputs, link: Link) -> None:
    silence = link.clock.seconds() - link._last_received
    link.log.warn("Mesh link with {peer}: nothing heard for {seconds:.1f}s; closing", seconds=silence,
                  **link.log_fields())
    link._say(GoodbyeCode.HeartbeatTimeout, "heartbeat timeout")
    link._close()
    link.transport.abortConnection()


@_on(_Inputs.late, _handshaking, _closing)
def _no_hello(inputs: _Inputs, link: Link) -> None:
    seconds = link.mesh.settings.hello_timeout
    link.log.warn("Mesh link with {peer}: no LinkHello within {seconds}s of connecting; closing", seconds=seconds,
                  **link.log_fields())
    link._say(GoodbyeCode.HeartbeatTimeout, f"no LinkHello within {seconds}s")
    link._close()
    link.transport.abortConnection()


@_on(_Inputs.overflowed, [*_handshaking, _open], _closing)
def _peer_does_not_read(inputs: _Inputs, link: Link) -> None:
    link.log.warn("Mesh link with {peer}: the peer does not read; closing", **link.log_fields())
    link._abort()  # no Goodbye: it would not be read either


@_on(_Inputs.abort, [*_handshaking, _open], _closing)
def _aborted(inputs: _Inputs, link: Link) -> None:
    link._abort()


@_on(_Inputs.silent, [_closing])
def _never_closed(inputs: _Inputs, link: Link) -> None:
    link.transport.abortConnection()


@_on(_Inputs.lost, _handshaking, _closed)
def _not_linked(inputs: _Inputs, link: Link, reason: Failure) -> None:
    link.mesh.link_refused(link, reason)
    link._settle_waiters(reason)


@_on(_Inputs.lost, [_open, _closing], _closed)
def _went_down(inputs: _Inputs, link: Link, reason: Failure) -> None:
    link._settle_waiters(reason)  # one that opened and was closed as a duplicate at once
    link.mesh.link_lost(link, reason)


# What changes nothing: ticks before the link opens, and anything once it is closing.
_on(_Inputs.tick, _handshaking)(_nothing)
_on(_Inputs.late, [_open])(_nothing)
for _input in (
    _Inputs.received, _Inputs.hello, _Inputs.refuse, _Inputs.violation, _Inputs.farewell,
    _Inputs.goodbye, _Inputs.abort, _Inputs.overflowed, _Inputs.tick, _Inputs.late,
):
    _on(_input, [_closing, _closed])(_nothing)
_on(_Inputs.silent, [_closed])(_nothing)

_LinkMachine = _builder.build()


def opening(link: Link) -> Deferred[Link]:
    """``prepareConnection`` for a dialer's ``ClientService``: the connection counts once the link opened.

    ``link`` is the service's proxy of the link, which passes the lookup on.
    """
    return link.when_opened()


# -- dialing ------------------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class DialEndpoint:
    """The endpoint a dialer's ``ClientService`` connects through (``endpoint``: TLS over TCP).

    ``ClientService`` (Twisted 26.10) wraps each protocol in a proxy that
    tells its state machine of every lost connection, and that machine has
    no transition for the loss of a connection whose ``prepareConnection``
    is still pending or has failed: it raises ``NoTransition`` out of
    ``connectionLost``.  A link that closes before it opens has failed its
    attempt already (:func:`opening` fails), so here the loss of such a
    link goes to the link alone; the proxy hears of the loss of links that
    opened.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory) -> Deferred:
        return self._endpoint.connect(_ShieldFactory(factory)).addCallback(lambda shield: shield.proxy)


class _ShieldFactory(Factory):
    noisy = False

    def __init__(self, factory) -> None:
        self._factory = factory

    def buildProtocol(self, addr) -> "Optional[_Shield]":
        proxy = self._factory.buildProtocol(addr)
        return _Shield(proxy) if proxy is not None else None


class _Shield(Protocol):
    """Between the TLS layer and ``ClientService``'s proxy of a dialed link (see :class:`DialEndpoint`)."""

    def __init__(self, proxy) -> None:
        self.proxy = proxy  # forwards what it does not define to the link
        self._opened = False

    def makeConnection(self, transport) -> None:
        self.proxy.makeConnection(transport)
        self.dataReceived = self.proxy.dataReceived  # the link's own, looked up once
        self.proxy.when_opened().addCallbacks(self._was_opened, lambda _: None)

    def _was_opened(self, link: Link) -> None:
        self._opened = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._opened:
            self.proxy.connectionLost(reason)  # the link's, then ClientService's
        else:
            self.proxy.disconnected(reason)  # the link's only


class LinkFactory(Factory):
    """Makes links for the mesh listener (``dialed=False``) or for one dialer."""

    noisy = False

    def __init__(self, mesh: "Mesh", dialed: bool, address: Optional[str] = None) -> None:
        self.mesh = mesh
        self.dialed = dialed
        self.address = address

    def buildProtocol(self, addr) -> Link:
        return Link(self.mesh, self.dialed, self.address)
