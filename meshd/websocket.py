# -*- test-case-name: tests.test_websocket -*-
"""The WebSocket face of a node: a thin Autobahn protocol that hands messages to the app.

The protocol only speaks WebSocket: it accepts the ``meshd.v1`` subprotocol,
refuses text messages, and passes each binary message to
:meth:`meshd.app.Application.dispatch`.  How bytes are split into messages
and written out is :mod:`meshd._io`'s; everything else lives in the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger

from meshd._io import FastServerProtocol, use_exact_timers
from meshd.constants import CLOSE_UNSUPPORTED_DATA, SUBPROTOCOL
from meshd.wsframes import MAX_FAST_PAYLOAD

if TYPE_CHECKING:
    from meshd.app import Application
    from meshd.config import Config
    from meshd.session import Session


class MeshServerProtocol(FastServerProtocol):
    _log = Logger()
    factory: "MeshServerFactory"
    session: "Optional[Session]" = None

    def outlet_for(self, transport):
        return self.factory.app.outlet_for(transport)

    def onConnect(self, request) -> str:
        if SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(
                ConnectionDeny.BAD_REQUEST,
                f"offer the WebSocket subprotocol {SUBPROTOCOL!r}",
            )
        return SUBPROTOCOL

    def onOpen(self) -> None:
        self.session = self.factory.app.open_session(self, self.outlet, self.peer)
        limits = [n for n in (self.maxFramePayloadSize, self.maxMessagePayloadSize) if n > 0]
        self.fast_limit = min([MAX_FAST_PAYLOAD, *limits])

    def binary_received(self, payload: bytes) -> None:
        self.factory.app.dispatch(self.session, payload)

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

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.fast_limit = 0
        session, self.session = self.session, None
        if session is not None:
            self.factory.app.close_session(session)


class MeshServerFactory(WebSocketServerFactory):
    """Makes :class:`MeshServerProtocol` for one :class:`Application`, with limits set on purpose."""

    protocol = MeshServerProtocol

    def __init__(self, app: "Application", config: "Config", clock=None) -> None:
        super().__init__(protocols=[SUBPROTOCOL])
        self.app = app
        if clock is not None:
            # Timeouts as configured, not rounded to a whole second of the clock.
            use_exact_timers(self, clock)
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
