"""Registry, permissions, authentication and the slow-consumer guard, without sockets."""

from __future__ import annotations

import hashlib
import socket
import struct

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from meshd.auth import DevelopmentAuthenticator, TokenAuthenticator
from meshd.codec import Watchable
from meshd.permissions import Policy, Rule
from meshd.registry import Registry
from meshd.session import CLOSE_SLOW_CONSUMER, Flusher, Session, prepare


class FakeWebSocket:
    """Stands in for the Autobahn protocol a Session writes to (not the thing under test)."""

    def __init__(self) -> None:
        self.state = WebSocketProtocol.STATE_OPEN
        self.transport = StringTransport()
        self.closed_with = None

    @property
    def sent(self) -> list[bytes]:
        """The frames written, split at their 2-byte headers (test frames are short)."""
        data, frames = self.transport.value(), []
        while data:
            length = data[1] & 0x7F
            if length == 126:
                length = int.from_bytes(data[2:4], "big") + 2
            frames.append(data[: 2 + length])
            data = data[2 + length :]
        return frames

    def sendClose(self, code, reason) -> None:
        self.closed_with = code
        self.state = WebSocketProtocol.STATE_CLOSING


class RegistryTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = Registry()
        self.a, self.b = Session(FakeWebSocket()), Session(FakeWebSocket())
        for s in (self.a, self.b):
            self.registry.add(s)
            self.registry.admit(s)

    def test_indexes(self) -> None:
        """Subscriptions and watches show up in both the registry and the session."""
        r, a, b = self.registry, self.a, self.b
        self.assertTrue(r.subscribe(a, "x"))
        self.assertFalse(r.subscribe(a, "x"))
        r.subscribe(b, "x")
        r.watch(a, Watchable("k", "1"))
        self.assertEqual(r.subscribers("x"), {a, b})
        self.assertEqual(r.watchers_of(Watchable("k", "1")), {a})
        self.assertEqual(r.subscribers("nothing"), frozenset())
        self.assertEqual(a.channels, {"x"})

    def test_empty_entries_are_deleted(self) -> None:
        """The last unsubscribe or unwatch removes the channel or watchable entry."""
        r, a = self.registry, self.a
        r.subscribe(a, "x")
        r.watch(a, Watchable("k", "1"))
        self.assertTrue(r.unsubscribe(a, "x"))
        self.assertFalse(r.unsubscribe(a, "x"))
        self.assertTrue(r.unwatch(a, Watchable("k", "1")))
        self.assertEqual((r.channels, r.watchers), ({}, {}))

    def test_remove_cleans_everything(self) -> None:
        """Removing a session clears it from every index and keeps the others."""
        r, a, b = self.registry, self.a, self.b
        for ch in ("x", "y"):
            r.subscribe(a, ch)
        r.subscribe(b, "y")
        r.watch(a, Watchable("k", "1"))
        r.remove(a)
        self.assertEqual(r.channels, {"y": {b}})
        self.assertEqual(r.watchers, {})
        self.assertEqual((set(r.sessions.values()), r.members), ({b}, {b}))
        self.assertEqual((a.channels, a.watching), (set(), set()))
        self.assertFalse(r.subscribe(a, "z"), "a removed session cannot subscribe again")
        self.assertNotIn("z", r.channels)

    def test_duplicate_and_unknown(self) -> None:
        """Adding a session twice or admitting an unknown one is a programming error."""
        self.assertRaises(ValueError, self.registry.add, self.a)
        self.assertRaises(ValueError, self.registry.admit, Session(FakeWebSocket()))


