"""Drain: a stopping node turns not ready, stops listening, then closes its sessions in batches (close 4007)."""

from __future__ import annotations

import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from meshd.client import ConnectionClosed, connect
from meshd.config import Config, ConfigError, parse
from meshd.constants import CLOSE_DRAINING
from meshd.metrics import Health

from .meshsupport import MeshTestCase
from .support import NodeProcess, NodeTestCase, close_quietly
from .test_processes import Background
from .test_websocket import Connection, answers, node_app


class Recording(Service):
    """A child service that notes when it is stopped, in a list shared with the test."""

    def __init__(self, name: str, stops: list) -> None:
        self.setName(name)
        self.stops = stops

    def stopService(self):
        self.stops.append(self.name)
        return super().stopService()


def closes(connections: list[Connection]) -> list:
    """Which connections have been sent a close frame so far, and with which code (None: not closed)."""
    codes = []
    for connection in connections:
        said = answers(connection.written())
        connection.closed = getattr(connection, "closed", None) or next(
            (code for kind, code in said if kind == "close"), None)
        codes.append(connection.closed)
    return codes


class DrainTests(unittest.SynchronousTestCase):
    def node(self, sessions: int, **config):
        app = node_app(**config)
        stops: list = []
        Recording("mesh-like", stops).setServiceParent(app)
        Recording("metrics:test", stops).setServiceParent(app)
        Recording("extension", stops).setServiceParent(app)
        app.startService()
        connections = [Connection(app) for _ in range(sessions)]
        return app, connections, stops

    def test_batches_spread_over_drain_seconds(self) -> None:
        """Twenty sessions and drain_seconds 1 are closed with 4007 in ten batches of two, one every 0.1 s of the clock."""
        app, connections, stops = self.node(20, drain_seconds=1)
        stopped: list = []
        app.stopService().addCallback(stopped.append)
        self.assertTrue(app.draining)
        self.assertIn("draining", Health(app).not_ready())
        counts = [sum(code is not None for code in closes(connections))]
        app.clock.advance(0.05)
        for _ in range(10):
            counts.append(sum(code is not None for code in closes(connections)))
            app.clock.advance(0.1)
        self.assertEqual(counts, [2, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20])
        self.assertEqual(set(closes(connections)), {CLOSE_DRAINING})
        self.assertEqual((stopped, stops), ([], []), "nothing else stops while sessions remain")
        for connection in connections:
            connection.lose()
        self.assertEqual(stopped, [None])
        self.assertEqual(stops, ["extension", "mesh-like", "metrics:test"], "the metrics listener stops last")

    def test_zero_drain_seconds_closes_all_at_once(self) -> None:
        """With drain_seconds 0 every session is sent 4007 at once."""
        app, connections, _ = self.node(5, drain_seconds=0)
        app.stopService()
        self.assertEqual(closes(connections), [CLOSE_DRAINING] * 5)

    def test_drain_is_bounded(self) -> None:
        """Sessions whose clients never answer the close are aborted and the stop completes, drain_seconds plus the close timeout later."""
        app, connections, stops = self.node(3, drain_seconds=2)
        stopped: list = []
        app.stopService().addCallback(stopped.append)
        app.clock.advance(2)
        self.assertEqual(closes(connections), [CLOSE_DRAINING] * 3)
        app.clock.advance(app.factory.closeHandshakeTimeout)
        self.assertEqual(stopped, [None])
        self.assertTrue(all(c.transport.disconnecting for c in connections))
        self.assertIn("metrics:test", stops)

    def test_a_session_opened_during_the_drain_is_closed(self) -> None:
        """A connection whose opening handshake ends during the drain is closed with 4007 at once."""
        app, connections, _ = self.node(2, drain_seconds=10)
        app.stopService()
        late = Connection(app)  # (which keeps what the handshake wrote to itself)
        self.assertEqual(late.session.close_code, CLOSE_DRAINING)
        self.assertEqual(closes(connections)[1:], [None])

    def test_a_second_stop_waits_for_the_first(self) -> None:
        """stopService called again during a drain fires when the drain's stop does."""
        app, connections, _ = self.node(2, drain_seconds=10)
        first: list = []
        second: list = []
        app.stopService().addCallback(first.append)
        app.stopService().addCallback(second.append)
        for connection in connections:
            connection.lose()
        self.assertEqual((first, second), ([None], [None]))

    def test_drain_seconds_key(self) -> None:
        """[node] drain_seconds is a number of seconds >= 0, 10 by default."""
        self.assertEqual(Config().drain_seconds, 10.0)
        self.assertEqual(parse({"node": {"drain_seconds": 2.5}}, Path("m.toml")).drain_seconds, 2.5)
        with self.assertRaisesRegex(ConfigError, r"^m\.toml: node\.drain_seconds: expected a number of seconds"):
            parse({"node": {"drain_seconds": -1}}, Path("m.toml"))


