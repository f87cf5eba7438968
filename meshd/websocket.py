# -*- test-case-name: tests.test_websocket -*-
"""The WebSocket face of a node: a thin Autobahn protocol that hands messages to the app.

The protocol only speaks WebSocket: it accepts the ``meshd.v1`` subprotocol,
refuses text messages, and passes each binary message to
:meth:`meshd.app.Application.dispatch`.  How bytes are split into messages
and written out is :mod:`meshd._io`'s; everything else lives in the app.

It also holds a client to the node's limits (:mod:`meshd.limits`) where
they are about the connection rather than a request:

- who may connect: per address, in the opening handshake
  (``websocket.max_handshaking``), open (``websocket.max_connections``),
  each refused with an HTTP answer;
- every data frame costs one request of the session's budget
  (``limits.request_rate``, ``limits.request_burst``; none in development
  mode unless configured): a message over it is
  answered with Error ``RateLimited``, and a session that stays over is
  closed with 4004 (WebSocket pings are not counted: a client that does
  not read its pongs is stopped by its outlet, see :class:`meshd._io.Outlet`);
- a message in several frames is gathered in one buffer, at most
  ``limits.max_fragments`` frames (1008) and ``websocket.max_message_size``
  bytes (1009);
- a close frame that breaks the protocol is answered with 1002.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from autobahn.websocket.types import ConnectionDeny

from meshd._io import FastServerFactory, FastServerProtocol, use_exact_timers
from meshd.codec import ErrorCode
from meshd.constants import (
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_RATE_LIMITED,
    CLOSE_UNSUPPORTED_DATA,
    SUBPROTOCOL,
)
from meshd.limits import LimitedLogger, TokenBucket
from meshd.wsframes import MAX_FAST_PAYLOAD

if TYPE_CHECKING:
    from meshd.app import Application
    from meshd.config import Config
    from meshd.session import Session


class MeshServerProtocol(FastServerProtocol):
    factory: "MeshServerFactory"
    session: "Optional[Session]" = None
    #: The key the client's address is counted under (None: not counted, see meshd.limits.address_key).
    address: Optional[str] = None
    #: The session's budget of requests (one token per data frame), from the opening handshake on;
    #: None: not limited.
    requests: Optional[TokenBucket] = None
    # The message being received in several frames, and what is known of it.
    _message: Optional[bytearray] = None
    _frames = 0
    _declared = 0
    _over = False

    def outlet_for(self, transport):
        return self.factory.app.outlet_for(transport)

    @property
    def max_handshake_size(self) -> int:  # type: ignore[override]
        return self.factory.config.max_handshake_size

    @property
    def connection_log(self):  # type: ignore[override]
        return self.factory.autobahn_log

    @property
    def clock(self):  # type: ignore[override]
        return self.factory.app.clock

    # -- connections ---------------------------------------------------------------

    def admit(self) -> bool:
        limits = self.factory.app.limits
        self.address = limits.address_of(self.transport.getPeer())
        taken, replaced = limits.admission.connect(self, self.address, limits.clock.seconds())
        if replaced is not None:
            replaced.refuse("too many connections in their opening handshake", 503)
        if not taken:
            self.refuse(f"too many connections from {self.address}", 503)
        return taken

    def refuse(self, reason: str, code: int) -> None:
        """Answer the opening handshake with HTTP ``code`` and close (if it is still under way)."""
        if self.state == self.STATE_CONNECTING:
            self.failHandshake(reason, code)

    def onConnect(self, request) -> str:
        if SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(
                ConnectionDeny.BAD_REQUEST,
                f"offer the WebSocket subprotocol {SUBPROTOCOL!r}",
            )
        if not self.factory.app.limits.admission.may_open():
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "maximum number of connections reached")
        return SUBPROTOCOL

    def onOpen(self) -> None:
        app = self.factory.app
        limits = app.limits
        limits.admission.opened(self)
        self.session = app.open_session(self, self.outlet, self.peer)
        limits.attach(self.session, self.address)
        self.requests = limits.request_bucket()
        self._now = app.clock.seconds
        sizes = [n for n in (self.maxFramePayloadSize, self.maxMessagePayloadSize) if n > 0]
        self.fast_limit = min([MAX_FAST_PAYLOAD, *sizes])

    def onAutoPingTimeout(self) -> None:
        # A client whose output is stuck cannot answer pings: the node stopped
        # reading from it (see meshd._io.Outlet).  It is a slow consumer, and is
        # counted and logged as one; Autobahn then drops the connection.
        session = self.session
        if session is not None and session.outlet.stuck:
            session.lifecycle.overflowed()
        super().onAutoPingTimeout()

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.fast_limit = 0
        self._message = None
        session, self.session = self.session, None
        if session is not None:
            self.factory.app.close_session(session)

    def connectionLost(self, reason) -> None:
        self.factory.app.limits.admission.lost(self)
        super().connectionLost(reason)

    # -- messages --------------------------------------------------------------------

    def binary_received(self, payload: bytes) -> None:
        # The fast path: one whole message in one frame.
        requests = self.requests
        if requests is not None and requests.charge(self._now()) < 0:
            self._over_rate(payload)
            return
        self.factory.app.dispatch(self.session, payload)

    # Autobahn's parser: fragmented, text, long or mixed-with-control-frame
    # messages.  Its per-frame hooks are overridden so that a message is
    # gathered in one buffer: Autobahn's own keeps every piece of every read
    # as an object of its own (about 60 bytes each, before the data).

    def onMessageBegin(self, isBinary: bool) -> None:
        self._message = None
        if self.state != self.STATE_OPEN:
            return
        if not isBinary:
            session = self.session
            self.factory.app.limits.log.info(
                "Closing {session} ({peer}): text message on a binary subprotocol",
                session=session.id if session else None, peer=self.peer,
            )
            self._fail(CLOSE_UNSUPPORTED_DATA, f"{SUBPROTOCOL} carries binary messages only")
            return
        self._message = bytearray()
        self._frames = self._declared = 0
        self._over = False

    def onMessageFrameBegin(self, length: int) -> None:
        if self._message is None or self.state != self.STATE_OPEN:
            return
        self._frames += 1
        self._declared += length
        config = self.factory.config
        if self._frames > config.max_fragments:
            self._fail(CLOSE_POLICY_VIOLATION, f"a message in more than {config.max_fragments} frames")
        elif 0 < self.maxMessagePayloadSize < self._declared or 0 < self.maxFramePayloadSize < length:
            self._fail(CLOSE_MESSAGE_TOO_BIG, f"a message over {config.max_message_size} bytes")
        elif self.requests is not None and self.requests.charge(self._now()) < 0:
            self._over = True
            self._over_rate(None)

    def onMessageFrameData(self, payload: bytes) -> None:
        message = self._message
        if message is not None:
            message += payload

    def onMessageFrameEnd(self) -> None:
        pass

    def onMessageEnd(self) -> None:
        message, self._message = self._message, None
        if message is None or self.state != self.STATE_OPEN:
            return  # refused, or closing: whatever else the client sent is not acted on
        payload = bytes(message)
        if self._over:
            self.factory.app.refuse(self.session, payload, ErrorCode.RateLimited, self._rate_message())
            return
        self.onMessage(payload, True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is None or self.state != self.STATE_OPEN:
            return
        self.factory.app.dispatch(session, payload)

    def onCloseFrame(self, code, reasonRaw):
        if reasonRaw is not None and self.state == self.STATE_OPEN:
            try:
                reasonRaw.decode("utf-8")
            except UnicodeDecodeError:
                # Autobahn would answer 1007; a bad close frame is a protocol error, as a bad code is.
                self._fail(CLOSE_PROTOCOL_ERROR, "close reason is not UTF-8")
                return super().onCloseFrame(code, None)
        return super().onCloseFrame(code, reasonRaw)

    # -- limits ------------------------------------------------------------------------

    def _over_rate(self, payload: Optional[bytes]) -> None:
        """A frame found the session's budget spent: refuse it, or close once the debt passes the burst."""
        requests = self.requests
        if requests.tokens < -requests.burst:
            session = self.session
            if session is not None and self.state == self.STATE_OPEN:
                self.factory.app.limits.log.warn(
                    "Closing {session} ({peer}): requests over limits.request_rate ({rate:g}/s) for too long",
                    session=session.id, peer=self.peer, rate=requests.rate,
                )
                session.lifecycle.close(CLOSE_RATE_LIMITED, "request rate over the limit")
            return
        if payload is not None:
            self.factory.app.refuse(self.session, payload, ErrorCode.RateLimited, self._rate_message())

    def _rate_message(self) -> str:
        return f"over {self.requests.rate:g} requests a second: slow down"

    def _fail(self, code: int, reason: str) -> None:
        """Close the connection with ``code``; nothing the client sends after is acted on."""
        self._message = None
        self.factory.app.limits.log.info(
            "Closing {peer} with {code}: {reason}", peer=self.peer, code=code, reason=reason
        )
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:123])


