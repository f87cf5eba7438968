# -*- test-case-name: tests.test_websocket -*-
"""The WebSocket face of a node: a thin Autobahn protocol that hands frames to the app.

The protocol only speaks WebSocket: it accepts the ``meshd.v1`` subprotocol,
refuses text messages, and passes each binary message to
:meth:`meshd.app.Application.dispatch`.  Everything else lives in the app.
"""

from __future__ import annotations

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


class MeshServerProtocol(WebSocketServerProtocol):
    _log = Logger()
    factory: "MeshServerFactory"
    session: "Optional[Session]" = None

    def connectionMade(self) -> None:
        # Autobahn sets TCP_NODELAY from ``self.tcpNoDelay`` before it copies
        # the factory's options onto the protocol, so on its own the option
        # never takes effect; without it Nagle's algorithm holds small event
        # frames back until the client's delayed ACK (tens of milliseconds).
        self.tcpNoDelay = self.factory.tcpNoDelay
        super().connectionMade()

    def onConnect(self, request) -> str:
        if SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(
                ConnectionDeny.BAD_REQUEST,
                f"offer the WebSocket subprotocol {SUBPROTOCOL!r}",
            )
        return SUBPROTOCOL

    def onOpen(self) -> None:
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

    def dropConnection(self, abort: bool = False) -> None:
        # The session is this transport's producer; TLS transports only shut
        # down once no producer is registered.
        if self.session is not None and self.transport is not None:
            self.transport.unregisterProducer()
        super().dropConnection(abort)

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
