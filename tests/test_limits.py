"""Limits on what one client or one address may cost a node, without sockets.

The pieces of :mod:`meshd.limits` on a task.Clock, then each limit as a
client meets it, through the node's real protocol on a StringTransport
(the ``Connection`` helper of tests/test_websocket.py).
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import LogLevel, Logger, formatEvent, globalLogPublisher
from twisted.internet.testing import EventLoggingObserver
from twisted.trial import unittest

from meshd import _io
from meshd.codec import ErrorCode, Opcode, decode, encode
from meshd.limits import (
    HANDSHAKE_GRACE,
    AddressBuckets,
    Admission,
    Limits,
    RateLimitedLog,
    TokenBucket,
    address_key,
    parse_networks,
)

from .test_websocket import Connection, client_frame, close_code, handshake, node_app, ping

TOKENS = {"alice": "secret"}


def strict(**config):
    """A node with a configuration file: only the tokens in TOKENS authenticate."""
    return node_app(source=Path("meshd.toml"), tokens=TOKENS, **config)


def said(connection: Connection) -> list:
    """What the node wrote, as ("pong", id), ("error", code, id), ("ack", id), ("welcome", id) or ("close", code)."""
    out = []
    for opcode, payload in connection.written():
        if opcode == 0x8:
            out.append(("close", close_code(payload)))
            continue
        if opcode != 0x2:
            out.append(("ws", opcode))
            continue
        message = decode(payload)
        if message.opcode == Opcode.Error:
            out.append(("error", message.error_code, message.request_id))
        else:
            name = {Opcode.Pong: "pong", Opcode.Ack: "ack", Opcode.Welcome: "welcome"}[message.opcode]
            out.append((name, message.request_id))
    return out


def hello(request_id: int, token: "str | None" = None) -> bytes:
    return client_frame(encode(Opcode.Hello, request_id=request_id, version=1, token=token))


def frames(*encoded: bytes) -> bytes:
    return b"".join(client_frame(e) for e in encoded)


def warnings(observer: EventLoggingObserver) -> list[dict]:
    return [e for e in observer if e["log_level"] >= LogLevel.info]


# -- the pieces ---------------------------------------------------------------------------


class TokenBucketTests(unittest.SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        """A bucket gives its burst at once, then its rate, and never saves up more than its burst."""
        bucket = TokenBucket(rate=4, burst=5, now=100.0)
        self.assertEqual([bucket.take(100.0) for _ in range(6)], [True] * 5 + [False])
        self.assertTrue(bucket.take(100.25))
        self.assertFalse(bucket.take(100.25))
        self.assertEqual(bucket.level(1000.0), 5)

    def test_charge_runs_into_debt_and_pays_it_back(self) -> None:
        """charge() goes below zero by what was spent past the burst; the rate pays the debt back."""
        bucket = TokenBucket(rate=10, burst=2, now=0.0)
        self.assertEqual([bucket.charge(0.0) for _ in range(5)], [1, 0, -1, -2, -3])
        self.assertAlmostEqual(bucket.charge(0.5), 1.0)

    def test_clock_going_back_adds_nothing(self) -> None:
        """A clock that jumps back neither adds tokens nor takes the bucket's time back."""
        bucket = TokenBucket(rate=4, burst=5, now=50.0)
        bucket.charge(50.0, 5)
        self.assertEqual(bucket.level(20.0), 0)
        self.assertEqual(bucket.level(50.25), 1)


class AddressBucketsTests(unittest.SynchronousTestCase):
    def test_shared_by_an_address(self) -> None:
        """Spending from one address leaves others untouched, and it recovers at the rate."""
        buckets = AddressBuckets(rate=0.5, burst=2)
        buckets.spend("10.0.0.1", 0)
        buckets.spend("10.0.0.1", 0)
        self.assertFalse(buckets.allows("10.0.0.1", 0))
        self.assertTrue(buckets.allows("10.0.0.2", 0))
        self.assertTrue(buckets.allows(None, 0), "addresses not counted are never refused")
        self.assertTrue(buckets.allows("10.0.0.1", 2))

    def test_spending_stops_at_zero(self) -> None:
        """An address that keeps failing past its budget is not pushed further into debt."""
        buckets = AddressBuckets(rate=1, burst=1)
        for _ in range(100):
            buckets.spend("10.0.0.1", 0)
        self.assertTrue(buckets.allows("10.0.0.1", 1))

    def test_bounded(self) -> None:
        """Many addresses keep at most `size` buckets: full ones are forgotten, then the least recent."""
        buckets = AddressBuckets(rate=1, burst=3, size=8)
        for i in range(1000):
            buckets.spend(f"10.0.{i // 256}.{i % 256}", 0)
            self.assertLessEqual(len(buckets), 8)
        self.assertTrue(buckets.allows("10.0.0.0", 0), "a forgotten address starts afresh")


