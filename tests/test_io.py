"""meshd._io: outlets, the end-of-turn scheduler, the direct write, and the contract with Twisted and Autobahn."""

from __future__ import annotations

import socket
import struct

from autobahn.websocket.protocol import PreparedMessage
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from meshd import _io
from meshd._io import EndOfTurn, Outlet, write_now
from meshd.wsframes import frame_binary

from .support import NodeTestCase

HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: meshd.v1\r\n\r\n"
)


class Overflows:
    """Counts an outlet's overflow calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def outlet(limit: int = 1000):
    clock = Clock()
    turn = EndOfTurn(clock)
    transport = StringTransport()
    overflows = Overflows()
    return Outlet(transport, turn, limit, overflows), transport, clock, overflows


class OutletTests(unittest.SynchronousTestCase):
    def test_registers_as_streaming_producer(self) -> None:
        """An outlet is its transport's streaming producer from the start."""
        out, transport, _clock, _ = outlet()
        self.assertIs(transport.producer, out)
        self.assertTrue(transport.streaming)

    def test_one_write_per_turn_in_order(self) -> None:
        """What an outlet is given in one turn is written once, at the end of the turn, in order."""
        out, transport, clock, _ = outlet()
        writes: list[bytes] = []
        transport.write = writes.append
        for i in range(5):
            self.assertTrue(out.write(b"%d" % i))
        self.assertEqual(writes, [], "nothing before the end of the turn")
        clock.advance(0)
        self.assertEqual(writes, [b"01234"])
        out.write(b"next")
        clock.advance(0)
        self.assertEqual(writes, [b"01234", b"next"])
        self.assertEqual(out.written, 9)

    def test_write_through_follows_what_is_queued(self) -> None:
        """write_through writes at once, after what was queued before it."""
        out, transport, clock, _ = outlet()
        out.write(b"event")
        out.write_through(b"CLOSE")
        self.assertEqual(transport.value(), b"eventCLOSE")
        clock.advance(0)
        self.assertEqual(transport.value(), b"eventCLOSE")

    def test_burst_in_one_turn_not_counted(self) -> None:
        """Bytes written in the turn the transport filled up are not counted: the peer had no chance to read."""
        out, _transport, clock, overflows = outlet(limit=1000)
        out.pauseProducing()
        for _ in range(20):
            self.assertTrue(out.write(b"x" * 300))
        self.assertEqual((out.backlog, overflows.calls), (0, 0))
        clock.advance(0)
        self.assertTrue(out.write(b"x" * 300))
        self.assertEqual(out.backlog, 300)

    def test_limit(self) -> None:
        """Past the limit, while the transport stays full, the overflow handler runs once and writes are refused."""
        out, transport, clock, overflows = outlet(limit=1000)
        out.pauseProducing()
        clock.advance(0)
        self.assertTrue(all(out.write(b"x" * 300) for _ in range(3)))
        self.assertFalse(out.write(b"x" * 300))
        self.assertEqual(overflows.calls, 1)
        self.assertFalse(out.write(b"x"), "nothing more is queued")
        out.write_through(b"close-frame")
        self.assertEqual(overflows.calls, 1)
        self.assertEqual(transport.value(), b"close-frame", "what was queued for the slow peer is dropped")

    def test_repeated_pause_does_not_restart_the_count(self) -> None:
        """Twisted's TCP transport pauses its producer on every write while full: the count keeps running."""
        out, _transport, clock, overflows = outlet(limit=1000)
        out.pauseProducing()
        clock.advance(0)
        for _ in range(4):
            out.write(b"x" * 300)
            out.pauseProducing()  # as tcp.Connection.write does while its buffer is over bufferSize
            clock.advance(0)
        self.assertEqual(overflows.calls, 1)

    def test_autobahn_frames_count(self) -> None:
        """Frames written through (pongs, close frames) count against the limit too."""
        out, _transport, clock, overflows = outlet(limit=1000)
        out.pauseProducing()
        clock.advance(0)
        for _ in range(4):
            out.write_through(b"p" * 300)
        self.assertEqual(overflows.calls, 1)

    def test_pause_reading(self) -> None:
        """With pause_reading, the transport is not read from while it is full, and is again once it drained."""
        clock = Clock()
        transport = StringTransport()
        out = Outlet(transport, EndOfTurn(clock), 1000, Overflows(), pause_reading=True)
        out.pauseProducing()
        out.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        out.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        links = Outlet(StringTransport(), EndOfTurn(clock), 1000, Overflows())
        links.pauseProducing()
        self.assertEqual(links.transport.producerState, "producing", "off by default (mesh links)")

    def test_resume_resets(self) -> None:
        """A transport that drained resets the count."""
        out, _transport, clock, overflows = outlet(limit=1000)
        for _ in range(10):
            out.pauseProducing()
            clock.advance(0)
            out.write(b"x" * 300)
            out.write(b"x" * 300)
            out.resumeProducing()
        self.assertEqual(overflows.calls, 0)


