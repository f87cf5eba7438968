"""Registry, permissions and authentication, without sockets."""

from __future__ import annotations

import hashlib

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from meshd.auth import DevelopmentAuthenticator, TokenAuthenticator
from meshd.codec import Watchable
from meshd.permissions import Policy, Rule
from meshd.registry import Registry
from meshd._io import EndOfTurn, Outlet
from meshd.session import Session


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


def session_of(ws: FakeWebSocket, clock=None) -> Session:
    clock = clock or Clock()
    return Session(ws, Outlet(ws.transport, EndOfTurn(clock), 1 << 20, lambda: None), clock=clock)


class RegistryTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = Registry()
        self.a, self.b = session_of(FakeWebSocket()), session_of(FakeWebSocket())
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
        self.assertRaises(ValueError, self.registry.admit, session_of(FakeWebSocket()))


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