class RealDrainTests(NodeTestCase):
    async def test_not_ready_and_not_listening_while_draining(self) -> None:
        """During a drain /readyz says draining, the listener refuses connections and sessions get 4007."""
        from twisted.web.client import Agent, readBody

        from meshd.metrics import MetricsSite

        folder = tempfile.mkdtemp(prefix="meshd-drain-")  # short: a UNIX socket path has a length limit
        self.addCleanup(shutil.rmtree, folder, True)
        socket_path = Path(folder) / "ws.sock"
        await self.start_node(Config(drain_seconds=20))
        self.app.listen(f"unix:{socket_path}")  # started at once: the app runs
        site = MetricsSite(self.app)
        metrics = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(metrics.stopListening)
        probe = await UNIXClientEndpoint(reactor, str(socket_path)).connect(Factory.forProtocol(Protocol))
        probe.transport.loseConnection()  # the listener accepts before the drain
        first, second = await self.client(), await self.client()

        stopping = self.app.stopService()
        stopped: list = []
        stopping.addBoth(lambda result: (stopped.append(True), result)[1])
        closed = await first.when_closed().addTimeout(10, reactor)
        self.assertEqual(closed.code, CLOSE_DRAINING)
        response = await Agent(reactor).request(
            b"GET", b"http://127.0.0.1:%d/readyz" % metrics.getHost().port).addTimeout(10, reactor)
        body = (await readBody(response)).decode()
        self.assertEqual(response.code, 503)
        self.assertIn("draining", body)
        with self.assertRaises(ConnectError):
            await UNIXClientEndpoint(reactor, str(socket_path)).connect(Factory.forProtocol(Protocol))
        # Through a port the app does not own (the test's): the session is closed as it opens.
        try:
            client = await connect(self.url, None, reactor=reactor).addTimeout(10, reactor)
        except ConnectionClosed as e:
            late = e.code
        else:
            self.addCleanup(close_quietly, client)
            late = (await client.when_closed().addTimeout(10, reactor)).code
        self.assertEqual(late, CLOSE_DRAINING)
        self.assertEqual(stopped, [], "the drain waits for the second session")
        await second.close().addTimeout(10, reactor)
        await stopping.addTimeout(10, reactor)


class MeshDrainTests(MeshTestCase):
    async def test_mesh_goodbye_follows_the_drain(self) -> None:
        """While a node drains its links stay up and a peer's events reach its remaining sessions; the Goodbye comes after."""
        a = await self.start_mesh_node(self.settings(0), drain_seconds=20)
        b = await self.start_mesh_node(self.settings(1, [a.address]))
        await self.wait_for(lambda: a.links() == 1 and b.links() == 1, "the link")
        first, second = await self.client_of(a), await self.client_of(a)
        await second.subscribe("news")
        peer = b.mesh.peers[a.app.node_id]
        await self.wait_for(lambda: "news" in peer.interests, "the interest at the peer")
        publisher = await self.client_of(b)

        stopping = a.app.stopService()  # two sessions over 20 s: the second is closed 10 s in
        closed = await first.when_closed().addTimeout(10, reactor)
        self.assertEqual(closed.code, CLOSE_DRAINING)
        await publisher.publish("news", b"during the drain")
        await self.wait_for(lambda: second.received, "the peer's event during the drain")
        self.assertEqual((a.links(), b.links()), (1, 1))
        await second.close().addTimeout(10, reactor)
        await stopping.addTimeout(10, reactor)
        await self.wait_for(lambda: b.links() == 0, "the Goodbye at the peer")


class ProcessDrainTests(unittest.TestCase):
    pytestmark = pytest.mark.slow  # a real twistd process

    def test_sigterm_drains_with_close_4007(self) -> None:
        """SIGTERM to twistd meshd closes a connected client with 4007, then the process exits on the signal."""
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir(parents=True)
        config = cwd / "meshd.toml"
        config.write_text(
            '[node]\ndrain_seconds = 1\n[websocket]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
            '[[rules]]\nmatch = "*"\nanonymous = ["subscribe"]\n'
        )
        node = NodeProcess("--config", str(config), cwd=cwd)
        self.addCleanup(node.stop)
        node.wait_listening()
        subs = [Background("sub", "x", "--url", node.url, "--retry-for", "0") for _ in range(3)]
        for sub in subs:
            self.addCleanup(sub.kill)
            sub.wait_status("subscribed")
        node.proc.send_signal(signal.SIGTERM)
        self.assertEqual(node.proc.wait(30), -signal.SIGTERM)
        for sub in subs:
            code, events = sub.finish()
            self.assertEqual((code, events), (3, []))
            self.assertIn(f"code {CLOSE_DRAINING}", sub.err)
        self.assertIn("Draining 3 sessions", node.output())