class SlowConsumerTests(unittest.SynchronousTestCase):
    def test_backlog_limit(self) -> None:
        """While the transport is paused, past max_backlog bytes the session is closed with 4002."""
        ws = FakeWebSocket()
        clock = Clock()
        session = Session(ws, max_backlog=1000, clock=clock)
        message = prepare(b"x" * 300)
        session.pauseProducing()
        for _ in range(20):  # one turn's burst: the client had no chance to read it
            self.assertTrue(session.send(message))
        clock.advance(0)
        ws.transport.clear()
        self.assertTrue(all(session.send(message) for _ in range(3)))
        self.assertFalse(session.send(message))
        self.assertEqual(ws.closed_with, CLOSE_SLOW_CONSUMER)
        self.assertFalse(session.send(message), "nothing is sent once closing")
        self.assertEqual(len(ws.sent), 3)
        self.assertTrue(session.overflowed)

    def test_resume_resets(self) -> None:
        """A transport that drains resets the count."""
        ws = FakeWebSocket()
        clock = Clock()
        session = Session(ws, max_backlog=1000, clock=clock)
        message = prepare(b"x" * 300)
        for _ in range(10):
            session.pauseProducing()
            clock.advance(0)
            session.send(message)
            session.send(message)
            session.resumeProducing()
        self.assertIsNone(ws.closed_with)
        self.assertEqual(len(ws.sent), 20)


class FlusherTests(unittest.SynchronousTestCase):
    def test_one_write_per_turn_in_order(self) -> None:
        """What a session is sent in one turn is written once, at the end of the turn, in order."""
        writes: list[bytes] = []
        ws = FakeWebSocket()
        ws.transport.write = writes.append
        clock = Clock()
        session = Session(ws, clock=clock, flusher=Flusher(clock))
        for i in range(5):
            session.send(prepare(b"%d" % i))
        self.assertEqual(writes, [], "nothing before the end of the turn")
        clock.advance(0)
        self.assertEqual(len(writes), 1)
        self.assertEqual(writes[0], b"".join(prepare(b"%d" % i).payloadHybi for i in range(5)))
        session.send(prepare(b"next"))
        clock.advance(0)
        self.assertEqual(len(writes), 2)


class PrepareTests(unittest.SynchronousTestCase):
    def test_same_bytes_as_autobahn(self) -> None:
        """prepare() frames exactly as Autobahn's PreparedMessage does, at every length boundary."""
        from autobahn.websocket.protocol import PreparedMessage

        for n in (0, 1, 125, 126, 127, 65535, 65536, 70000):
            frame = bytes(i % 251 for i in range(n))
            ours, autobahns = prepare(frame), PreparedMessage(frame, True, False, True)
            self.assertEqual(ours.payloadHybi, autobahns.payloadHybi, n)
            self.assertTrue(ours.doNotCompress)


class ProtocolWriteOrderTests(unittest.SynchronousTestCase):
    def test_autobahn_frames_follow_pending_events(self) -> None:
        """A close or ping frame Autobahn writes goes after the frames the session was already sent."""
        from meshd.app import Application
        from meshd.websocket import MeshServerProtocol

        clock = Clock()
        app = Application(clock=clock)
        protocol = MeshServerProtocol()
        protocol.factory = app.factory
        protocol.transport = StringTransport()
        protocol.state = protocol.STATE_OPEN
        protocol.send_queue = []
        protocol.logOctets = False
        protocol.trafficStats = type("Stats", (), {"outgoingOctetsWireLevel": 0})()
        protocol.session = Session(protocol, clock=clock, flusher=app.flusher)
        protocol.session.send(prepare(b"event"))
        protocol.sendData(b"CLOSE-FRAME")
        self.assertEqual(protocol.transport.value(), prepare(b"event").payloadHybi + b"CLOSE-FRAME")
        clock.advance(0)
        self.assertEqual(protocol.transport.value(), prepare(b"event").payloadHybi + b"CLOSE-FRAME")


