"""Clients that do not read: every byte the node writes them counts, on tcp:, ssl: and unix: listeners."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.task import deferLater

from meshd.codec import Opcode, decode, encode
from meshd.config import Config
from meshd.constants import CLOSE_SLOW_CONSUMER
from meshd.mesh.certs import create_ca, issue_node

from .support import NodeTestCase

LIMIT = 64 * 1024
#: Every loop below stops by itself: at most this many reactor turns.
TURNS = 3000


class Client(WebSocketClientProtocol):
    """A WebSocket client whose reading the test stops (the thing under test is the node)."""

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.messages.append(decode(payload))
        waiting, self.factory.waiting = self.factory.waiting, []
        for d in waiting:
            d.callback(None)

    def stop_reading(self) -> None:
        handle = self.transport.getHandle() if hasattr(self.transport, "getHandle") else None
        if isinstance(handle, socket.socket):
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.pauseProducing()


class ListenerCases:
    """The same cases on one kind of listener; subclasses say which (``listen`` and ``dial``)."""

    async def start(self):
        app = await self.start_node(Config(max_send_buffer=LIMIT, auto_ping_interval=0))
        server, client = self.endpoints()
        port = await serverFromString(reactor, server).listen(app.factory)
        self.addCleanup(port.stopListening)
        self.client_endpoint = client.replace("PORT", str(getattr(port.getHost(), "port", "")))
        return app

    async def connect(self, app, batch: bool = False) -> Client:
        factory = WebSocketClientFactory("ws://localhost/", protocols=["meshd.v1"])
        factory.protocol = Client
        factory.opened, factory.messages, factory.waiting = Deferred(), [], []
        await clientFromString(reactor, self.client_endpoint).connect(factory)
        client = await factory.opened.addTimeout(10, reactor)
        self.addCleanup(lambda: client.transport.abortConnection())
        client.sendMessage(encode(Opcode.Hello, request_id=1, version=1, batch=batch), isBinary=True)
        client.sendMessage(encode(Opcode.Subscribe, request_id=2, channel="firehose"), isBinary=True)
        while len(factory.messages) < 2:
            waiter: Deferred = Deferred()
            factory.waiting.append(waiter)
            await waiter.addTimeout(10, reactor)
        self.assertEqual([m.opcode for m in factory.messages], [Opcode.Welcome, Opcode.Ack])
        return client

    async def stalled(self):
        """A node, and a subscribed client of it that stopped reading: (app, client, its session)."""
        app = await self.start()
        client = await self.connect(app)
        [session] = [s for s in app.registry.sessions.values() if "firehose" in s.channels]
        client.stop_reading()
        return app, client, session

    async def until_closed(self, app, session, each_turn) -> int:
        """Run ``each_turn`` once per reactor turn until the session is closed for being slow; the turns taken."""
        for turn in range(TURNS):
            if session.close_code is not None:
                return turn
            each_turn()
            await deferLater(reactor, 0.002, lambda: None)
        self.fail(f"not closed after {TURNS} turns; backlog {session.outlet.backlog}")

    async def test_events_a_little_per_turn(self) -> None:
        """Events written a few KiB per turn, never past the limit in one turn, still close a stalled reader (4002)."""
        app, client, session = await self.stalled()
        payload = b"x" * 4096
        await self.until_closed(app, session, lambda: app.state.clients.broadcast_to_channel(
            None, "firehose", payload, local_only=True))
        self.assertEqual(session.close_code, CLOSE_SLOW_CONSUMER)
        self.assertLessEqual(session.outlet.backlog, LIMIT + len(payload) + 64)

    async def answers_stop(self, app, session, each_turn) -> None:
        """Run ``each_turn`` until the node stops reading from the client; then check it writes it nothing more."""
        for _ in range(TURNS):
            if session.close_code is not None or not self.reading(session):
                break
            each_turn()
            await deferLater(reactor, 0.002, lambda: None)
        if session.close_code is not None:
            self.assertEqual(session.close_code, CLOSE_SLOW_CONSUMER)
            return
        self.assertFalse(self.reading(session), "the node stopped reading from the client")
        written = session.outlet.written
        for _ in range(100):
            each_turn()  # the client keeps asking; none of it is read
            await deferLater(reactor, 0.002, lambda: None)
        self.assertEqual(session.outlet.written, written, "the node produced nothing more for it")
        self.assertLessEqual(session.outlet.backlog, LIMIT)

    def reading(self, session) -> bool:
        transport = session.protocol.transport
        tcp = getattr(transport, "transport", transport)  # under TLS: the TCP connection
        return tcp in reactor.getReaders()

    async def test_pings_answered_to_a_reader_that_stalled(self) -> None:
        """WebSocket pings from a client that does not read its pongs cannot grow the node: it stops reading them."""
        app, client, session = await self.stalled()

        def pings() -> None:
            for _ in range(100):
                client.sendPing(b"p" * 125)

        await self.answers_stop(app, session, pings)

    async def test_requests_answered_to_a_reader_that_stalled(self) -> None:
        """meshd Ping requests from a client that does not read their Pongs cannot grow the node either."""
        app, client, session = await self.stalled()
        ping = encode(Opcode.Ping, request_id=7, payload=b"q" * 1000)

        def requests() -> None:
            for _ in range(4):
                client.sendMessage(ping, isBinary=True)

        await self.answers_stop(app, session, requests)

    async def test_not_read_while_stuck(self) -> None:
        """While a session's output is stuck, the node does not read from it."""
        app, client, session = await self.stalled()
        payload = b"x" * 4096
        for _ in range(TURNS):
            if not self.reading(session) or session.close_code is not None:
                break
            app.state.clients.broadcast_to_channel(None, "firehose", payload, local_only=True)
            await deferLater(reactor, 0.002, lambda: None)
        self.assertFalse(self.reading(session), "the node's buffer for the client filled, and it stopped reading")


class TCPTests(ListenerCases, NodeTestCase):
    def endpoints(self):
        return "tcp:0:interface=127.0.0.1", "tcp:127.0.0.1:PORT"


class UNIXTests(ListenerCases, NodeTestCase):
    def endpoints(self):
        directory = tempfile.mkdtemp(prefix="meshd-")  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, directory, True)
        path = Path(directory) / "ws.sock"
        return f"unix:{path}", f"unix:{path}"


class TLSTests(ListenerCases, NodeTestCase):
    def endpoints(self):
        certs = Path(self.mktemp()).resolve()
        create_ca(certs, "web")
        issue_node(certs, "web", ["127.0.0.1"])
        return (f"ssl:0:interface=127.0.0.1:privateKey={certs / 'web.key'}:certKey={certs / 'web.pem'}",
                f"ssl:127.0.0.1:PORT:caCertsDir={certs}")
