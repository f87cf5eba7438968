"""meshd.client.ReconnectingClient against real nodes: in-process nodes, then real node processes (slow)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.trial import unittest

from meshd.client import (
    ConnectionClosed,
    MeshError,
    NotConnected,
    ReconnectingClient,
    StateChange,
    connect_reconnecting,
)
from meshd.codec import ErrorCode, Watchable
from meshd.config import Config
from meshd.constants import CLOSE_DISCONNECTED, CLOSE_DRAINING, CLOSE_HELLO_FAILURES, CLOSE_SLOW_CONSUMER

from .support import BIN, NodeProcess, NodeTestCase, env, refusing_port, sleep

FAST = lambda attempt: 0.05  # noqa: E731  a retry policy for tests


async def wait_for(test: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Poll the reactor until ``test()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.01)


class ReconnectTests(NodeTestCase):
    def reconnecting(self, urls=None, token=None, **options) -> ReconnectingClient:
        """A started client whose state changes collect in ``client.changes`` and events in ``client.received``."""
        options.setdefault("retry_policy", FAST)
        client = ReconnectingClient(urls or self.url, token, reactor=reactor, **options)
        client.changes = []  # type: ignore[attr-defined]
        client.received = []  # type: ignore[attr-defined]
        client.add_state_listener(client.changes.append)
        client.add_listener(client.received.append)
        client.startService()
        self.addCleanup(lambda: client.close().addTimeout(10, reactor))
        return client

    def session(self, client: ReconnectingClient, app=None):
        return (app or self.app).registry.get(client.session_id)

    def connects(self, client: ReconnectingClient) -> int:
        return [c.state for c in client.changes].count("connected")

    async def test_resubscribes_and_rewatches(self) -> None:
        """After the node closes the session, a new session holds the same channels and watches, and events flow again."""
        await self.start_node()
        client = self.reconnecting()
        stream = client.events()
        await client.when_connected().addTimeout(5, reactor)
        await client.subscribe("a")
        await client.subscribe("b")
        await client.watch("document", "42")
        await client.subscribe("gone")
        await client.unsubscribe("gone")
        first = client.session_id
        self.session(client).lifecycle.close(CLOSE_SLOW_CONSUMER, "slow consumer")
        await wait_for(lambda: self.connects(client) == 2, "the second connect")
        self.assertNotEqual(client.session_id, first)
        session = self.session(client)
        self.assertEqual(session.channels, {"a", "b"})
        self.assertEqual(session.watching, {Watchable("document", "42")})
        self.assertEqual(client.channels, ("a", "b"))
        publisher = await self.client()
        await publisher.publish("a", b"after")
        self.assertEqual((await stream.__anext__()).payload, b"after")
        states = [(c.state, c.code) for c in client.changes]
        self.assertEqual(states, [("connecting", None), ("connected", None), ("disconnected", CLOSE_SLOW_CONSUMER),
                                  ("connecting", None), ("connected", None)])
        self.assertTrue(client.changes[2].retry)
        self.assertEqual(client.changes[-1].welcome.session, client.session_id)

    async def test_dropped_connection(self) -> None:
        """A connection dropped without a close frame (1006) is reconnected and resubscribed too."""
        await self.start_node()
        client = self.reconnecting()
        await client.when_connected().addTimeout(5, reactor)
        await client.subscribe("a")
        self.session(client).protocol.transport.abortConnection()
        await wait_for(lambda: self.connects(client) == 2, "the second connect")
        self.assertEqual(client.changes[2].code, 1006)
        self.assertEqual(self.session(client).channels, {"a"})

    async def test_requests_while_disconnected_fail_fast(self) -> None:
        """Without a session, requests fail at once with NotConnected; unsubscribing still forgets the channel."""
        await self.start_node()
        client = self.reconnecting(retry_policy=lambda attempt: 30.0)
        await client.when_connected().addTimeout(5, reactor)
        await client.subscribe("a")
        pending = client.ping()
        self.session(client).lifecycle.close(CLOSE_SLOW_CONSUMER, "bye")
        with self.assertRaises(ConnectionClosed):
            await pending
        await wait_for(lambda: client.state == "disconnected", "the disconnect")
        with self.assertRaises(NotConnected) as caught:
            await client.subscribe("b")
        self.assertEqual(caught.exception.code, CLOSE_SLOW_CONSUMER)
        with self.assertRaises(NotConnected):
            client.publish("a", b"x", ack=False)
        with self.assertRaises(NotConnected):
            await client.unsubscribe("a")
        self.assertEqual(client.channels, ())

    async def test_token_callable_called_on_each_connect(self) -> None:
        """A token callable (here returning a Deferred, then a coroutine) is asked on every connect."""
        await self.start_node()
        calls: list = []

        def token():
            calls.append(1)
            if len(calls) == 1:
                return succeed("first")

            async def later() -> str:
                return "second"
            return later()

        client = self.reconnecting(token=token)
        await client.when_connected().addTimeout(5, reactor)
        self.assertEqual(client.client.principal, "dev")
        self.session(client).lifecycle.close(CLOSE_SLOW_CONSUMER, "bye")
        await wait_for(lambda: self.connects(client) == 2, "the second connect")
        self.assertEqual(len(calls), 2)

    async def test_draining_moves_to_the_next_url(self) -> None:
        """Close 4007 reconnects at once (not after the backoff) to the next URL."""
        first = await self.start_node()
        first_url = self.url
        second = await self.start_node()
        client = self.reconnecting([first_url, self.url], retry_policy=lambda attempt: 30.0)
        await client.when_connected().addTimeout(5, reactor)
        await client.subscribe("news")
        self.assertIsNotNone(self.session(client, first))
        self.session(client, first).lifecycle.close(CLOSE_DRAINING, "node draining: reconnect")
        await wait_for(lambda: self.connects(client) == 2, "the connect to the second node", timeout=3)
        self.assertEqual(client.url, self.url)
        self.assertEqual(self.session(client, second).channels, {"news"})
        self.assertEqual([c.url for c in client.changes if c.state == "connected"], [first_url, self.url])

    async def test_failed_attempts_try_the_next_url(self) -> None:
        """A URL that refuses connections is skipped for the next one; the failure is reported."""
        await self.start_node()
        dead = f"ws://127.0.0.1:{refusing_port(self)}"
        client = self.reconnecting([dead, self.url])
        await client.when_connected().addTimeout(5, reactor)
        self.assertEqual(client.url, self.url)
        states = [(c.state, c.url) for c in client.changes]
        self.assertEqual(states[:2], [("connecting", dead), ("disconnected", dead)])
        self.assertIsNotNone(client.changes[1].error)
        self.assertEqual(states[-1], ("connected", self.url))

    async def test_close_stops(self) -> None:
        """close() ends the session with 1000, reports closed, ends event streams and never reconnects."""
        await self.start_node()
        client = self.reconnecting()
        stream = client.events()
        await client.when_connected().addTimeout(5, reactor)
        await client.close().addTimeout(5, reactor)
        self.assertEqual([c.state for c in client.changes][-2:], ["disconnected", "closed"])
        self.assertEqual(client.changes[-2].code, 1000)
        self.assertIsNone(client.closed_reason)
        with self.assertRaises(StopAsyncIteration):
            await stream.__anext__()
        await sleep(0.2)
        self.assertEqual(self.app.registry.sessions, {})
        self.assertEqual(client.state, "closed")
        with self.assertRaises(NotConnected):
            await client.ping()
        with self.assertRaises(NotConnected):
            await client.when_connected()

    async def test_refused_token_stops(self) -> None:
        """A Hello refused with AuthenticationFailed stops the client: no retry loop."""
        await self.start_node(Config(source=Path("x.toml"), tokens={"a": "right"}))
        with self.assertRaises(MeshError) as caught:
            await connect_reconnecting(self.url, "wrong", reactor=reactor, retry_policy=FAST).addTimeout(5, reactor)
        self.assertEqual(caught.exception.code, ErrorCode.AuthenticationFailed)
        client = self.reconnecting(token="wrong")
        await client.when_closed().addTimeout(5, reactor)
        self.assertEqual([c.state for c in client.changes], ["connecting", "disconnected", "closed"])
        self.assertIsInstance(client.closed_reason, MeshError)
        self.assertFalse(client.changes[1].retry)

    async def test_too_many_failed_hellos_stops(self) -> None:
        """Close 4003 is not retried."""
        await self.start_node()
        client = self.reconnecting()
        await client.when_connected().addTimeout(5, reactor)
        self.session(client).lifecycle.close(CLOSE_HELLO_FAILURES, "too many failed Hellos")
        await client.when_closed().addTimeout(5, reactor)
        self.assertEqual(client.closed_reason.code, CLOSE_HELLO_FAILURES)
        self.assertEqual([c.state for c in client.changes][-2:], ["disconnected", "closed"])

    async def test_disconnected_by_the_server_stops(self) -> None:
        """Close 4006 (POST /api/disconnect) is not retried: the backend wants the client gone."""
        await self.start_node()
        client = self.reconnecting()
        await client.when_connected().addTimeout(5, reactor)
        self.session(client).lifecycle.close(CLOSE_DISCONNECTED, "disconnected by the server")
        await client.when_closed().addTimeout(5, reactor)
        self.assertEqual(client.closed_reason.code, CLOSE_DISCONNECTED)
        self.assertEqual([c.state for c in client.changes][-2:], ["disconnected", "closed"])
        self.assertFalse(client.changes[-2].retry)

    async def test_refused_again_after_reconnect(self) -> None:
        """A channel the node refuses on the new session is forgotten and reported in the connected change."""
        rules = [{"match": "open", "anonymous": ["subscribe"]}]
        from meshd.config import parse

        path = Path(self.mktemp() + ".toml")
        app = await self.start_node(parse({"rules": rules}, path))
        client = self.reconnecting()
        await client.when_connected().addTimeout(5, reactor)
        await client.subscribe("open")
        with self.assertRaises(MeshError):
            await client.subscribe("closed")
        self.assertEqual(client.channels, ("open",))
        self.session(client, app).lifecycle.close(CLOSE_SLOW_CONSUMER, "bye")
        await wait_for(lambda: self.connects(client) == 2, "the second connect")
        self.assertEqual(client.changes[-1].dropped, ())

    async def test_jwt_refresh(self) -> None:
        """With a token callable giving JWTs, Refresh is sent before exp and the session outlives its first token."""
        from .test_jwt import config, token

        tmp = Path(self.mktemp())
        tmp.mkdir(parents=True)
        await self.start_node(config(tmp, rules=({"match": "*", "authenticated": ["subscribe"]},)))
        tokens: list = []

        def fresh() -> str:
            tokens.append(token(lifetime=2))
            return tokens[-1]

        client = self.reconnecting(token=fresh, refresh_margin=60)
        await client.when_connected().addTimeout(5, reactor)
        await client.subscribe("x")
        session = client.session_id
        await sleep(2.5)
        self.assertEqual(client.session_id, session, "the session outlived its first token")
        self.assertGreaterEqual(len(tokens), 2)
        self.assertEqual([c.state for c in client.changes], ["connecting", "connected"])


# -- real node processes ----------------------------------------------------------------------


class NodeRestart:
    """A ``twistd -n meshd`` process that can be killed and started again on the same port."""

    def __init__(self, testcase: unittest.TestCase) -> None:
        self.cwd = Path(testcase.mktemp()).resolve()
        self.cwd.mkdir(parents=True)
        self.node = self.start()
        testcase.addCleanup(lambda: self.node.stop())
        self.port = self.node.port

    def start(self, port: int = 0) -> NodeProcess:
        log = self.cwd / "node.log"
        if log.exists():
            log.rename(self.cwd / f"node.{time.monotonic_ns()}.log")
        # NodeProcess listens on a new port (tcp:0) anyway; a restart also listens on the old one.
        extra = ("--listen", f"tcp:{port}:interface=127.0.0.1") if port else ()
        node = NodeProcess(*extra, cwd=self.cwd)
        node.wait_listening()
        return node

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def restart(self, kill: bool = True) -> None:
        """Stop the node (SIGKILL, or SIGTERM: drain with 4007), then start it again on the same port."""
        if kill:
            self.node.proc.kill()
        else:
            self.node.proc.terminate()
        self.node.proc.wait(20)
        self.node.stop()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.node = self.start(self.port)
                return
            except AssertionError:  # the port may linger a moment
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def publish(url: str, channel: str, text: str) -> None:
    result = subprocess.run([str(BIN / "meshctl"), "pub", channel, text, "--url", url], env=env(),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
class ProcessRestartTests(unittest.TestCase):
    async def test_twisted_client_resumes_after_restart(self) -> None:
        """A node killed and started again on the same port: the Twisted client resubscribes and gets events."""
        node = NodeRestart(self)
        client = ReconnectingClient(node.url, reactor=reactor, retry_policy=lambda attempt: 0.1)
        changes: list[StateChange] = []
        client.add_state_listener(changes.append)
        stream = client.events()
        client.startService()
        self.addCleanup(lambda: client.close().addTimeout(10, reactor))
        await client.when_connected().addTimeout(10, reactor)
        await client.subscribe("chat")
        await ensureDeferred(_in_thread(node.restart))
        await wait_for(lambda: [c.state for c in changes].count("connected") == 2, "the reconnect", timeout=20)
        await ensureDeferred(_in_thread(publish, node.url, "chat", "after the restart"))
        event = await Deferred.fromCoroutine(stream.__anext__()).addTimeout(10, reactor)
        self.assertEqual(event.payload, b"after the restart")
        self.assertIn(("disconnected", 1006), [(c.state, c.code) for c in changes])


async def _in_thread(f, *args):
    from twisted.internet.threads import deferToThread

    return await deferToThread(f, *args)


class Meshctl:
    """A meshctl running in the background; a thread collects its standard error lines."""

    def __init__(self, *args: str) -> None:
        import queue
        import threading

        self.proc = subprocess.Popen([str(BIN / "meshctl"), *args], env=env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.err = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put("")

    def wait_status(self, words: str, timeout: float = 20.0) -> str:
        """The first (not yet read) line of standard error holding ``words``."""
        import queue

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            self.err += line
            if words in line:
                return line
            if not line:
                raise AssertionError(f"meshctl never said {words!r}; it said {self.err!r}")

    def finish(self, timeout: float = 20.0) -> "tuple[int, list[dict]]":
        import json

        self.proc.wait(timeout)  # (its output is a few lines: the pipe does not fill)
        out = self.proc.stdout.read()
        while (line := self.lines.get(timeout=5)):
            self.err += line
        return self.proc.returncode, [json.loads(line) for line in out.splitlines()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


@pytest.mark.slow
class MeshctlRestartTests(unittest.TestCase):
    def test_meshctl_sub_resumes_after_restart(self) -> None:
        """meshctl sub says it lost the node, subscribes again once the node is back, and prints later events."""
        node = NodeRestart(self)
        sub = Meshctl("sub", "chat", "news", "--count", "2", "--url", node.url)
        self.addCleanup(sub.kill)
        sub.wait_status("subscribed to chat, news")
        publish(node.url, "chat", "before")
        node.restart(kill=False)  # SIGTERM: the node drains (4007), then exits; a new one starts
        sub.wait_status("disconnected (code 4007)")
        self.assertIn("; subscribed to chat, news", sub.wait_status("reconnected to"))
        publish(node.url, "news", "after")
        code, events = sub.finish()
        self.assertEqual((code, [(e["channel"], e["data"]) for e in events]), (0, [("chat", "before"), ("news", "after")]))

    def test_meshctl_watch_gives_up(self) -> None:
        """meshctl watch gives up (exit 3) after --retry-for seconds without a node."""
        node = NodeRestart(self)
        watch = Meshctl("watch", "document", "42", "--url", node.url, "--retry-for", "1")
        self.addCleanup(watch.kill)
        watch.wait_status("watching document/42")
        node.node.proc.kill()
        watch.wait_status("disconnected (code 1006)")
        code, events = watch.finish()
        self.assertEqual((code, events), (3, []))
        self.assertIn("gave up: no connection for 1 s", watch.err)


class ListenerReentryTests(NodeTestCase):
    async def test_close_from_a_state_listener(self) -> None:
        """A state listener may close the client while it reports connecting (inside ClientService's machine)."""
        await self.start_node()
        client = ReconnectingClient(self.url, reactor=reactor, retry_policy=FAST)
        states: list = []

        def listener(change: StateChange) -> None:
            states.append(change.state)
            if change.state == "connecting":
                client.close()

        client.add_state_listener(listener)
        client.startService()
        await client.when_closed().addTimeout(5, reactor)
        self.assertEqual(states[0], "connecting")
        self.assertEqual(states[-1], "closed")
        self.assertNotIn("connected", states)
