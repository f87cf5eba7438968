# -*- test-case-name: tests.test_websocket -*-
"""The WebSocket face of a node: a thin Autobahn protocol that hands frames to the app.

The protocol only speaks WebSocket: it accepts the ``meshd.v1`` subprotocol,
refuses text messages, and passes each binary message to
:meth:`meshd.app.Application.dispatch`.  Everything else lives in the app.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Optional

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger

if TYPE_CHECKING:
    from meshd.app import Application
    from meshd.config import Config
    from meshd.session import Session

#: The WebSocket subprotocol clients must offer.
SUBPROTOCOL = "meshd.v1"

#: Close codes (see docs/protocol.md).
CLOSE_UNSUPPORTED_DATA = 1003  # a text message arrived
CLOSE_HELLO_TIMEOUT = 4001  # no Hello within limits.hello_timeout

_U16 = struct.Struct(">H")
#: First byte of the frames the fast path takes: FIN, no RSV bits, binary.
_FINAL_BINARY = 0x82
#: Longest payload the fast path takes (a 16-bit length); longer frames,
#: rare here, are streamed by Autobahn instead of being buffered whole.
_FAST_MAX = 0xFFFF


def unmask(key: bytes, masked: bytes) -> bytes:
    """XOR ``masked`` with the 4-byte masking ``key`` repeated (RFC 6455, 5.3)."""
    n = len(masked)
    if not n:
        return b""
    repeated = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(masked, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


class MeshServerProtocol(WebSocketServerProtocol):
    _log = Logger()
    factory: "MeshServerFactory"
    session: "Optional[Session]" = None
    _fast_limit = 0

    def connectionMade(self) -> None:
        # Autobahn sets TCP_NODELAY from ``self.tcpNoDelay`` before it copies
        # the factory's options onto the protocol, so on its own the option
        # never takes effect; without it Nagle's algorithm holds small event
        # frames back until the client's delayed ACK (tens of milliseconds).
        self.tcpNoDelay = self.factory.tcpNoDelay
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's version formats its debug-log arguments (a qualified
        # name found by introspection) on every read, with logging off:
        # about 2.5 us per read, and a read often holds a single message.
        # Its "received N bytes" debug line goes with it.
        self._dataReceived(data)

    def _dataReceived(self, data: bytes) -> None:
        """Split whole, final, masked binary frames off the stream and dispatch them.

        Autobahn's frame parser costs more than everything the node does
        with a Publish: it builds a frame object and an unmasker per frame
        and re-slices its buffer after each one.  Clients send almost only
        small binary messages in one frame each, so those are taken here, in
        one pass over what arrived.  Anything else (control frames,
        fragments, text, unmasked or oversized frames) and everything after
        it goes to Autobahn's parser from a frame boundary, which checks and
        answers it as before.
        """
        if (
            self.state != self.STATE_OPEN
            or self.current_frame is not None
            or self.inside_message
            or self.session is None
        ):
            super()._dataReceived(data)
            return
        self.trafficStats.incomingOctetsWireLevel += len(data)
        buf = self.data + data if self.data else data
        end = len(buf)
        limit = self._fast_limit
        dispatch = self.factory.app.dispatch
        session = self.session
        at = 0
        count = 0
        unusual = False
        try:
            while at < end:
                if buf[at] != _FINAL_BINARY:
                    unusual = True
                    break
                if end - at < 2:
                    break
                length = buf[at + 1] ^ 0x80  # the mask bit must be set
                if length < 126:
                    start = at + 6
                elif length == 126:
                    if end - at < 4:
                        break
                    length = _U16.unpack_from(buf, at + 2)[0]
                    if length < 126:  # not the minimal encoding
                        unusual = True
                        break
                    start = at + 8
                else:  # unmasked, or a 64-bit length
                    unusual = True
                    break
                if length > limit:
                    unusual = True
                    break
                stop = start + length
                if stop > end:
                    break  # the rest of this frame has not arrived yet
                payload = unmask(buf[start - 4 : start], buf[start:stop])
                at = stop
                count += 1
                dispatch(session, payload)
                if self.state != self.STATE_OPEN:
                    unusual = True  # closing: Autobahn deals with what follows
                    break
        finally:
            # Also when a dispatch raises: the rest of the read stays, from a frame boundary.
            self.data = buf[at:] if at else buf
            if count:
                stats = self.trafficStats
                stats.incomingWebSocketFrames += count
                stats.incomingWebSocketMessages += count
                if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                    self._cancelAutoPingTimeoutCall()
        if unusual and self.data:
            self.consumeData()

    def onConnect(self, request) -> str:
        if SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(
                ConnectionDeny.BAD_REQUEST,
                f"offer the WebSocket subprotocol {SUBPROTOCOL!r}",
            )
        return SUBPROTOCOL

    def onOpen(self) -> None:
        limits = [n for n in (self.maxFramePayloadSize, self.maxMessagePayloadSize) if n > 0]
        self._fast_limit = min([_FAST_MAX, *limits])
        self.session = self.factory.app.open_session(self, self.peer)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is None or self.state != self.STATE_OPEN:
            return  # closing: whatever else the client sent is not acted on
        if not isBinary:
            self._log.info("Closing {session}: text message on a binary subprotocol", session=session.id)
            self.sendCloseFrame(
                code=CLOSE_UNSUPPORTED_DATA,
                reasonUtf8=f"{SUBPROTOCOL} carries binary messages only".encode(),
            )
            return
        self.factory.app.dispatch(session, payload)

    def sendData(self, data: bytes, sync: bool = False, chopsize=None) -> None:
        # Autobahn's own frames (close, ping) go after what the session was
        # already sent in this turn.
        if self.session is not None:
            self.session.flush()
        super().sendData(data, sync, chopsize)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        session, self.session = self.session, None
        if session is not None:
            self.factory.app.close_session(session)


class MeshServerFactory(WebSocketServerFactory):
    """Makes :class:`MeshServerProtocol` for one :class:`Application`, with limits set on purpose."""

    protocol = MeshServerProtocol

    def __init__(self, app: "Application", config: "Config") -> None:
        super().__init__(protocols=[SUBPROTOCOL])
        self.app = app
        self.setProtocolOptions(
            # Frames are FlatBuffers: binary only, so no UTF-8 validation.
            utf8validateIncoming=False,
            maxMessagePayloadSize=config.max_message_size,
            maxFramePayloadSize=config.max_message_size,
            allowedOrigins=list(config.allowed_origins),
            autoPingInterval=config.auto_ping_interval,
            autoPingTimeout=config.auto_ping_timeout,
            openHandshakeTimeout=config.open_handshake_timeout,
            # Time for a client to answer our close frame before the TCP
            # connection is dropped (Autobahn's 1 s is short on a busy host).
            closeHandshakeTimeout=5,
            maxConnections=config.max_connections,
            # Refuse compression: events are framed once for every recipient.
            perMessageCompressionAccept=lambda offers: None,
            # Send a close frame with a code (1009, 1002, ...) before closing,
            # so that a client learns why it was disconnected.
            failByDrop=False,
            tcpNoDelay=True,
        )
