"""The WebSocket face of a node: socket options and the inbound frame path."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest

from meshd.app import Application
from meshd.codec import Opcode, decode, encode
from meshd.config import Config
from meshd.wsframes import unmask

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


# -- the inbound fast path, fed byte streams through a StringTransport ----------------


def client_frame(payload: bytes, opcode: int = 0x2, fin: bool = True, masked: bool = True,
                 key: bytes = b"\x1f\x8b\x00\xc3", long_length: bool = False) -> bytes:
    """One client-to-server frame, masked byte by byte (independently of meshd's unmask)."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if masked else 0
    if long_length:
        header = bytes([first, bit | 127]) + n.to_bytes(8, "big")
    elif n < 126:
        header = bytes([first, bit | n])
    else:
        header = bytes([first, bit | 126]) + n.to_bytes(2, "big")
    if not masked:
        return header + payload
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split what the node wrote into (opcode, payload); server frames are never masked."""
    frames = []
    while data:
        length, at = data[1] & 0x7F, 2
        if length == 126:
            length, at = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, at = int.from_bytes(data[2:10], "big"), 10
        frames.append((data[0] & 0x0F, data[at : at + length]))
        data = data[at + length :]
    return frames


def close_code(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big")


HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: meshd.v1\r\n\r\n"
)


def handshake(*headers: str) -> bytes:
    """The opening handshake with ``headers`` ("Name: value") added before its end."""
    return HANDSHAKE[:-2] + b"".join(h.encode() + b"\r\n" for h in headers) + b"\r\n"


def node_app(**config):
    """An app on a task.Clock with the timers that tests do not drive turned off."""
    from twisted.internet.task import Clock

    settings = {"auto_ping_interval": 0, "open_handshake_timeout": 0, "hello_timeout": 0, **config}
    # Autobahn's own timers (the close handshake's) run on the app's clock too.
    return Application(Config(**settings), clock=Clock())


class Connection:
    """A node's WebSocket protocol on a StringTransport, past its opening handshake.

    ``app`` shares one node between connections; ``host`` is the client's
    address; ``request`` is the opening handshake to send (None: none).
    """

    def __init__(self, app: "Application | None" = None, host: str = "127.0.0.1",
                 request: "bytes | None" = HANDSHAKE, **config) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        self.app = app if app is not None else node_app(**config)
        self.clock = self.app.clock
        self.protocol = self.app.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        self.protocol.makeConnection(self.transport)
        if request is not None:
            self.feed(request)
            assert self.transport.value().startswith(b"HTTP/1.1 101"), self.transport.value()
            self.transport.clear()

    @property
    def session(self):
        return self.protocol.session

    def feed(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.protocol.dataReceived(chunk)
        self.clock.advance(0)  # the end of the reactor turn: sessions flush

    def written(self) -> list[tuple[int, bytes]]:
        frames = server_frames(self.transport.value())
        self.transport.clear()
        return frames

    def http_status(self) -> int:
        """The status code of the node's HTTP answer to the opening handshake."""
        return int(self.transport.value().split(b" ", 2)[1])

    def lose(self) -> None:
        """The TCP connection is gone."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(0)


def ping(request_id: int, size: int = 0) -> bytes:
    """A meshd Ping request: the node answers with a Pong carrying the same payload."""
    return encode(Opcode.Ping, request_id=request_id, payload=b"x" * size)


def answers(frames: list[tuple[int, bytes]]) -> list:
    """What the node's frames say: ("pong", request id, size), ("ws-pong", payload) or ("close", code)."""
    said = []
    for opcode, payload in frames:
        if opcode == 0x2:
            message = decode(payload)
            said.append(("pong", message.request_id, len(message.payload or b"")))
        elif opcode == 0xA:
            said.append(("ws-pong", payload))
        elif opcode == 0x8:
            said.append(("close", close_code(payload)))
        else:  # pragma: no cover - would be a node bug
            said.append(("opcode", opcode))
    return said


# A message for the stream test: a small or 16-bit-length meshd Ping in one
# frame, the same in fragments (with a WebSocket ping between them), or a
# WebSocket ping on its own.
_items = st.one_of(
    st.tuples(st.just("whole"), st.sampled_from([0, 7, 100, 118, 119, 300, 5000])),
    st.tuples(st.just("fragments"), st.integers(1, 400)),
    st.tuples(st.just("ws-ping"), st.binary(max_size=20)),
)


class FastPathTests(unittest.SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(st.lists(_items, min_size=1, max_size=12), st.lists(st.integers(1, 400), max_size=30))
    def test_any_stream_split_anywhere(self, items, cuts) -> None:
        """Whole, fragmented and control frames, split at any byte, are all answered, in order."""
        stream, expected = b"", []
        for request_id, (kind, arg) in enumerate(items, 1):
            if kind == "ws-ping":
                stream += client_frame(arg, opcode=0x9)
                expected.append(("ws-pong", arg))
                continue
            frame = ping(request_id, arg)
            expected.append(("pong", request_id, arg))
            if kind == "whole":
                stream += client_frame(frame)
            else:
                third = len(frame) // 3
                stream += client_frame(frame[:third], fin=False)
                stream += client_frame(b"between", opcode=0x9)
                stream += client_frame(frame[third : 2 * third], opcode=0x0, fin=False)
                stream += client_frame(frame[2 * third :], opcode=0x0)
                expected.insert(-1, ("ws-pong", b"between"))
        connection = Connection()
        at = 0
        for cut in cuts:
            connection.feed(stream[at : at + cut])
            at += cut
        connection.feed(stream[at:])
        self.assertEqual(answers(connection.written()), expected)

    def test_many_frames_in_one_read(self) -> None:
        """A read holding hundreds of frames answers each one, in order."""
        connection = Connection()
        parsed_by_autobahn = []
        process_data = connection.protocol.processData
        connection.protocol.processData = lambda: parsed_by_autobahn.append(1) or process_data()
        connection.feed(b"".join(client_frame(ping(i, i % 200)) for i in range(1, 501)))
        self.assertEqual(answers(connection.written()), [("pong", i, i % 200) for i in range(1, 501)])
        self.assertEqual(parsed_by_autobahn, [], "whole binary frames take the fast path")

    def test_a_long_partial_frame_is_streamed(self) -> None:
        """A frame arriving a little per read is taken over by Autobahn's parser once past partial_limit bytes,
        so that each read costs what it brings rather than a re-join of all that came before."""
        connection = Connection()
        parsed_by_autobahn = []
        process_data = connection.protocol.processData
        connection.protocol.processData = lambda: parsed_by_autobahn.append(1) or process_data()
        stream = client_frame(ping(1, 40_000)) + client_frame(ping(2))
        connection.feed(*[stream[i : i + 100] for i in range(0, len(stream), 100)])
        self.assertEqual(answers(connection.written()), [("pong", 1, 40_000), ("pong", 2, 0)])
        self.assertGreater(len(parsed_by_autobahn), 0)
        self.assertEqual(connection.protocol.partial_limit, 16 * 1024)

    def test_a_raising_dispatch_leaves_the_stream_whole(self) -> None:
        """If handling a message raises out of dispatch, the frames after it are still read, in order."""
        connection = Connection()
        dispatch = connection.app.dispatch

        def failing(session, data):
            if decode(data).request_id == 2:
                raise RuntimeError("a bug")
            dispatch(session, data)

        connection.app.dispatch = failing
        head = client_frame(ping(1)) + client_frame(ping(2)) + client_frame(ping(3))
        tail = client_frame(ping(4))
        self.assertRaises(RuntimeError, connection.feed, head + tail[:3])
        connection.feed(tail[3:])
        self.assertEqual(answers(connection.written()), [("pong", 1, 0), ("pong", 3, 0), ("pong", 4, 0)])

    def test_unmask_against_autobahn(self) -> None:
        """meshd's unmask agrees with Autobahn's masker for every length up to a few words."""
        from autobahn.websocket.xormasker import create_xor_masker

        for n in range(0, 70):
            key, data = bytes([n, 255 - n, 7, 0]), bytes(range(n))
            self.assertEqual(unmask(key, data), create_xor_masker(key, n).process(data) if n else b"")

    def assert_closed_after_answers(self, bad: bytes, code: int, **config) -> None:
        connection = Connection(**config)
        connection.feed(client_frame(ping(1)) + client_frame(ping(2, 200)) + bad + client_frame(ping(3)))
        self.assertEqual(answers(connection.written()), [("pong", 1, 0), ("pong", 2, 200), ("close", code)])

    def test_unmasked_frame_after_good_ones(self) -> None:
        """An unmasked client frame after answered ones closes the connection with 1002."""
        self.assert_closed_after_answers(client_frame(ping(9), masked=False), 1002)

    def test_text_frame_after_good_ones(self) -> None:
        """A text frame after answered ones closes the connection with 1003."""
        self.assert_closed_after_answers(client_frame(b"hello", opcode=0x1), 1003)

    def test_reserved_bits_after_good_ones(self) -> None:
        """A frame with reserved bits set after answered ones closes the connection with 1002."""
        self.assert_closed_after_answers(bytes([0xC2]) + client_frame(ping(9))[1:], 1002)

    def test_oversized_frame_after_good_ones(self) -> None:
        """A frame over max_message_size after answered ones closes the connection with 1009."""
        self.assert_closed_after_answers(client_frame(ping(9, 2000)), 1009, max_message_size=1024)

    def test_oversized_frame_split_across_reads(self) -> None:
        """A frame longer than the limit is refused from its header, before its payload arrives."""
        connection = Connection(max_message_size=1024)
        frame = client_frame(ping(9, 2000))
        connection.feed(client_frame(ping(1)) + frame[:10])
        self.assertEqual(answers(connection.written()), [("pong", 1, 0), ("close", 1009)])

    def test_non_minimal_length_after_good_ones(self) -> None:
        """A length not in its shortest encoding after answered frames closes the connection with 1002."""
        frame = ping(9)
        padded = bytes([0x82, 0x80 | 126]) + len(frame).to_bytes(2, "big") + client_frame(frame)[2:]
        self.assert_closed_after_answers(padded, 1002)

    def test_long_length_frames_still_work(self) -> None:
        """A frame with a 64-bit length (past what the fast path takes) goes through Autobahn."""
        connection = Connection(max_message_size=200_000)
        connection.feed(client_frame(ping(1, 70_000), long_length=True) + client_frame(ping(2)))
        self.assertEqual(answers(connection.written()), [("pong", 1, 70_000), ("pong", 2, 0)])

    def test_nothing_after_a_close_frame_is_acted_on(self) -> None:
        """A frame that follows the client's close frame is not answered."""
        connection = Connection()
        close = client_frame((1000).to_bytes(2, "big"), opcode=0x8)
        connection.feed(client_frame(ping(1)) + close + client_frame(ping(2)))
        self.assertEqual(answers(connection.written()), [("pong", 1, 0), ("close", 1000)])
