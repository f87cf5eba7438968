"""Built-in and user opcode handlers, permissions and cleanup, through real clients."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred
from zope.interface import implementer

from meshd.auth import IAuthenticator

from meshd.client import MeshError
from meshd.codec import ErrorCode, EventType, Opcode, ProtocolError, Watchable, encode
from meshd.config import Config
from meshd.permissions import Rule

from .support import NodeTestCase, payloads, raw_client, sleep

RULES = (
    Rule("public.*", anonymous=frozenset({"subscribe"}), authenticated=frozenset({"subscribe", "publish"})),
    Rule("open", anonymous=frozenset({"subscribe", "publish"})),
    Rule("document/*", authenticated=frozenset({"watch"})),
)
SECURED = Config(source=Path("test.toml"), tokens={"alice": "secret"}, rules=RULES)


class HelloTests(NodeTestCase):
    async def test_welcome(self) -> None:
        """Welcome names the session, the node, the version and the limits; anonymous has no principal."""
        await self.start_node()
        c = await self.client()
        self.assertEqual(c.node_id, self.app.node_id)
        self.assertIn(c.session_id, self.app.registry.sessions)
        self.assertIsNone(c.principal)
        self.assertEqual(c.max_message_size, self.app.config.max_message_size)

    async def test_token(self) -> None:
        """A valid token authenticates the session as its principal; a wrong one is refused."""
        await self.start_node(SECURED)
        c = await self.client(token="secret")
        self.assertEqual(c.principal, "alice")
        self.assertTrue(self.app.registry.sessions[c.session_id].authenticated)
        bad = await self.client(hello=False)
        e = await self.assertFailure(bad.hello("wrong"), MeshError)
        self.assertEqual(e.code, ErrorCode.AuthenticationFailed)
        await bad.hello(None)  # still free to continue anonymously
        self.assertIsNone(bad.principal)

    async def test_development_accepts_any_token(self) -> None:
        """In development mode any token is accepted, as principal "dev"."""
        await self.start_node()
        c = await self.client(token="whatever")
        self.assertEqual(c.principal, "dev")

    async def test_twice_and_versions(self) -> None:
        """A second Hello and an unknown protocol version are refused with their codes."""
        await self.start_node()
        c = await self.client(hello=False)
        e = await self.assertFailure(c.request(Opcode.Hello, version=2), MeshError)
        self.assertEqual(e.code, ErrorCode.UnsupportedVersion)
        await c.hello()
        e = await self.assertFailure(c.hello(), MeshError)
        self.assertEqual(e.code, ErrorCode.AlreadyHello)

    async def test_ping_before_hello(self) -> None:
        """Ping works before Hello and echoes its payload in the Pong."""
        await self.start_node()
        c = await self.client(hello=False)
        pong = await c.ping(b"abc")
        self.assertEqual((pong.opcode, pong.payload), (Opcode.Pong, b"abc"))

    async def test_hello_timeout(self) -> None:
        """A connection that does not say Hello in time is closed with 4001."""
        await self.start_node(Config(hello_timeout=0.2))
        c = await self.client(hello=False)
        closed = await c.when_closed().addTimeout(5, self._reactor())
        self.assertEqual(closed.code, 4001)
        self.assertEqual(self.app.registry.sessions, {})

    async def test_no_ack_for_request_id_zero(self) -> None:
        """A request with request id 0 gets no Ack; only the Pong that follows arrives."""
        await self.start_node()
        raw = await raw_client(self, self.url)
        raw.send(encode(Opcode.Hello, request_id=1, version=1))
        raw.send(encode(Opcode.Subscribe, channel="a"))
        raw.send(encode(Opcode.Ping, request_id=2))
        raw.send(encode(Opcode.Ping, request_id=3))  # an Ack would come before this Pong
        frames = await raw.wait_frames(3)
        self.assertEqual([(f.opcode, f.request_id) for f in frames],
                         [(Opcode.Welcome, 1), (Opcode.Pong, 2), (Opcode.Pong, 3)])
        self.assertEqual(len(self.app.registry.subscribers("a")), 1)

    def _reactor(self):
        from twisted.internet import reactor

        return reactor


class PermissionTests(NodeTestCase):
    async def test_subscribe_rules(self) -> None:
        """Subscriptions follow the rules; what no rule grants is denied with the request id."""
        await self.start_node(SECURED)
        anon = await self.client()
        await anon.subscribe("public.news")
        e = await self.assertFailure(anon.subscribe("private.x"), MeshError)
        self.assertEqual(e.code, ErrorCode.PermissionDenied)
        self.assertNotEqual(e.request_id, 0)
        self.assertEqual(set(self.app.registry.channels), {"public.news"})

    async def test_denied_publish_delivers_nothing(self) -> None:
        """An anonymous publish where only authenticated sessions may publish reaches nobody."""
        await self.start_node(SECURED)
        anon, alice, sub = await self.client(), await self.client("secret"), await self.client()
        await sub.subscribe("public.news")
        e = await self.assertFailure(anon.publish("public.news", b"spam"), MeshError)
        self.assertEqual(e.code, ErrorCode.PermissionDenied)
        await alice.publish("public.news", b"real")
        await anon.publish("open", b"fine")  # a rule lets anonymous publish here
        await self.settle(sub)
        self.assertEqual(payloads(sub.received), [b"real"])

    async def test_watch_rules(self) -> None:
        """Watch rules match "kind/id"; anonymous sessions may not watch documents here."""
        await self.start_node(SECURED)
        anon, alice = await self.client(), await self.client("secret")
        e = await self.assertFailure(anon.watch("document", "1"), MeshError)
        self.assertEqual(e.code, ErrorCode.PermissionDenied)
        await alice.watch("document", "1")
        e = await self.assertFailure(alice.watch("invoice", "1"), MeshError)
        self.assertEqual(e.code, ErrorCode.PermissionDenied)
        self.assertEqual(list(self.app.registry.watchers), [Watchable("document", "1")])

    async def test_watch_target_is_unambiguous(self) -> None:
        """A watchable kind with a slash is refused, so that a "KIND/ID" target names one watchable."""
        await self.start_node(Config(source=Path("test.toml"), rules=(
            Rule("public/*", anonymous=frozenset({"watch"})),
        )))
        anon = await self.client()
        e = await self.assertFailure(anon.watch("public/doc", "1"), MeshError)
        self.assertEqual(e.code, ErrorCode.InvalidWatchable)
        await anon.watch("public", "doc/1")  # a slash in the id is fine
        self.assertEqual(list(self.app.registry.watchers), [Watchable("public", "doc/1")])

    async def test_development_allows_everything(self) -> None:
        """Without a configuration file every operation is allowed."""
        await self.start_node()
        c = await self.client()
        await c.subscribe("anything.at.all")
        await c.publish("anything.at.all", b"x")
        await c.watch("any", "thing")


class UserHandlerTests(NodeTestCase):
    async def test_user_opcodes(self) -> None:
        """User handlers answer with Ack payloads, ProtocolErrors, or InternalError when they crash."""
        app = await self.start_node()
        calls = []

        def echo(request):
            calls.append(request.session.id)
            return b"echo:" + (request.message.payload or b"")

        def picky(request):
            raise ProtocolError(ErrorCode.InvalidArgument, "no thanks")

        def broken(request):
            raise ZeroDivisionError("bug")

        def later(request):
            d = Deferred()
            app.clock.callLater(0.01, d.callback, b"done")
            return d

        for offset, handler in enumerate((echo, picky, broken, later)):
            app.handlers.register(Opcode.UserFirst + offset, handler)
        c = await self.client()
        ack = await c.request(Opcode.UserFirst, payload=b"hi")
        self.assertEqual((ack.opcode, ack.payload, calls), (Opcode.Ack, b"echo:hi", [c.session_id]))
        e = await self.assertFailure(c.request(Opcode.UserFirst + 1), MeshError)
        self.assertEqual((e.code, e.message), (ErrorCode.InvalidArgument, "no thanks"))
        e = await self.assertFailure(c.request(Opcode.UserFirst + 2), MeshError)
        self.assertEqual(e.code, ErrorCode.InternalError)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual((await c.request(Opcode.UserFirst + 3)).payload, b"done")
        await c.ping()  # the session is still fine

    async def test_coroutines_and_bad_results(self) -> None:
        """async def handlers run; bad results and bad error codes become InternalError."""
        app = await self.start_node()

        async def coroutine(request):
            await sleep(0.01)
            return b"awaited"

        def returns_text(request):
            return "not bytes"

        def bad_code(request):
            raise ProtocolError(70000, "out of range")

        def later_text(request):
            d = Deferred()
            app.clock.callLater(0.01, d.callback, "late text")
            return d

        for offset, handler in enumerate((coroutine, returns_text, bad_code, later_text)):
            app.handlers.register(3000 + offset, handler)
        c = await self.client()
        self.assertEqual((await c.request(3000)).payload, b"awaited")
        for opcode in (3001, 3002, 3003):
            e = await self.assertFailure(c.request(opcode), MeshError)
            self.assertEqual(e.code, ErrorCode.InternalError, opcode)
        self.assertEqual(len(self.flushLoggedErrors(TypeError, ProtocolError)), 3)
        await c.ping()

    async def test_user_handler_needs_hello(self) -> None:
        """A user opcode before Hello is refused unless registered with requires_hello=False."""
        app = await self.start_node()
        app.handlers.register(2000, lambda r: b"a")
        app.handlers.register(2001, lambda r: b"b", requires_hello=False)
        c = await self.client(hello=False)
        e = await self.assertFailure(c.request(2000), MeshError)
        self.assertEqual(e.code, ErrorCode.HelloRequired)
        self.assertEqual((await c.request(2001)).payload, b"b")

    def test_registration_rules(self) -> None:
        """Reserved opcodes, node-only opcodes and double registrations are refused."""
        from meshd.app import Application

        handlers = Application().handlers
        self.assertRaises(ValueError, handlers.register, 100, lambda r: None)
        self.assertRaises(ValueError, handlers.register, 500, lambda r: None, replace=True)
        self.assertRaises(ValueError, handlers.register, Opcode.Event, lambda r: None, replace=True)
        self.assertRaises(ValueError, handlers.register, Opcode.Subscribe, lambda r: None)
        self.assertRaises(ValueError, handlers.register, 70000, lambda r: None)
        handlers.register(1500, lambda r: None)
        self.assertRaises(ValueError, handlers.register, 1500, lambda r: None)
        handlers.register(1500, lambda r: b"x", replace=True)
        handlers.register(Opcode.Subscribe, lambda r: None, replace=True)


class AsyncAuthenticatorTests(NodeTestCase):
    async def start_with(self, answers: dict) -> list:
        pending: list[Deferred] = []

        @implementer(IAuthenticator)
        class Slow:
            def authenticate(self, token):
                d = Deferred()
                pending.append((token, d))
                return d

        await self.start_node(authenticator=Slow())
        return pending

    async def test_hello_pending(self) -> None:
        """While a Hello is being checked, another Hello is refused and requests need the Hello."""
        pending = await self.start_with({})
        c = await self.client(hello=False)
        welcome = c.hello("token")
        e = await self.assertFailure(c.hello("again"), MeshError)
        self.assertEqual(e.code, ErrorCode.AlreadyHello)
        e = await self.assertFailure(c.subscribe("x"), MeshError)
        self.assertEqual(e.code, ErrorCode.HelloRequired)
        self.assertEqual(len(pending), 1)
        pending[0][1].callback("carol")
        self.assertEqual((await welcome).principal, "carol")
        await c.subscribe("x")

    async def test_close_while_checking(self) -> None:
        """A session that leaves during its Hello is never admitted."""
        pending = await self.start_with({})
        c = await self.client(hello=False)
        c.hello("token").addErrback(lambda _: None)
        await c.ping()
        await c.close()
        pending[0][1].callback("dave")
        self.assertEqual((self.app.registry.sessions, self.app.registry.members), ({}, set()))

    async def test_bad_principal(self) -> None:
        """An authenticator that answers with a non-string is an InternalError; the session is not admitted."""
        pending = await self.start_with({})
        c = await self.client(hello=False)
        welcome = c.hello("token")
        await c.ping()
        pending[0][1].callback(42)
        e = await self.assertFailure(welcome, MeshError)
        self.assertEqual(e.code, ErrorCode.InternalError)
        self.flushLoggedErrors(TypeError)
        self.assertEqual(self.app.registry.members, set())
        second = c.hello("token")
        await c.ping()
        pending[1][1].callback("erin")
        self.assertEqual((await second).principal, "erin")


class IdempotenceTests(NodeTestCase):
    async def test_unsubscribe_and_unwatch_what_is_not_held(self) -> None:
        """Unsubscribe and Unwatch of something not held are acknowledged; Pong keeps an absent payload absent."""
        await self.start_node()
        c = await self.client()
        self.assertEqual((await c.unsubscribe("never")).opcode, Opcode.Ack)
        self.assertEqual((await c.unwatch("k", "never")).opcode, Opcode.Ack)
        self.assertIsNone((await c.request(Opcode.Ping)).payload)


class BurstTests(NodeTestCase):
    async def test_burst_to_a_reading_client(self) -> None:
        """A burst larger than max_send_buffer in one reactor turn does not close a client that reads."""
        app = await self.start_node()

        def burst(request):
            for i in range(30):
                request.state.clients.broadcast_to_channel(None, "big", bytes([i]) * 50_000)

        app.handlers.register(4000, burst)
        reader, trigger = await self.client(), await self.client()
        await reader.subscribe("big")
        await trigger.request(4000)
        for _ in range(200):
            if len(reader.received) == 30:
                break
            await sleep(0.02)
        self.assertEqual([e.payload[0] for e in reader.received], list(range(30)))
        self.assertIsNone(reader.closed_reason)
        self.assertEqual(app.metrics.slow_consumer_closes, 0)


class CleanupTests(NodeTestCase):
    async def test_disconnect_clears_every_index(self) -> None:
        """When a session ends, its subscriptions, watches and membership are gone."""
        await self.start_node()
        keep, leave = await self.client(), await self.client()
        await keep.subscribe("shared")
        for ch in ("shared", "only-mine", "also-mine"):
            await leave.subscribe(ch)
        await leave.watch("doc", "1")
        await keep.watch("doc", "2")
        await leave.close()
        registry = self.app.registry
        self.assertEqual(set(registry.sessions), {keep.session_id})
        self.assertEqual({s.id for s in registry.members}, {keep.session_id})
        self.assertEqual(set(registry.channels), {"shared"})
        self.assertEqual(set(registry.watchers), {Watchable("doc", "2")})
        late = await self.client()
        await late.publish("shared", b"after")
        await self.settle(keep)
        self.assertEqual(payloads(keep.received), [b"after"])

    async def test_abrupt_disconnect(self) -> None:
        """A connection dropped without a close handshake is cleaned up too."""
        await self.start_node()
        leave = await self.client()
        await leave.subscribe("x")
        await leave.watch("a", "b")
        leave._protocol.transport.abortConnection()
        await leave.when_closed()
        for _ in range(50):
            if not self.app.registry.sessions:
                break
            await sleep(0.02)
        registry = self.app.registry
        self.assertEqual((registry.sessions, registry.channels, registry.watchers, registry.members), ({}, {}, {}, set()))

    async def test_shutdown_closes_sessions(self) -> None:
        """Stopping the node closes every session with 4007 (a drain), after the events it was already sent."""
        app = await self.start_node()
        c = await self.client()
        app.state.broadcast_event(EventType.NodeEvent, None, None, b"last words")
        await app.stopService()  # in the same reactor turn as the event
        closed = await c.when_closed()
        self.assertEqual(closed.code, 4007)  # CLOSE_DRAINING
        self.assertEqual(payloads(c.received), [b"last words"])
