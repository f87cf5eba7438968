"""Bad input from one client: a clear answer to it, nothing for anybody else, and the node stays up.

Each case is listed with its outcome in docs/protocol.md ("Bad input").
"""

from __future__ import annotations

import struct

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol

from meshd.client import MeshClient
from meshd.codec import ErrorCode, Opcode, Watchable, encode
from meshd.config import Config

from .support import NodeTestCase, RawClient, payloads, raw_client, sleep
from .test_websocket import HANDSHAKE, client_frame, server_frames


class _Bytes(Protocol):
    """A TCP client that records what it receives and how the connection ended."""

    def connectionMade(self) -> None:
        self.received = b""
        self.ended: Deferred = Deferred()
        self.factory.connected.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        waiting = self.factory.waiting
        if waiting is not None and waiting[0] in self.received:
            self.factory.waiting = None
            waiting[1].callback(self.received)

    def connectionLost(self, reason) -> None:
        self.ended.callback(reason.value)  # the exception: a Failure would fire the errback

    def wait_for(self, marker: bytes) -> Deferred:
        d: Deferred = Deferred()
        if marker in self.received:
            d.callback(self.received)
        else:
            self.factory.waiting = (marker, d)
        return d.addTimeout(5, reactor)


async def tcp_client(testcase: NodeTestCase) -> _Bytes:
    """A plain TCP connection to the node, sending nothing yet."""
    factory = Factory.forProtocol(_Bytes)
    factory.connected, factory.waiting = Deferred(), None
    port = int(testcase.url.rsplit(":", 1)[1])
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    client = await factory.connected
    testcase.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
    return client


