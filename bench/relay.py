"""The baseline: a raw Autobahn relay, the ceiling of this stack for channel fan-out.

Every binary message a client sends is framed once with ``prepareMessage``
and written to every connected client with ``sendPreparedMessage``: no
registry, no permissions, no FlatBuffers.  Options match meshd's (no UTF-8
validation, no compression, TCP_NODELAY).

    python bench/relay.py PORT [GROUPS]

With GROUPS, the baseline for many channels: connections fall into GROUPS
groups in the order they open, and a message goes to the group its
sequence number picks (the load generator's payload: "MSHB", then the
sequence number, little-endian), as the load generator spreads publishes
over channels.  Still no registry or FlatBuffers: one list lookup.
"""

from __future__ import annotations

import struct
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
        factory = self.factory
        factory.clients.add(self)
        if factory.groups:
            self.group = factory.groups[factory.opened % len(factory.groups)]
            self.group.add(self)
        factory.opened += 1

    def onClose(self, wasClean, code, reason) -> None:
        self.factory.clients.discard(self)
        group = getattr(self, "group", None)
        if group is not None:
            group.discard(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        factory = self.factory
        prepared = factory.prepareMessage(payload, isBinary)
        if factory.groups:
            recipients = factory.groups[_SEQ.unpack_from(payload, 4)[0] % len(factory.groups)]
        else:
            recipients = factory.clients
        for client in recipients:
            client.sendPreparedMessage(prepared)


_SEQ = struct.Struct("<Q")


def main() -> None:
    port = int(sys.argv[1])
    factory = WebSocketServerFactory()
    factory.protocol = RelayProtocol
    factory.clients = set()
    factory.groups = [set() for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 0)]
    factory.opened = 0
    factory.setProtocolOptions(
        utf8validateIncoming=False, perMessageCompressionAccept=lambda offers: None, tcpNoDelay=True,
        autoPingInterval=0, maxMessagePayloadSize=65536,
    )
    reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=4096)
    print("listening", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
