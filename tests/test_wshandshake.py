"""meshd.wshandshake, and the node's plain opening handshakes: the requests it takes, and the same answer as Autobahn's."""

from __future__ import annotations

from twisted.trial import unittest

from meshd import _io
from meshd.wshandshake import accept, plain_upgrade, switching_protocols

from .test_websocket import HANDSHAKE, Connection, client_frame, handshake, node_app

PLAIN = (
    b"GET /ws?room=lobby&x=1 HTTP/1.1\r\nHost: node.example:8765\r\nUpgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: other, meshd.v1\r\nUser-Agent: test\r\n\r\n"
)


def variant(old: bytes, new: bytes) -> bytes:
    assert old in PLAIN, old
    return PLAIN.replace(old, new)


class PlainUpgradeTests(unittest.SynchronousTestCase):
    def test_plain_request(self) -> None:
        """A plain request is parsed once into its path, query, host, key, subprotocols and headers."""
        upgrade = plain_upgrade(PLAIN)
        self.assertEqual((upgrade.path, upgrade.query, upgrade.host, upgrade.key),
                         ("/ws", "room=lobby&x=1", "node.example", "dGhlIHNhbXBsZSBub25jZQ=="))
        self.assertEqual(upgrade.protocols, ["other", "meshd.v1"])
        self.assertEqual(upgrade.params(), {"room": ["lobby"], "x": ["1"]})
        self.assertEqual(upgrade.headers["user-agent"], "test")

    def test_case_and_spacing(self) -> None:
        """Header names in any case, tokens in any case, optional whitespace around values are all plain."""
        request = variant(b"Upgrade: websocket", b"UPGRADE:   WebSocket ").replace(b"Host: node.example:8765",
                                                                                 b"host:[::1]")
        upgrade = plain_upgrade(request)
        self.assertEqual(upgrade.host, "[::1]")

    def test_left_to_autobahn(self) -> None:
        """Anything that needs a judgment or is malformed is not plain: Autobahn's parser answers it."""
        for old, new in [
            (b"User-Agent: test", b"Origin: http://evil.example"),
            (b"User-Agent: test", b"Sec-WebSocket-Extensions: permessage-deflate"),
            (b"User-Agent: test", b"X-Forwarded-For: 10.0.0.1"),
            (b"User-Agent: test", b"User-Agent: test\r\nuser-agent: again"),  # a repeated header
            (b"User-Agent: test", b"User-Agent: test\r\n folded"),  # obsolete line folding
            (b"User-Agent: test", b"User Agent: test"),  # not a token
            (b"User-Agent: test", b"User-Agent: caf\xc3\xa9"),  # not ASCII
            (b"User-Agent: test", b"User-Agent: a\nb"),  # a bare LF
            (b"GET /ws", b"POST /ws"),
            (b"HTTP/1.1\r\nHost", b"HTTP/1.0\r\nHost"),
            (b"/ws?room", b"/ws#frag?room"),
            (b"/ws?room", b"/ws;p?room"),
            (b"/ws?room", b"http://node.example/ws?room"),
            (b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"),
            (b"dGhlIHNhbXBsZSBub25jZQ==", b"dGhlIHNhbXBsZSBub25jZQ"),
            (b"dGhlIHNhbXBsZSBub25jZQ==", b"dGhlIHNhbXBsZSBub25jZ!=="),
            (b"Upgrade: websocket", b"Upgrade: h2c"),
            (b"Connection: keep-alive, Upgrade", b"Connection: close"),
            (b"Host: node.example:8765\r\n", b""),
            (b"node.example:8765", b"node.example:http"),
            (b"other, meshd.v1", b"meshd.v1, meshd.v1"),
        ]:
            self.assertIsNone(plain_upgrade(variant(old, new)), new)
        self.assertIsNone(plain_upgrade(PLAIN[:-2]), "no blank line")

    def test_accept(self) -> None:
        """The accept value of RFC 6455's example key."""
        self.assertEqual(accept("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")

    def test_answer(self) -> None:
        """The 101 answer: server, upgrade, extra headers (one line per value), subprotocol, accept."""
        answer = switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", "meshd.v1", "S/1", [("X-A", "1"), ("X-B", ["2", "3"])])
        self.assertEqual(answer, b"HTTP/1.1 101 Switching Protocols\r\nServer: S/1\r\nUpgrade: WebSocket\r\n"
                                 b"Connection: Upgrade\r\nX-A: 1\r\nX-B: 2\r\nX-B: 3\r\nSec-WebSocket-Protocol: meshd.v1\r\n"
                                 b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


class NodeHandshakeTests(unittest.SynchronousTestCase):
    """The node answers a plain handshake itself, exactly as Autobahn's parser would."""

    def answer(self, request: bytes, plain: bool, **config) -> tuple[bytes, Connection]:
        self.patch(_io, "PLAIN_HANDSHAKE", plain)
        connection = Connection(request=None, app=node_app(**config))
        connection.feed(request)
        return connection.transport.value(), connection

    def test_same_answer_as_autobahn(self) -> None:
        """The same bytes, the same open session, with the plain path on and off."""
        for request in (HANDSHAKE, PLAIN):
            ours, connection = self.answer(request, True)
            theirs, reference = self.answer(request, False)
            self.assertEqual(ours, theirs)
            self.assertTrue(ours.startswith(b"HTTP/1.1 101"), ours)
            for c in (connection, reference):
                self.assertEqual(c.protocol.state, c.protocol.STATE_OPEN)
                self.assertEqual(c.protocol.websocket_protocol_in_use, "meshd.v1")
                self.assertIsNotNone(c.session)
                self.assertTrue(c.protocol.is_open.called)
            self.assertFalse(hasattr(connection.protocol, "http_headers"), "a plain handshake keeps no request text")

    def test_browser_request(self) -> None:
        """A browser's request (an allowed Origin, a compression offer) goes to Autobahn's parser: opened,
        compression refused, the same answer with the plain path on and off."""
        request = handshake("Origin: http://localhost:1234",
                            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
        ours, connection = self.answer(request, True)
        theirs, _ = self.answer(request, False)
        self.assertEqual(ours, theirs)
        self.assertTrue(ours.startswith(b"HTTP/1.1 101"), ours)
        self.assertNotIn(b"Sec-WebSocket-Extensions", ours)
        self.assertEqual(connection.protocol.state, connection.protocol.STATE_OPEN)

    def test_refusals_as_before(self) -> None:
        """A plain request the node refuses (no meshd.v1) gets Autobahn's answer, word for word."""
        request = handshake().replace(b"Sec-WebSocket-Protocol: meshd.v1\r\n", b"Sec-WebSocket-Protocol: chat\r\n")
        ours, connection = self.answer(request, True)
        theirs, _ = self.answer(request, False)
        self.assertEqual(ours, theirs)
        self.assertTrue(ours.startswith(b"HTTP/1.1 400"), ours)
        self.assertTrue(connection.transport.disconnecting)

    def test_timers(self) -> None:
        """A plain handshake stops the opening-handshake timer and starts auto-ping, as Autobahn's does."""
        _, connection = self.answer(HANDSHAKE, True, open_handshake_timeout=5, auto_ping_interval=7)
        calls = connection.clock.getDelayedCalls()
        self.assertIsNotNone(connection.protocol.autoPingPendingCall)
        self.assertEqual(sorted(round(c.getTime()) for c in calls if c.active()), [7])

    def test_frames_behind_the_request(self) -> None:
        """Frames sent in the same read as the request are taken after the handshake."""
        from meshd.codec import Opcode, decode, encode

        hello = client_frame(encode(Opcode.Hello, request_id=1, version=1))
        _, connection = self.answer(HANDSHAKE + hello, True)
        connection.app.turn.run()
        frames = connection.transport.value()
        self.assertIn(b"101 Switching Protocols", frames)
        self.assertTrue(connection.session.helloed)
        self.assertEqual(decode(frames[frames.index(b"\r\n\r\n") + 6:]).opcode, Opcode.Welcome)

    def test_idle_connection_keeps_little(self) -> None:
        """An open, idle connection has made neither Autobahn's send queue nor its UTF-8 validator."""
        _, connection = self.answer(HANDSHAKE, True)
        state = vars(connection.protocol)
        self.assertNotIn("send_queue", state)
        self.assertNotIn("utf8validator", state)
        self.assertEqual(len(connection.protocol.send_queue), 0)  # made when used
        self.assertIn("send_queue", vars(connection.protocol))