class AdmissionTests(unittest.SynchronousTestCase):
    def test_per_address(self) -> None:
        """Past per_address connections from one address, more are refused until one goes."""
        admission = Admission(per_address=2)
        self.assertEqual(admission.connect("a", "10.0.0.1"), (True, None))
        admission.opened("a")
        self.assertEqual(admission.connect("b", "10.0.0.1"), (True, None))
        self.assertEqual(admission.connect("c", "10.0.0.1"), (False, None))
        self.assertEqual(admission.connect("d", "10.0.0.2"), (True, None))
        self.assertEqual(admission.connect("e", None), (True, None), "None is not counted")
        admission.lost("c")  # refused: nothing to give back
        admission.lost("a")
        self.assertEqual(admission.connect("f", "10.0.0.1"), (True, None))
        for conn in "bdef":
            admission.lost(conn)
        self.assertEqual(admission.addresses, {})

    def test_handshaking_counted_apart_from_open(self) -> None:
        """Connections in their handshake do not count against max_open; past max_handshaking the oldest goes."""
        admission = Admission(max_handshaking=3, max_open=1)
        for conn in "abc":
            admission.connect(conn, None)
        self.assertTrue(admission.may_open())
        self.assertEqual(admission.connect("d", None), (True, "a"))
        self.assertEqual(list(admission.handshaking), ["b", "c", "d"])
        admission.opened("c")
        self.assertFalse(admission.may_open())
        admission.lost("c")
        self.assertTrue(admission.may_open())


class AddressKeyTests(unittest.SynchronousTestCase):
    def test_keys(self) -> None:
        """IPv4 counts by address, IPv6 by /64, mapped IPv4 as IPv4; exempt and UNIX peers are not counted."""
        exempt = parse_networks(["127.0.0.0/8", "::1", "10.9.0.0/16"])
        self.assertEqual(address_key(IPv4Address("TCP", "192.0.2.7", 1), exempt), "192.0.2.7")
        self.assertEqual(address_key(IPv6Address("TCP", "2001:db8:1:2:3:4:5:6", 1), exempt), "2001:db8:1:2::/64")
        self.assertEqual(address_key(IPv6Address("TCP", "::ffff:192.0.2.7", 1), exempt), "192.0.2.7")
        self.assertIsNone(address_key(IPv4Address("TCP", "127.0.0.1", 1), exempt))
        self.assertIsNone(address_key(IPv4Address("TCP", "10.9.3.4", 1), exempt))
        self.assertIsNone(address_key(IPv6Address("TCP", "::1", 1), exempt))
        self.assertIsNone(address_key(UNIXAddress(b"/run/meshd.sock"), exempt))
        self.assertEqual(address_key(IPv4Address("TCP", "127.0.0.1", 1)), "127.0.0.1")
        self.assertRaises(ValueError, parse_networks, ["10.0.0.0/33"])


class RateLimitedLogTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict] = []
        self.log = RateLimitedLog(self.clock, Logger(observer=self.events.append), lines=3, interval=60)

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def test_lines_then_one_summary(self) -> None:
        """Past its lines in an interval a kind of line is counted, then summed up in one line."""
        for i in range(10):
            self.log.warn("Refused {peer}", peer=i)
        self.assertEqual(self.texts(), ["Refused 0", "Refused 1", "Refused 2"])
        self.clock.advance(60)
        self.assertEqual(self.texts()[3:], ["Suppressed 7 similar lines in the last 60 s: Refused {peer}"])
        self.assertEqual(self.events[-1]["log_level"], LogLevel.warn)
        self.log.warn("Refused {peer}", peer="again")
        self.assertEqual(self.texts()[-1], "Refused again", "a new interval starts with the summary")

    def test_kinds_are_apart(self) -> None:
        """Each format has its own count; a quiet kind logs no summary."""
        for i in range(5):
            self.log.warn("A {i}", i=i)
        self.log.info("B")
        self.clock.advance(60)
        self.assertEqual(self.texts(), ["A 0", "A 1", "A 2", "B", "Suppressed 2 similar lines in the last 60 s: A {i}"])
        self.clock.advance(600)
        self.assertEqual(len(self.events), 5)

    def test_stop(self) -> None:
        """stop() logs the pending summary at once and leaves no timer behind."""
        for _ in range(4):
            self.log.warn("X")
        self.log.stop()
        self.assertEqual(self.texts()[-1], "Suppressed 1 similar lines in the last 60 s: X")
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- the limits as clients meet them ------------------------------------------------------


