"""The baseline: a raw Autobahn relay, the ceiling of this stack for channel fan-out.

Every binary message a client sends is framed once with ``prepareMessage``
and written to every connected client with ``sendPreparedMessage``: no
registry, no permissions, no FlatBuffers.  Options match meshd's (no UTF-8
validation, no compression, TCP_NODELAY).

    python bench/relay.py PORT
"""

from __future__ import annotations

import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor


class RelayProtocol(WebSocketServerProtocol):
    def connectionMade(self) -> None:
        # Autobahn reads this before copying the factory's options onto the
        # protocol; set it first so that TCP_NODELAY really applies.
        self.tcpNoDelay = self.factory.tcpNoDelay
        super().connectionMade()

    def onConnect(self, request):
        return request.protocols[0] if request.protocols else None

    def onOpen(self) -> None:
        self.factory.clients.add(self)

    def onClose(self, wasClean, code, reason) -> None:
        self.factory.clients.discard(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        prepared = self.factory.prepareMessage(payload, isBinary)
        for client in self.factory.clients:
            client.sendPreparedMessage(prepared)


def main() -> None:
    port = int(sys.argv[1])
    factory = WebSocketServerFactory()
    factory.protocol = RelayProtocol
    factory.clients = set()
    factory.setProtocolOptions(
        utf8validateIncoming=False, perMessageCompressionAccept=lambda offers: None, tcpNoDelay=True,
        autoPingInterval=0, maxMessagePayloadSize=65536,
    )
    reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=4096)
    print("listening", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