class BadInputTests(NodeTestCase):
    async def start(self, config: Config = Config()) -> tuple[RawClient, MeshClient]:
        """A node, an offending raw connection (welcomed), and a subscribed bystander."""
        await self.start_node(config)
        self.bystander = await self.client()
        await self.bystander.subscribe("room")
        await self.bystander.watch("doc", "1")
        offender = await raw_client(self, self.url)
        offender.send(encode(Opcode.Hello, request_id=1, version=1))
        await offender.wait_frames(1)
        return offender, self.bystander

    async def answers(self, raw: RawClient, *frames: bytes, binary: bool = True) -> list:
        """Send frames, then a Ping; return the frames that arrived before the Pong."""
        before = len(raw.frames)
        for frame in frames:
            raw.send(frame, binary)
        raw.send(encode(Opcode.Ping, request_id=999_999))
        got = await raw.wait_frames(before + len(frames) + 1)
        self.assertEqual((got[-1].opcode, got[-1].request_id), (Opcode.Pong, 999_999))
        return got[before:-1]

    async def assert_unaffected(self) -> None:
        """The bystander got nothing from the offender, and the node still delivers to it."""
        other = await self.client()
        await other.publish("room", b"ok")
        self.app.state.notify_event(0, Watchable("doc", "1"), None, b"still-watching")
        await self.settle(self.bystander)
        self.assertEqual(payloads(self.bystander.received), [b"ok", b"still-watching"])

    def assert_errors(self, frames: list, *expected: tuple[int, int]) -> None:
        self.assertEqual([(f.opcode, f.error_code, f.request_id) for f in frames],
                         [(Opcode.Error, code, rid) for code, rid in expected])

    async def test_malformed_and_truncated(self) -> None:
        """Garbage, a truncated frame and lying offsets each get Error Malformed; the session goes on."""
        raw, _ = await self.start()
        valid = encode(Opcode.Publish, request_id=5, channel="room", payload=b"x" * 40)
        lying_root = struct.pack("<I", 10_000) + valid[4:]
        at = valid.index(b"room") - 4  # the channel string's length field
        lying_string = valid[:at] + struct.pack("<I", 0xFFFFFF) + valid[at + 4 :]
        bad_utf8 = valid.replace(b"room", b"ro\xffm")
        got = await self.answers(
            raw, b"\x00garbage\xff" * 3, valid[: len(valid) // 2], b"", lying_root, lying_string, bad_utf8
        )
        self.assert_errors(got, *[(ErrorCode.Malformed, 0)] * 6)
        self.assertIn("length out of bounds", got[4].message)
        self.assertIn("UTF-8", got[5].message)
        self.assertTrue(all("malformed frame" in f.message for f in got))
        await self.assert_unaffected()

    async def test_wrong_file_identifier(self) -> None:
        """A buffer with another file identifier is refused as Malformed, naming the identifier."""
        raw, _ = await self.start()
        frame = bytearray(encode(Opcode.Publish, request_id=3, channel="room", payload=b"x"))
        frame[4:8] = b"NOPE"
        [error] = await self.answers(raw, bytes(frame))
        self.assert_errors([error], (ErrorCode.Malformed, 0))
        self.assertIn("NOPE", error.message)
        await self.assert_unaffected()

    async def test_text_message(self) -> None:
        """A text message closes the connection with 1003; nobody else notices."""
        raw, _ = await self.start()
        raw.send(b'{"publish": "room"}', binary=False)
        self.assertEqual(await raw.wait_closed(), 1003)
        await self.assert_unaffected()

    async def test_nothing_after_the_close(self) -> None:
        """Frames that follow a text message on the same connection are not acted on."""
        raw, _ = await self.start()
        raw.send(b"text", binary=False)
        raw.send(encode(Opcode.Publish, channel="room", payload=b"after the close"))
        self.assertEqual(await raw.wait_closed(), 1003)
        await self.assert_unaffected()

    async def test_oversize_message(self) -> None:
        """A message over max_message_size closes the connection with 1009, also when fragmented."""
        raw, _ = await self.start(Config(max_message_size=1024))
        raw.send(encode(Opcode.Publish, channel="room", payload=b"x" * 2000))
        self.assertEqual(await raw.wait_closed(), 1009)
        fragmented = await raw_client(self, self.url, max_frame=512)
        fragmented.send(encode(Opcode.Publish, channel="room", payload=b"y" * 4000))
        self.assertEqual(await fragmented.wait_closed(), 1009)
        await self.assert_unaffected()

    async def test_unknown_opcodes(self) -> None:
        """Reserved, unregistered user and node-only opcodes get UnknownOpcode with their request ids."""
        raw, _ = await self.start()
        got = await self.answers(
            raw,
            encode(500, request_id=11),
            encode(Opcode.UserFirst + 7, request_id=12),
            encode(Opcode.Event, request_id=13, channel="room", payload=b"fake"),
            encode(Opcode.None_, request_id=14),
        )
        self.assert_errors(got, *[(ErrorCode.UnknownOpcode, rid) for rid in (11, 12, 13, 14)])
        await self.assert_unaffected()

    async def test_bad_channels_and_watchables(self) -> None:
        """Empty, over-long, control-character and missing names are refused with their codes."""
        raw, _ = await self.start()
        got = await self.answers(
            raw,
            encode(Opcode.Subscribe, request_id=1, channel=""),
            encode(Opcode.Subscribe, request_id=2, channel="x" * 257),
            encode(Opcode.Subscribe, request_id=3, channel="a\nb"),
            encode(Opcode.Subscribe, request_id=4),
            encode(Opcode.Subscribe, request_id=40, channel="a\u200bb"),
            encode(Opcode.Subscribe, request_id=41, channel="\u202egnp.exe"),
            encode(Opcode.Publish, request_id=5, channel="", payload=b"x"),
            encode(Opcode.Watch, request_id=6, watchable=Watchable("doc", "")),
            encode(Opcode.Watch, request_id=7),
        )
        self.assert_errors(
            got,
            (ErrorCode.InvalidChannel, 1),
            (ErrorCode.InvalidChannel, 2),
            (ErrorCode.InvalidChannel, 3),
            (ErrorCode.MissingField, 4),
            (ErrorCode.InvalidChannel, 40),
            (ErrorCode.InvalidChannel, 41),
            (ErrorCode.InvalidChannel, 5),
            (ErrorCode.InvalidWatchable, 6),
            (ErrorCode.MissingField, 7),
        )
        self.assertEqual(set(self.app.registry.channels), {"room"})
        # The longest allowed name, and any printable text, are fine.
        acks = await self.answers(
            raw,
            encode(Opcode.Subscribe, request_id=8, channel="x" * 256),
            encode(Opcode.Subscribe, request_id=9, channel="chat/héllo wörld/日本 🎉"),
        )
        self.assertEqual([a.opcode for a in acks], [Opcode.Ack, Opcode.Ack])
        await self.assert_unaffected()

    async def test_publish_before_hello(self) -> None:
        """Publish before Hello gets HelloRequired and is delivered to nobody."""
        await self.start_node()
        self.bystander = await self.client()
        await self.bystander.subscribe("room")
        await self.bystander.watch("doc", "1")
        raw = await raw_client(self, self.url)
        got = await self.answers(
            raw,
            encode(Opcode.Publish, request_id=4, channel="room", payload=b"sneaky"),
            encode(Opcode.Subscribe, request_id=5, channel="room"),
        )
        self.assert_errors(got, (ErrorCode.HelloRequired, 4), (ErrorCode.HelloRequired, 5))
        await self.assert_unaffected()

    async def test_subscription_flood(self) -> None:
        """Past max_subscriptions each Subscribe is refused; the session keeps the ones it has."""
        raw, _ = await self.start(Config(max_subscriptions=20))
        frames = [encode(Opcode.Subscribe, request_id=i, channel=f"flood.{i}") for i in range(1, 301)]
        got = await self.answers(raw, *frames)
        self.assertEqual([f.opcode for f in got[:20]], [Opcode.Ack] * 20)
        self.assert_errors(got[20:], *[(ErrorCode.TooManySubscriptions, i) for i in range(21, 301)])
        session = [s for s in self.app.registry.sessions.values() if s is not self._bystander_session()][0]
        self.assertEqual(len(session.channels), 20)
        self.assertEqual(len(self.app.registry.channels), 21)  # the 20 and "room"
        # Re-subscribing to a held channel is not a new subscription.
        [ack] = await self.answers(raw, encode(Opcode.Subscribe, request_id=5000, channel="flood.1"))
        self.assertEqual(ack.opcode, Opcode.Ack)
        await self.assert_unaffected()

    async def test_watch_flood(self) -> None:
        """Past max_watches each Watch is refused with TooManyWatches."""
        raw, _ = await self.start(Config(max_watches=3))
        got = await self.answers(
            raw, *[encode(Opcode.Watch, request_id=i, watchable=Watchable("k", str(i))) for i in range(1, 6)]
        )
        self.assertEqual([f.opcode for f in got[:3]], [Opcode.Ack] * 3)
        self.assert_errors(got[3:], (ErrorCode.TooManyWatches, 4), (ErrorCode.TooManyWatches, 5))
        await self.assert_unaffected()

    async def test_wrong_subprotocol(self) -> None:
        """A WebSocket handshake without the meshd.v1 subprotocol is refused."""
        await self.start_node()
        with self.assertRaises(ConnectionError):
            await raw_client(self, self.url, protocols=("chat",))
        with self.assertRaises(ConnectionError):
            await raw_client(self, self.url, protocols=())
        self.assertEqual(self.app.registry.sessions, {})

    async def test_origins_and_connection_limit(self) -> None:
        """Origins outside allowed_origins and connections past max_connections are refused."""
        await self.start_node(Config(allowed_origins=("https://app.example.com:443",), max_connections=2))
        await raw_client(self, self.url, origin="https://app.example.com")
        with self.assertRaises(ConnectionError):
            await raw_client(self, self.url, origin="https://evil.example.com")
        await raw_client(self, self.url)  # no Origin: not a browser
        with self.assertRaises(ConnectionError):
            await raw_client(self, self.url)
        self.assertEqual(len(self.app.registry.sessions), 2)

    async def test_close_frame_violations(self) -> None:
        """A close frame with a bad code, a reason that is not UTF-8, or a 1-byte body gets close 1002, then a FIN."""
        await self.start_node()
        accepted = []
        build = self.app.factory.buildProtocol
        self.app.factory.buildProtocol = lambda addr: accepted.append(build(addr)) or accepted[-1]
        for body in (struct.pack(">H", 999), struct.pack(">H", 1000) + b"\xff\xfe", b"\x03"):
            client = await tcp_client(self)
            client.transport.write(HANDSHAKE)
            await client.wait_for(b"\r\n\r\n")
            server = accepted[-1]
            gone: Deferred = Deferred()
            lost = server.connectionLost
            server.connectionLost = lambda reason: (lost(reason), gone.callback(None))
            client.transport.pauseProducing()  # the close frame crosses the node's answer unread
            client.transport.write(client_frame(body, opcode=0x8))
            await gone.addTimeout(5, reactor)  # the node has closed its side
            client.transport.resumeProducing()
            ended = await client.ended.addTimeout(5, reactor)
            frames = server_frames(client.received.split(b"\r\n\r\n", 1)[1])
            self.assertEqual([(op, struct.unpack(">H", p[:2])[0]) for op, p in frames], [(0x8, 1002)], body)
            self.assertIsInstance(ended, ConnectionDone, f"{body!r}: {ended!r}, not a FIN")

    async def test_oversized_handshake(self) -> None:
        """A handshake request past max_handshake_size (16 KiB) is answered with HTTP 431 and closed."""
        await self.start_node()
        client = await tcp_client(self)
        client.transport.write(b"GET / HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 17_000 + b"\r\n")
        await client.ended.addTimeout(5, reactor)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 431 "), client.received)

    async def test_silent_sockets_do_not_lock_clients_out(self) -> None:
        """TCP connections that never start their handshake do not count against max_connections."""
        await self.start_node(Config(max_connections=2))
        for _ in range(10):
            await tcp_client(self)
        await raw_client(self, self.url)
        await raw_client(self, self.url)
        with self.assertRaises(ConnectionError):
            await raw_client(self, self.url)

    def _bystander_session(self):
        return self.app.registry.sessions[self.bystander.session_id]


class SlowConsumerTests(NodeTestCase):
    async def test_client_that_stops_reading(self) -> None:
        """A session that stops reading is closed past max_send_buffer; the others get everything."""
        # The publisher sends as fast as it can: well over the default request rate.
        await self.start_node(Config(max_send_buffer=64 * 1024, request_rate=1e6, request_burst=10**6))
        stalled, reader, publisher = await self.client(), await self.client(), await self.client()
        for c in (stalled, reader):
            await c.subscribe("firehose")
        stalled._protocol.transport.pauseProducing()  # stop reading from the socket
        session = self.app.registry.sessions[stalled.session_id]
        payload = b"x" * 1024
        sent = 0
        while session.id in self.app.registry.sessions and sent < 20_000:
            for _ in range(100):
                publisher.publish("firehose", payload, ack=False)
            sent += 100
            await publisher.ping()
            await self.settle(reader)
        self.assertTrue(session.overflowed, f"not closed after {sent} messages")
        for _ in range(100):
            if session.id not in self.app.registry.sessions:
                break
            await sleep(0.05)
        self.assertNotIn(session.id, self.app.registry.sessions)
        self.assertEqual(self.app.metrics.slow_consumer_closes, 1)
        await self.settle(reader)
        self.assertEqual(len(reader.received), sent)
        self.assertTrue(all(e.payload == payload for e in reader.received))
        stalled._protocol.transport.abortConnection()