class HandshakeLimitTests(unittest.SynchronousTestCase):
    """Finding 3: the opening handshake's request is bounded, and never re-scanned past the bound."""

    def test_oversized_header_gets_431(self) -> None:
        """A handshake header growing past max_handshake_size (default 16 KiB) gets HTTP 431 and is closed."""
        connection = Connection(request=None)
        connection.feed(b"GET / HTTP/1.1\r\n")
        for i in range(5):
            connection.feed(b"X-Filler-%d: " % i + b"a" * 4000 + b"\r\n")
        self.assertEqual(connection.http_status(), 431)
        self.assertTrue(connection.transport.disconnecting)
        connection.lose()
        self.assertEqual(connection.app.limits.admission.handshaking, {})

    def test_limit_is_exact(self) -> None:
        """A header of exactly max_handshake_size bytes is accepted; one byte more is refused, even in one read."""
        for size, status in ((2048, 101), (2049, 431)):
            padding = size - len(handshake("X-Pad: "))
            request = handshake("X-Pad: " + "p" * padding)
            self.assertEqual(len(request), size)
            connection = Connection(request=None, max_handshake_size=2048)
            connection.feed(request)
            self.assertEqual(connection.http_status(), status, size)

    def test_split_anywhere(self) -> None:
        """A handshake fed one byte at a time, its blank line across reads, is accepted."""
        connection = Connection(request=None)
        request = handshake("X-Pad: " + "p" * 1500)
        connection.feed(*[request[i : i + 1] for i in range(len(request))])
        self.assertEqual(connection.http_status(), 101)

    def test_no_rescan(self) -> None:
        """Autobahn looks for the end of a header once, when it has arrived, not on every read (and a plain
        request, answered without Autobahn's parser, is not scanned by it at all)."""
        for plain, expected in ((True, 0), (False, 1)):
            self.patch(_io, "PLAIN_HANDSHAKE", plain)
            self.assertEqual(self.scans(), expected, plain)

    def scans(self) -> int:
        connection = Connection(request=None)
        scans = []
        process = connection.protocol.processHandshake
        connection.protocol.processHandshake = lambda: scans.append(1) or process()
        request = handshake("X-Pad: " + "p" * 15000)
        connection.feed(*[request[i : i + 100] for i in range(0, len(request), 100)])
        self.assertEqual(connection.http_status(), 101)
        return len(scans)

    def test_without_autobahns_buffer(self) -> None:
        """With the internal buffer unavailable, the limit still holds through Autobahn's own parser."""
        self.patch(_io, "FAST_PATH", False)
        connection = Connection(request=None, max_handshake_size=4096)
        for _ in range(3):
            connection.feed(b"X: " + b"a" * 2000 + b"\r\n")
        self.assertEqual(connection.http_status(), 431)
        ok = Connection(request=None, max_handshake_size=4096)
        ok.feed(handshake("X-Pad: " + "p" * 3000))
        self.assertEqual(ok.http_status(), 101)