class MeshServerFactory(FastServerFactory):
    """Makes :class:`MeshServerProtocol` for one :class:`Application`, with limits set on purpose."""

    protocol = MeshServerProtocol

    def __init__(self, app: "Application", config: "Config", clock=None) -> None:
        super().__init__(protocols=[SUBPROTOCOL])
        self.app = app
        self.config = config
        #: Autobahn's lines about connections, rate-limited (see meshd._io.FastServerProtocol).
        self.autobahn_log = LimitedLogger(MeshServerProtocol.log, app.limits.log)
        if clock is not None:
            # Timeouts as configured, not rounded to a whole second of the clock.
            use_exact_timers(self, clock)
        self.setProtocolOptions(
            # Frames are FlatBuffers: binary only, so no UTF-8 validation.
            utf8validateIncoming=False,
            maxMessagePayloadSize=config.max_message_size,
            maxFramePayloadSize=config.max_message_size,
            allowedOrigins=list(config.origins),
            autoPingInterval=config.auto_ping_interval,
            autoPingTimeout=config.auto_ping_timeout,
            openHandshakeTimeout=config.open_handshake_timeout,
            # Time for a client to answer our close frame before the TCP
            # connection is dropped (Autobahn's 1 s is short on a busy host).
            closeHandshakeTimeout=5,
            # Counted by the node (meshd.limits.Admission): Autobahn's count
            # includes sockets that never said anything.
            maxConnections=0,
            # Refuse compression: events are framed once for every recipient.
            perMessageCompressionAccept=lambda offers: None,
            # Send a close frame with a code (1009, 1002, ...) before closing,
            # so that a client learns why it was disconnected.
            failByDrop=False,
            tcpNoDelay=True,
        )