class EndOfTurnTests(unittest.SynchronousTestCase):
    def test_order(self) -> None:
        """Coalescing runs before announcing, and both before the outlets flush, whatever the order they were asked in."""
        out, transport, clock, _ = outlet()
        turn = out.turn
        seen = []
        turn.register(EndOfTurn.ANNOUNCE, lambda: seen.append(("announce", transport.value())))
        turn.register(EndOfTurn.COALESCE, lambda: (seen.append(("coalesce", transport.value())), out.write(b"b")))
        out.write(b"a")
        turn.want(EndOfTurn.ANNOUNCE)
        turn.want(EndOfTurn.COALESCE)
        clock.advance(0)
        self.assertEqual(seen, [("coalesce", b""), ("announce", b"")])
        self.assertEqual(transport.value(), b"ab")
        clock.advance(0)
        self.assertEqual(len(seen), 2, "steps run only in the turns that want them")

    def test_one_step_twice_is_refused(self) -> None:
        """A step has one runner."""
        turn = EndOfTurn(Clock())
        turn.register(EndOfTurn.COALESCE, lambda: None)
        self.assertRaises(ValueError, turn.register, EndOfTurn.COALESCE, lambda: None)

    def test_one_failing_connection_does_not_stall_others(self) -> None:
        """If writing to one outlet raises, the others of the same turn are still written, and the failure logged."""
        clock = Clock()
        turn = EndOfTurn(clock)
        broken, fine = StringTransport(), StringTransport()

        def explode(data):
            raise OSError("boom")

        broken.write = explode
        outlets = [Outlet(t, turn, 1000, Overflows()) for t in (broken, fine)]
        for o in outlets:
            o.write(b"x")
        clock.advance(0)
        self.assertEqual(fine.value(), b"x")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        outlets[1].write(b"y")
        clock.advance(0)
        self.assertEqual(fine.value(), b"xy")

    def test_failing_step_does_not_stop_the_flush(self) -> None:
        """A step that raises is logged; the flush still runs."""
        out, transport, clock, _ = outlet()
        out.turn.register(EndOfTurn.COALESCE, lambda: 1 / 0)
        out.turn.want(EndOfTurn.COALESCE)
        out.write(b"still")
        clock.advance(0)
        self.assertEqual(transport.value(), b"still")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class FramingTests(unittest.SynchronousTestCase):
    def test_same_bytes_as_autobahn(self) -> None:
        """frame_binary frames exactly as Autobahn's PreparedMessage does, at every length boundary."""
        for n in (0, 1, 125, 126, 127, 65535, 65536, 70000):
            frame = bytes(i % 251 for i in range(n))
            self.assertEqual(frame_binary(frame), PreparedMessage(frame, True, False, True).payloadHybi, n)