class FragmentLimitTests(unittest.SynchronousTestCase):
    """Finding 4: fragments cannot make a message cost more than its size."""

    def fragmented(self, message: bytes, count: int) -> bytes:
        """``message`` in ``count`` frames: all of it in the first, then empty continuations."""
        out = client_frame(message, fin=count == 1)
        for i in range(1, count):
            out += client_frame(b"", opcode=0x0, fin=i == count - 1)
        return out

    def test_too_many_fragments(self) -> None:
        """A message in more than max_fragments frames (default 256) is closed with 1008; 256 frames are fine."""
        connection = Connection()
        connection.feed(self.fragmented(ping(1), 256))
        self.assertEqual(said(connection), [("pong", 1)])
        connection.feed(self.fragmented(ping(2), 257))
        self.assertEqual(said(connection), [("close", 1008)])

    def test_memory_of_an_unfinished_message(self) -> None:
        """An unfinished message sent in 1-byte fragments holds about its own size, not 60 times more."""
        size = 30_000
        connection = Connection(max_fragments=size + 1, max_message_size=size, request_burst=size + 1)
        message = ping(1, size - 100)
        stream = client_frame(message[:1], fin=False) + b"".join(
            client_frame(message[i : i + 1], opcode=0x0, fin=False) for i in range(1, len(message))
        )
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        connection.feed(stream)
        held = tracemalloc.get_traced_memory()[0] - before
        self.assertEqual(said(connection), [])
        self.assertLess(held, 4 * size)

    def test_trickled_message_is_whole(self) -> None:
        """A large message that arrives a few bytes per read is answered once, whole."""
        connection = Connection()
        stream = client_frame(ping(1, 40_000)) + client_frame(ping(2))
        connection.feed(*[stream[i : i + 7] for i in range(0, len(stream), 7)])
        self.assertEqual(said(connection), [("pong", 1), ("pong", 2)])


