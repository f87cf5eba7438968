"""Registry, permissions and authentication, without sockets."""

from __future__ import annotations

import hashlib

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from meshd.auth import DevelopmentAuthenticator, TokenAuthenticator, TokensOrJWT, looks_like_jwt
from meshd.constants import CLOSE_TOKEN_EXPIRED
from meshd.codec import Watchable
from meshd.permissions import NO_GRANTS, Grants, Policy, Rule, escape_glob
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

    def test_principal_in_rules(self) -> None:
        """#{sub} stands for the principal, matched literally; anonymous sessions match no such rule."""
        policy = Policy((Rule("user.#{sub}.*", authenticated=frozenset({"subscribe"})),))
        self.assertTrue(policy.allows("subscribe", "user.alice.inbox", True, "alice"))
        self.assertFalse(policy.allows("subscribe", "user.bob.inbox", True, "alice"))
        self.assertFalse(policy.allows("subscribe", "user.alice.inbox", False, None))
        for principal in ("*", "a?c", "[ab]", "al*"):
            self.assertFalse(policy.allows("subscribe", "user.alice.inbox", True, principal), principal)
            self.assertTrue(policy.allows("subscribe", f"user.{principal}.inbox", True, principal), principal)
        self.assertEqual(escape_glob("a*b?[c]"), "a[*]b[?][[]c]")

    def test_grants_add_to_rules(self) -> None:
        """A session's grants allow what they name, per action, on top of the rules."""
        policy = Policy((Rule("public.*", anonymous=frozenset({"subscribe"})),))
        grants = Grants.from_claim({"subscribe": ["team.*"], "watch": ["doc/7"]})
        self.assertTrue(policy.allows("subscribe", "public.a", True, "bob", grants))
        self.assertTrue(policy.allows("subscribe", "team.x", True, "bob", grants))
        self.assertFalse(policy.allows("publish", "team.x", True, "bob", grants))
        self.assertTrue(policy.allows("watch", "doc/7", True, "bob", grants))
        self.assertFalse(policy.allows("subscribe", "team.x", True, "bob", NO_GRANTS))

    def test_grants_claim_shape(self) -> None:
        """Only an object of action lists of non-empty strings is a valid meshd claim."""
        self.assertIs(Grants.from_claim(None), NO_GRANTS)
        for bad in ([], "x", {"delete": ["a"]}, {"subscribe": "a"}, {"subscribe": [""]}, {"publish": [1]}):
            self.assertRaises(ValueError, Grants.from_claim, bad)


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

    def test_jwt_form(self) -> None:
        """A JWT is three dot-separated base64url parts whose first is a JSON header with alg."""
        header = "eyJhbGciOiJIUzI1NiJ9"  # {"alg":"HS256"}
        self.assertTrue(looks_like_jwt(f"{header}.e30.sig"))
        for token in ("plain", "a.b.c", f"{header}.e30", f"{header}..sig", "e30.e30.sig", "!!.e30.x"):
            self.assertFalse(looks_like_jwt(token), token)

    def test_tokens_or_jwt(self) -> None:
        """A token of the JWT form goes to the JWT check only; any other to the static table only."""
        header = "eyJhbGciOiJIUzI1NiJ9"
        jwt_like = f"{header}.e30.sig"
        auth = TokensOrJWT(TokenAuthenticator({"alice": "a-secret", "bob": jwt_like}), TokenAuthenticator({"carol": jwt_like}))
        self.assertEqual(auth.authenticate("a-secret"), "alice")
        self.assertEqual(auth.authenticate(jwt_like), "carol")


class ExpiryTimerTests(unittest.SynchronousTestCase):
    def test_expiry_timer(self) -> None:
        """The machine closes a welcomed session with 4005 at its expiry; refreshed moves it; lost stops it."""
        clock = Clock()
        ws = FakeWebSocket()
        session = session_of(ws, clock)
        session.lifecycle.welcome("alice", False, 10.0, Grants(subscribe=("a",)))
        self.assertEqual((session.expires, session.grants.subscribe), (10.0, ("a",)))
        clock.advance(5)
        session.lifecycle.refreshed(20.0, NO_GRANTS)
        self.assertEqual((session.expires, session.grants), (20.0, NO_GRANTS))
        clock.advance(14.9)
        self.assertIsNone(ws.closed_with)
        clock.advance(0.1)
        self.assertEqual((ws.closed_with, session.close_code), (CLOSE_TOKEN_EXPIRED, CLOSE_TOKEN_EXPIRED))
        session.lifecycle.refreshed(99.0, NO_GRANTS)  # too late: changes nothing
        self.assertIsNone(session.expires)
        other = session_of(FakeWebSocket(), clock)
        other.lifecycle.welcome("bob", False, clock.seconds() + 5)
        other.lifecycle.lost()
        self.assertEqual(clock.getDelayedCalls(), [])
