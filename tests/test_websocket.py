"""The WebSocket face of a node: socket options and the inbound frame path."""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest

from meshd.app import Application
from meshd.config import Config

from .support import raw_client


class SocketOptionTests(unittest.TestCase):
    async def test_nagle_is_off_on_client_connections(self) -> None:
        """Event frames are small and must not wait for the client's delayed ACK."""
        app = Application(Config())
        app.startService()
        self.addCleanup(app.stopService)
        accepted = []
        build = app.factory.buildProtocol

        def keep(addr):
            protocol = build(addr)
            accepted.append(protocol)
            return protocol

        app.factory.buildProtocol = keep
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(app.factory)
        self.addCleanup(port.stopListening)
        await raw_client(self, f"ws://127.0.0.1:{port.getHost().port}")
        [protocol] = accepted
        handle = protocol.transport.getHandle()
        self.assertEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