class FailedHelloTests(unittest.SynchronousTestCase):
    """Finding 5: refused tokens close the connection after a few, and are budgeted per address."""

    def test_closed_after_max_failed_hellos(self) -> None:
        """The fifth refused token (max_failed_hellos) on a connection closes it with 4003."""
        connection = Connection(app=strict())
        connection.feed(*[hello(i, "wrong") for i in range(1, 6)], hello(6, "secret"))
        self.assertEqual(
            said(connection),
            [("error", ErrorCode.AuthenticationFailed, i) for i in range(1, 6)] + [("close", 4003)],
        )
        self.assertIsNone(connection.session.principal)

    def test_address_budget_is_shared(self) -> None:
        """Connections from one address share a budget of refused tokens; once spent, a token is not even checked."""
        app = strict(address_failed_hellos=3, address_failed_hello_rate=0.1, exempt_addresses=())
        first, second = Connection(app=app, host="192.0.2.1"), Connection(app=app, host="192.0.2.1")
        first.feed(hello(1, "wrong"), hello(2, "wrong"))
        second.feed(hello(1, "wrong"))
        said(first), said(second)
        third = Connection(app=app, host="192.0.2.1")
        third.feed(hello(1, "secret"))
        self.assertEqual(said(third), [("close", 4003)])
        anonymous = Connection(app=app, host="192.0.2.1")
        anonymous.feed(hello(1))
        self.assertEqual(said(anonymous), [("welcome", 1)])
        elsewhere = Connection(app=app, host="198.51.100.1")
        elsewhere.feed(hello(1, "secret"))
        self.assertEqual(said(elsewhere), [("welcome", 1)])
        app.clock.advance(10)  # one refused token regained
        later = Connection(app=app, host="192.0.2.1")
        later.feed(hello(1, "secret"))
        self.assertEqual(said(later), [("welcome", 1)])

    def test_one_bounded_log_line_per_closed_connection(self) -> None:
        """Each connection closed for refused tokens logs one line, and a flood of them a bounded number."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        app = strict()
        for _ in range(30):
            Connection(app=app).feed(*[hello(i, "wrong") for i in range(1, 6)])
        lines = [e for e in warnings(observer) if "failed Hellos" in formatEvent(e)]
        self.assertEqual(len(lines), app.limits.log.lines)
        app.clock.advance(app.limits.log.interval)
        self.assertIn("Suppressed 20 similar lines", formatEvent(warnings(observer)[-1]))


class ConnectionLimitTests(unittest.SynchronousTestCase):
    """Finding 6: silent sockets count apart from max_connections, and each address has a limit."""

    def test_silent_sockets_do_not_lock_clients_out(self) -> None:
        """Sockets still in their handshake do not count against max_connections."""
        app = node_app(max_connections=2)
        for _ in range(10):
            Connection(app=app, request=None)
        Connection(app=app)
        Connection(app=app)
        third = Connection(app=app, request=None)
        third.feed(handshake())
        self.assertEqual(third.http_status(), 503)

    def test_per_address(self) -> None:
        """Past max_connections_per_address from one address, a new connection gets HTTP 503 at once."""
        app = node_app(max_connections_per_address=3, exempt_addresses=())
        mine = [Connection(app=app, host="192.0.2.1"), Connection(app=app, host="192.0.2.1", request=None),
                Connection(app=app, host="192.0.2.1", request=None)]
        refused = Connection(app=app, host="192.0.2.1", request=None)
        self.assertEqual(refused.http_status(), 503)
        self.assertTrue(refused.transport.disconnecting)
        refused.lose()
        Connection(app=app, host="198.51.100.1")  # another address
        mine[0].lose()
        Connection(app=app, host="192.0.2.1")

    def test_loopback_is_exempt_by_default(self) -> None:
        """Connections from loopback (a local reverse proxy) are not limited per address unless configured."""
        app = node_app()
        for _ in range(app.config.max_connections_per_address + 5):
            Connection(app=app)

    def test_max_handshaking_replaces_the_oldest(self) -> None:
        """Past max_handshaking, a new connection takes the place of the oldest one still in its handshake."""
        app = node_app(max_handshaking=3)
        silent = [Connection(app=app, request=None) for _ in range(3)]
        app.clock.advance(HANDSHAKE_GRACE)
        newest = Connection(app=app, request=None)
        self.assertEqual(silent[0].http_status(), 503)
        self.assertTrue(silent[0].transport.disconnecting)
        self.assertFalse(silent[1].transport.disconnecting)
        newest.feed(handshake())
        self.assertEqual(newest.http_status(), 101)


    def test_storm_is_not_refused(self) -> None:
        """Past max_handshaking, connections all younger than the grace are taken beside them, up to twice the
        bound: a storm of clients coming back is not refused because the node has not read their requests yet."""
        app = node_app(max_handshaking=3)
        storm = [Connection(app=app, request=None) for _ in range(6)]
        self.assertFalse(any(c.transport.disconnecting for c in storm))
        seventh = Connection(app=app, request=None)
        self.assertEqual(storm[0].http_status(), 503, "past twice the bound, the oldest goes")
        for connection in storm[1:] + [seventh]:
            connection.feed(handshake())
            self.assertEqual(connection.http_status(), 101)

    def test_grace_unit(self) -> None:
        """Admission: the oldest is replaced once it is past the grace, or past twice the bound."""
        admission = Admission(max_handshaking=2, grace=1.0)
        self.assertEqual([admission.connect(c, None, 0.0) for c in "abcd"], [(True, None)] * 4)
        self.assertEqual(admission.connect("e", None, 0.5), (True, "a"))
        admission.opened("b")
        self.assertEqual(admission.connect("f", None, 2.0), (True, "c"))
        self.assertEqual(list(admission.handshaking), ["d", "e", "f"])


class RequestRateTests(unittest.SynchronousTestCase):
    """A session's requests are budgeted: RateLimited past the rate, then a close if it goes on."""

    def test_over_the_rate(self) -> None:
        """Past request_burst at once, requests get Error RateLimited with their ids; the rate refills."""
        connection = Connection(request_rate=10, request_burst=5)
        connection.feed(frames(*[ping(i) for i in range(1, 9)]))
        self.assertEqual(
            said(connection),
            [("pong", i) for i in range(1, 6)] + [("error", ErrorCode.RateLimited, i) for i in range(6, 9)],
        )
        connection.clock.advance(1)
        connection.feed(frames(ping(9)))
        self.assertEqual(said(connection), [("pong", 9)])

    def test_defaults(self) -> None:
        """With a configuration file a session may send 2000 requests at once; in development mode, any number."""
        configured = Connection(app=strict())
        configured.feed(frames(*[ping(i) for i in range(1, 2002)]))
        self.assertEqual(said(configured)[-2:], [("pong", 2000), ("error", ErrorCode.RateLimited, 2001)])
        development = Connection()
        development.feed(frames(*[ping(i) for i in range(1, 5002)]))
        self.assertEqual(said(development)[-1], ("pong", 5001))

    def test_persistent_excess_closes(self) -> None:
        """A session that stays over its rate by more than its burst is closed with 4004."""
        connection = Connection(request_rate=10, request_burst=5)
        connection.feed(frames(*[ping(i) for i in range(1, 30)]))
        self.assertEqual(
            said(connection),
            [("pong", i) for i in range(1, 6)] + [("error", ErrorCode.RateLimited, i) for i in range(6, 11)]
            + [("close", 4004)],
        )

    def test_each_frame_of_a_message_counts(self) -> None:
        """Each frame of a fragmented message costs a request; a message one of whose frames was over is refused."""
        connection = Connection(request_rate=10, request_burst=5)
        message = ping(1)
        connection.feed(client_frame(message[:10], fin=False), client_frame(message[10:], opcode=0x0))
        connection.feed(client_frame(b"p", opcode=0x9))  # WebSocket pings are not counted
        connection.feed(frames(ping(2), ping(3)))
        connection.feed(client_frame(message[:10], fin=False), client_frame(message[10:], opcode=0x0))
        self.assertEqual(said(connection), [("pong", 1), ("ws", 0xA), ("pong", 2), ("pong", 3),
                                            ("error", ErrorCode.RateLimited, 1)])


