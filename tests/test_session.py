"""A session's lifecycle machine, its hello timer and its output, without sockets."""

from __future__ import annotations

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from meshd._io import EndOfTurn, Outlet
from meshd.codec import Opcode, encode
from meshd.constants import CLOSE_GOING_AWAY, CLOSE_HELLO_TIMEOUT, CLOSE_SLOW_CONSUMER
from meshd.events import Event
from meshd.session import AUTHENTICATING, CLOSED, CLOSING, CONNECTED, WELCOMED, Segment, Session


class WebSocketShell:
    """What a Session needs of its Autobahn protocol: its state and sendClose (not the thing under test)."""

    def __init__(self) -> None:
        self.state = WebSocketProtocol.STATE_OPEN
        self.closes: list[tuple[int, str]] = []

    def sendClose(self, code, reason) -> None:
        self.closes.append((code, reason))
        self.state = WebSocketProtocol.STATE_CLOSING


def make(hello_timeout: float = 0, limit: int = 1 << 20):
    clock = Clock()
    shell = WebSocketShell()
    transport = StringTransport()
    outlet = Outlet(transport, EndOfTurn(clock), limit, lambda: None)
    session = Session(shell, outlet, clock=clock, hello_timeout=hello_timeout)
    return session, shell, transport, clock


class LifecycleTests(unittest.SynchronousTestCase):
    def test_anonymous_welcome(self) -> None:
        """A Hello without a token welcomes the session at once, as anonymous, and stops the hello timer."""
        session, shell, _t, clock = make(hello_timeout=1)
        self.assertEqual(session.phase, CONNECTED)
        session.lifecycle.welcome(None, False)
        self.assertEqual((session.phase, session.helloed, session.authenticated), (WELCOMED, True, False))
        clock.advance(10)
        self.assertEqual(shell.closes, [])

    def test_token_check(self) -> None:
        """While a token is checked the session is authenticating; a refusal lets the client try again."""
        session, _shell, _t, _clock = make()
        session.lifecycle.hello_started()
        self.assertEqual((session.phase, session.hello_pending), (AUTHENTICATING, True))
        session.lifecycle.hello_refused()
        self.assertEqual(session.phase, CONNECTED)
        session.lifecycle.hello_started()
        session.lifecycle.welcome("alice", True)
        self.assertEqual((session.phase, session.principal, session.batch, session.authenticated),
                         (WELCOMED, "alice", True, True))

    def test_hello_timeout(self) -> None:
        """No Welcome within hello_timeout closes the session with 4001, also while a token is being checked."""
        for check in (False, True):
            session, shell, _t, clock = make(hello_timeout=2.5)
            if check:
                session.lifecycle.hello_started()
            clock.advance(2.499)
            self.assertEqual(shell.closes, [])
            clock.advance(0.001)
            self.assertEqual(shell.closes, [(CLOSE_HELLO_TIMEOUT, "no Hello in time")])
            self.assertEqual((session.phase, session.close_code), (CLOSING, CLOSE_HELLO_TIMEOUT))
            session.lifecycle.welcome("late", False)  # the check finishing after the close changes nothing
            self.assertEqual((session.phase, session.principal), (CLOSING, None))

    def test_lost_stops_the_timer(self) -> None:
        """A session whose connection is gone has no timer left."""
        session, shell, _t, clock = make(hello_timeout=1)
        session.lifecycle.lost()
        self.assertEqual(session.phase, CLOSED)
        self.assertEqual(clock.getDelayedCalls(), [])
        session.lifecycle.lost()
        self.assertEqual(session.phase, CLOSED)

    def test_close(self) -> None:
        """The node closing a session sends the code once."""
        session, shell, _t, _clock = make()
        session.lifecycle.welcome(None, False)
        session.lifecycle.close(CLOSE_GOING_AWAY, "node shutting down")
        session.lifecycle.close(CLOSE_GOING_AWAY, "node shutting down")
        self.assertEqual(shell.closes, [(CLOSE_GOING_AWAY, "node shutting down")])

    def test_overflow(self) -> None:
        """A client that stops reading past the limit is closed with 4002 and sent nothing more."""
        wire = Event(channel="c", payload=b"x" * 300).wire
        session, shell, transport, clock = make(limit=3 * len(wire))
        session.lifecycle.welcome(None, False)
        session.outlet.pauseProducing()
        clock.advance(0)
        sent = [session.send(wire) for _ in range(5)]
        self.assertEqual(sent, [True, True, True, False, False])
        self.assertEqual(shell.closes, [(CLOSE_SLOW_CONSUMER, "slow consumer: send buffer full")])
        self.assertTrue(session.overflowed)
        clock.advance(0)
        self.assertEqual(transport.value(), b"")


class BatchQueueTests(unittest.SynchronousTestCase):
    def test_queue_goes_before_other_frames(self) -> None:
        """Queued channel events are sent, as one Batch, before a frame sent to the session after them."""
        from meshd.codec import decode, unpack_batch

        session, _shell, transport, clock = make()
        session.lifecycle.welcome(None, True)
        segment = Segment(Event(channel="c", payload=b"0"))
        session.queue.append(segment)
        segment.events += [Event(channel="c", payload=b"%d" % i) for i in (1, 2)]
        session.send_frame(encode(Opcode.Ack, request_id=5))
        self.assertFalse(segment.open, "nothing joins a segment once something followed it")
        clock.advance(0)
        data = transport.value()
        messages = []
        while data:  # server frames: unmasked, short
            n = data[1] if data[1] < 126 else int.from_bytes(data[2:4], "big")
            head = 2 if data[1] < 126 else 4
            messages.append(decode(data[head : head + n]))
            data = data[head + n :]
        self.assertEqual([m.opcode for m in messages], [Opcode.Batch, Opcode.Ack])
        self.assertEqual([m.payload for m in unpack_batch(messages[0])], [b"0", b"1", b"2"])

    def test_shared_frames(self) -> None:
        """Sessions with the same queued segments share one encoding of their Batch frame, and count their events."""
        from meshd.metrics import Metrics

        shared: dict = {}
        metrics = Metrics()
        sessions = [make()[0] for _ in range(3)]
        segment = Segment(Event(channel="c", payload=b"0"))
        segment.events.append(Event(channel="c", payload=b"1"))
        for s in sessions:
            s.metrics = metrics
            s.lifecycle.welcome(None, True)
            s.queue.append(segment)
            s.coalesce(shared)
        [(key, (messages, count))] = shared.items()
        self.assertEqual((key, count), (segment, 2))
        written = [s.outlet._pending[0] for s in sessions]
        self.assertTrue(all(w is messages[0] for w in written))
        self.assertEqual(metrics.deliveries, 6)