class ContractTests(unittest.SynchronousTestCase):
    """What meshd._io uses of Twisted's and Autobahn's internals still exists, so every fast path is on."""

    def test_every_internal_exists(self) -> None:
        """Every private attribute listed in INTERNALS exists in the installed Twisted and Autobahn."""
        self.assertEqual(_io.missing_internals(), [])
        self.assertTrue(_io.DIRECT_WRITE and _io.GATHER_TLS and _io.FAST_PATH and _io.EXACT_TIMERS)
        self.assertTrue(_io.SHARED_OPTIONS and _io.PLAIN_HANDSHAKE and _io.LEAN_LIFECYCLE)

    def test_options_shared(self) -> None:
        """A node's connections read the factory's options from their class; a later change reaches only new ones."""
        from autobahn.websocket.protocol import WebSocketServerProtocol as Base

        from .test_websocket import node_app

        factory = node_app().factory
        first = factory.buildProtocol(None)
        first.makeConnection(StringTransport())
        self.assertFalse(set(Base.CONFIG_ATTRS) & set(vars(first)), "no option copied onto the connection")
        self.assertEqual(first.maxMessagePayloadSize, factory.maxMessagePayloadSize)
        self.assertTrue(first.tcpNoDelay)
        self.assertIsNone(first.perMessageCompressionAccept([]), "a function option reads back as itself")
        factory.setProtocolOptions(maxMessagePayloadSize=77)
        second = factory.buildProtocol(None)
        self.assertEqual((first.maxMessagePayloadSize, second.maxMessagePayloadSize),
                         (factory.config.max_message_size, 77))
        self.assertIsInstance(second, type(first).__mro__[1])
        first.connectionLost(Failure(ConnectionDone()))

    def test_fresh_connection_as_autobahns(self) -> None:
        """A new connection reads the first values Autobahn's _connectionMade gives, each object its own, made at
        first use; and nothing else is missing from it."""
        from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

        from .test_websocket import node_app

        factory = WebSocketServerFactory()
        factory.protocol = WebSocketServerProtocol
        factory.setProtocolOptions(openHandshakeTimeout=0)
        theirs = factory.buildProtocol(None)
        theirs.makeConnection(StringTransport())
        ours, other = (node_app().factory.buildProtocol(None) for _ in range(2))
        for protocol in (ours, other):
            protocol.makeConnection(StringTransport())
        self.assertTrue(_io._FRESH)
        for name, value in vars(theirs).items():
            if name in _io._FRESH and name != "state":  # the state is each connection's own from the start
                self.assertNotIn(name, vars(ours), name)
            self.assertTrue(hasattr(ours, name), name)
            if name in _io._FRESH:
                mine = getattr(ours, name)
                if isinstance(value, _io._IMMUTABLE):
                    self.assertEqual(mine, value, name)
                else:
                    self.assertIsInstance(mine, type(value))
                    self.assertIsNot(mine, getattr(other, name), name)
        self.assertNotIn("_transport_details", vars(other), "made at first use")
        self.assertEqual(ours.peer, theirs.peer)
        self.assertEqual(ours._transport_details.marshal(), theirs._transport_details.marshal())
        for protocol in (theirs, ours, other):
            protocol.connectionLost(Failure(ConnectionDone()))

    def test_connections_counted(self) -> None:
        """The server's connection steps, without their debug lines, still count connections as Autobahn's do."""
        from .test_websocket import node_app

        factory = node_app().factory
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.assertEqual(factory.countConnections, 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((factory.countConnections, protocol.state), (0, protocol.STATE_CLOSED))

    def test_options_copied_without_the_internal(self) -> None:
        """Without CONFIG_ATTRS to rely on, connections are Autobahn's own, options copied onto each."""
        from .test_websocket import node_app

        self.patch(_io, "SHARED_OPTIONS", False)
        factory = node_app().factory
        protocol = factory.buildProtocol(None)
        self.assertIs(type(protocol), factory.protocol)
        protocol.makeConnection(StringTransport())
        self.assertIn("maxMessagePayloadSize", vars(protocol))
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_missing_internal_is_reported(self) -> None:
        """An internal that goes away is named, so the matching fast path turns itself off."""
        self.patch(_io, "INTERNALS", {**_io.INTERNALS, "twisted.internet.tcp.Connection": {"_gone_in_2030": "x"}})
        self.assertEqual(_io.missing_internals(), ["twisted.internet.tcp.Connection._gone_in_2030"])

    def test_without_direct_write(self) -> None:
        """With the direct write off, write_now is transport.write."""
        self.patch(_io, "DIRECT_WRITE", False)
        transport = StringTransport()
        write_now(transport, b"data")
        self.assertEqual(transport.value(), b"data")

    def test_autobahn_timers_go_through_the_factory_timer(self) -> None:
        """Autobahn schedules its opening-handshake timeout on factory._batched_timer, which use_exact_timers replaces."""
        from meshd.app import Application

        clock = Clock()
        app = Application(clock=clock)
        protocol = app.factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.assertEqual(len(clock.getDelayedCalls()), 1, "the opening handshake timer is on the app's clock")
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_handshake_buffer(self) -> None:
        """Autobahn keeps a handshake under way in `data`, and takes one put there whole with the read that ends it."""
        from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

        factory = WebSocketServerFactory()
        factory.protocol = WebSocketServerProtocol
        factory.setProtocolOptions(openHandshakeTimeout=0)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(HANDSHAKE[:40])
        self.assertEqual((protocol.data, transport.value()), (HANDSHAKE[:40], b""))
        protocol.data = HANDSHAKE[:-10]  # as FastServerProtocol does with the reads it kept aside
        protocol._dataReceived(HANDSHAKE[-10:])
        self.assertIn(b"101 Switching Protocols", transport.value())

    def test_autobahn_logs_through_self_log(self) -> None:
        """Autobahn logs a connection it fails through self.log, which FastServerProtocol.connection_log replaces."""
        from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

        class Lines:
            def __init__(self) -> None:
                self.warned: list[str] = []

            def warn(self, format: str, **fields) -> None:
                self.warned.append(format)

            def __getattr__(self, name: str):
                return lambda *args, **kwargs: None

        factory = WebSocketServerFactory()
        factory.protocol = WebSocketServerProtocol
        # No timers: nothing is left on the global reactor.
        factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0, failByDrop=False)
        protocol = factory.buildProtocol(None)
        protocol.log = lines = Lines()
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(HANDSHAKE)
        protocol.dataReceived(b"\x82\x01x")  # an unmasked client frame
        self.assertEqual(len(lines.warned), 1)
        self.assertIn("failing WebSocket connection", lines.warned[0])