class ChannelLimitTests(unittest.SynchronousTestCase):
    def test_max_channels(self) -> None:
        """A Subscribe that would make a channel past max_channels gets TooManySubscriptions; existing ones work."""
        app = node_app(max_channels=2)
        first, second = Connection(app=app), Connection(app=app)
        first.feed(hello(1), frames(*[encode(Opcode.Subscribe, request_id=i, channel=c)
                                      for i, c in ((2, "a"), (3, "b"), (4, "c"))]))
        self.assertEqual(said(first), [("welcome", 1), ("ack", 2), ("ack", 3),
                                       ("error", ErrorCode.TooManySubscriptions, 4)])
        second.feed(hello(1), frames(encode(Opcode.Subscribe, request_id=2, channel="a")))
        self.assertEqual(said(second), [("welcome", 1), ("ack", 2)])
        first.feed(frames(encode(Opcode.Unsubscribe, request_id=5, channel="b"),
                          encode(Opcode.Subscribe, request_id=6, channel="c")))
        self.assertEqual(said(first), [("ack", 5), ("ack", 6)])
        self.assertEqual(set(app.registry.channels), {"a", "c"})


class DevelopmentOriginTests(unittest.SynchronousTestCase):
    def status(self, app, *headers: str) -> int:
        connection = Connection(app=app, request=None)
        connection.feed(handshake(*headers))
        return connection.http_status()

    def test_loopback_pages_only(self) -> None:
        """In development mode only pages from this machine, and clients without an Origin, may connect."""
        app = node_app()
        for origin in ("http://localhost:3000", "https://localhost", "http://127.0.0.1:8080", "http://[::1]:5173"):
            self.assertEqual(self.status(app, f"Origin: {origin}"), 101, origin)
        self.assertEqual(self.status(app), 101)
        for origin in ("https://evil.example.com", "http://localhost.evil.example.com", "null",
                       "http://127.0.0.1.nip.io", "file:///tmp/x.html"):
            self.assertEqual(self.status(app, f"Origin: {origin}"), 400, origin)

    def test_configured_origins_win(self) -> None:
        """allowed_origins, when given, replaces the loopback default; a configuration file defaults to any."""
        listed = node_app(allowed_origins=("https://app.example.com:443",))
        self.assertEqual(self.status(listed, "Origin: https://app.example.com"), 101)
        self.assertEqual(self.status(listed, "Origin: http://localhost:3000"), 400)
        configured = strict()
        self.assertEqual(self.status(configured, "Origin: https://anything.example.com"), 101)


class HostileLogTests(unittest.SynchronousTestCase):
    def test_violations_log_a_bounded_number_of_lines(self) -> None:
        """Forty connections breaking the protocol log a bounded number of lines, then a summary."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        app = node_app()
        for _ in range(40):
            connection = Connection(app=app)
            connection.feed(client_frame(ping(1), masked=False))
            self.assertEqual(said(connection), [("close", 1002)])
            connection.lose()
        lines = warnings(observer)
        self.assertLessEqual(len(lines), 3 * app.limits.log.lines)
        app.clock.advance(app.limits.log.interval)
        self.assertTrue(any("Suppressed" in e["log_format"] for e in warnings(observer)))