class PolicyTests(unittest.SynchronousTestCase):
    def test_rules(self) -> None:
        """Globs grant actions; authenticated sessions inherit anonymous grants; the rest is denied."""
        policy = Policy((
            Rule("public.*", anonymous=frozenset({"subscribe"}), authenticated=frozenset({"publish"})),
            Rule("doc/*", authenticated=frozenset({"watch"})),
        ))
        self.assertTrue(policy.allows("subscribe", "public.a", False))
        self.assertTrue(policy.allows("subscribe", "public.a", True))
        self.assertFalse(policy.allows("publish", "public.a", False))
        self.assertTrue(policy.allows("publish", "public.a", True))
        self.assertFalse(policy.allows("subscribe", "Public.a", False), "matching is case-sensitive")
        self.assertFalse(policy.allows("subscribe", "private", True))
        self.assertTrue(policy.allows("watch", "doc/1", True))
        self.assertFalse(policy.allows("watch", "doc/1", False))

    def test_cache_is_bounded(self) -> None:
        """Remembered answers never exceed the cache size."""
        policy = Policy((Rule("*", anonymous=frozenset({"subscribe"})),))
        for i in range(Policy._CACHE_SIZE + 50):
            self.assertTrue(policy.allows("subscribe", f"c{i}", False))
        self.assertLessEqual(len(policy._cache), Policy._CACHE_SIZE)

    def test_development(self) -> None:
        """The development policy allows everything."""
        self.assertTrue(Policy.development().allows("publish", "anything", False))


class AuthTests(unittest.SynchronousTestCase):
    def test_tokens(self) -> None:
        """Plain and sha256: tokens prove their principal; others prove nothing."""
        digest = hashlib.sha256(b"bob-secret").hexdigest()
        auth = TokenAuthenticator({"alice": "a-secret", "bob": f"sha256:{digest}"})
        self.assertEqual(auth.authenticate("a-secret"), "alice")
        self.assertEqual(auth.authenticate("bob-secret"), "bob")
        self.assertIsNone(auth.authenticate(f"sha256:{digest}"))
        self.assertIsNone(auth.authenticate(""))
        self.assertIsNone(TokenAuthenticator({}).authenticate("x"))
        self.assertEqual(DevelopmentAuthenticator().authenticate("x"), "dev")


class FlusherRobustnessTests(unittest.SynchronousTestCase):
    def test_one_failing_connection_does_not_stall_others(self) -> None:
        """If writing to one session raises, the others in the same turn are still written."""
        clock = Clock()
        flusher = Flusher(clock)
        broken, fine = FakeWebSocket(), FakeWebSocket()

        def explode(data):
            raise OSError("boom")

        broken.transport.write = explode
        sessions = [Session(ws, clock=clock, flusher=flusher) for ws in (broken, fine)]
        for s in sessions:
            s.send(prepare(b"x"))
        clock.advance(0)
        self.assertEqual(len(fine.sent), 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        sessions[1].send(prepare(b"y"))
        clock.advance(0)
        self.assertEqual(len(fine.sent), 2)


class WriteNowTests(unittest.TestCase):
    """write_now() on real sockets: straight to the kernel, and a dead peer still noticed."""

    async def connected_pair(self):
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
        from twisted.internet.protocol import Factory, Protocol

        class Server(Protocol):
            def connectionMade(self) -> None:
                self.lost = Deferred()
                accepted.callback(self)

            def connectionLost(self, reason) -> None:
                self.lost.callback(reason.type)

        accepted: Deferred = Deferred()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Server))
        self.addCleanup(port.stopListening)
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(Protocol))
        server = await accepted
        self.addCleanup(lambda: server.transport.abortConnection() if server.transport.connected else None)
        return client, server

    async def test_written_at_once(self) -> None:
        """Nothing waits in Twisted's buffer for the next poll when the kernel takes it all."""
        from meshd.session import write_now

        _client, server = await self.connected_pair()
        write_now(server.transport, b"x" * 1000)
        self.assertEqual(server.transport._tempDataLen, 0)
        self.assertEqual(len(server.transport.dataBuffer), 0)

    async def test_dead_peer_noticed_without_reading(self) -> None:
        """A connection whose peer is gone is closed by the reactor, also when nothing reads from it."""
        from twisted.internet import reactor
        from twisted.internet.error import ConnectionLost
        from twisted.internet.task import deferLater

        from meshd.session import write_now

        client, server = await self.connected_pair()
        server.transport.stopReading()  # as a paused link or session: only writing can notice
        client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.transport.loseConnection()  # with SO_LINGER 0: a reset
        await deferLater(reactor, 0.1, lambda: None)
        for _ in range(3):
            write_now(server.transport, b"x" * 100)
        self.assertTrue(issubclass(await server.lost.addTimeout(5, reactor), ConnectionLost))