class WebSocketTimeoutTests(unittest.SynchronousTestCase):
    """The opening-handshake and hello timeouts are what the configuration says, fractions of a second too."""

    def connection(self, **config):
        from meshd.app import Application
        from meshd.config import Config

        clock = Clock()
        clock.advance(1000.9)  # late in a second: a deadline rounded to whole seconds would fire early
        app = Application(Config(**config), clock=clock)
        protocol = app.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return app, protocol, transport, clock

    def test_open_handshake_timeout(self) -> None:
        """A connection that does not finish its opening handshake is dropped when the timeout is up, not before."""
        for timeout in (1.0, 0.25, 2.5):
            _app, protocol, transport, clock = self.connection(open_handshake_timeout=timeout)
            clock.advance(timeout - 0.001)
            self.assertFalse(transport.disconnecting, timeout)
            clock.advance(0.001)
            self.assertTrue(transport.disconnecting, timeout)
            protocol.connectionLost(Failure(ConnectionDone()))

    def test_open_handshake_timeout_stops_when_open(self) -> None:
        """A finished opening handshake cancels its timeout."""
        app, protocol, transport, clock = self.connection(open_handshake_timeout=0.5, hello_timeout=0)
        protocol.dataReceived(HANDSHAKE)
        self.assertIn(b"101 Switching Protocols", transport.value())
        clock.advance(5)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(app.registry.sessions), 1)

    def test_hello_timeout(self) -> None:
        """A session not welcomed within hello_timeout is closed with 4001 then, not before."""
        from meshd.constants import CLOSE_HELLO_TIMEOUT

        for timeout in (1.0, 0.3):
            app, protocol, transport, clock = self.connection(hello_timeout=timeout)
            protocol.dataReceived(HANDSHAKE)
            transport.clear()
            clock.advance(timeout - 0.001)
            self.assertEqual(transport.value(), b"", timeout)
            clock.advance(0.001)
            close = transport.value()
            self.assertEqual(close[:1], b"\x88", "a close frame")
            self.assertEqual(struct.unpack(">H", close[2:4])[0], CLOSE_HELLO_TIMEOUT)
            session = next(iter(app.registry.sessions.values()))
            self.assertEqual((session.phase, session.close_code), ("closing", CLOSE_HELLO_TIMEOUT))

    def test_keep_alive_of_a_client_that_does_not_read(self) -> None:
        """A client whose output is stuck when its ping goes unanswered is closed as a slow consumer (4002)."""
        from meshd.constants import CLOSE_SLOW_CONSUMER

        app, protocol, transport, clock = self.connection(auto_ping_interval=0.5, auto_ping_timeout=0.25,
                                                          hello_timeout=0)
        protocol.dataReceived(HANDSHAKE)
        session = next(iter(app.registry.sessions.values()))
        session.outlet.pauseProducing()  # as the transport does when the client stopped reading
        clock.advance(0.5)  # the ping
        clock.advance(0.25)  # no pong: the client's pongs are not read
        self.assertTrue(transport.disconnecting)
        self.assertEqual(session.close_code, CLOSE_SLOW_CONSUMER)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(app.metrics.slow_consumer_closes, 1)

    def test_auto_ping(self) -> None:
        """Auto-ping pings at its interval and drops a client that does not answer within its timeout."""
        _app, protocol, transport, clock = self.connection(auto_ping_interval=0.5, auto_ping_timeout=0.25,
                                                           hello_timeout=0)
        protocol.dataReceived(HANDSHAKE)
        transport.clear()
        clock.advance(0.499)
        self.assertEqual(transport.value(), b"")
        clock.advance(0.001)
        self.assertEqual(transport.value()[:1], b"\x89", "a ping")
        clock.advance(0.249)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.001)
        self.assertTrue(transport.disconnecting)


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
        _client, server = await self.connected_pair()
        write_now(server.transport, b"x" * 1000)
        self.assertEqual(server.transport._tempDataLen, 0)
        self.assertEqual(len(server.transport.dataBuffer), 0)

    async def test_dead_peer_noticed_without_reading(self) -> None:
        """A connection whose peer is gone is closed by the reactor, also when nothing reads from it."""
        from twisted.internet import reactor
        from twisted.internet.error import ConnectionLost
        from twisted.internet.task import deferLater

        client, server = await self.connected_pair()
        server.transport.stopReading()  # as a paused link or session: only writing can notice
        client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.transport.loseConnection()  # with SO_LINGER 0: a reset
        await deferLater(reactor, 0.1, lambda: None)
        for _ in range(3):
            write_now(server.transport, b"x" * 100)
        self.assertTrue(issubclass(await server.lost.addTimeout(5, reactor), ConnectionLost))


class FallbackTests(NodeTestCase):
    """With an internal gone, the matching fast path is off and a node works through public APIs."""

    async def test_without_fast_path_or_direct_write(self) -> None:
        """Autobahn's own parser and plain transport writes carry Hello, subscribe, publish and events."""
        self.patch(_io, "FAST_PATH", False)
        self.patch(_io, "DIRECT_WRITE", False)
        await self.start_node()
        sub, pub = await self.client(), await self.client()
        await sub.subscribe("room")
        for i in range(3):
            await pub.publish("room", b"%d" % i)
        await self.settle(sub)
        self.assertEqual([e.payload for e in sub.received], [b"0", b"1", b"2"])
