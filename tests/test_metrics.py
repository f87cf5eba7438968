"""The metrics listener: what it counts, how it exposes it, and the node's health and readiness."""

from __future__ import annotations

import json
import re
import shutil
import socket

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from meshd._io import EndOfTurn
from meshd.app import Application
from meshd.codec import Opcode, encode, error_code_name
from meshd.config import Config
from meshd.metrics import SEED_GIVE_UP_ROUNDS, MetricsSite

from .meshsupport import MeshTestCase
from .support import ROOT, raw_client

OPERATIONS = ROOT / "docs" / "operations.md"


def families(text: str) -> dict:
    """The exposition parsed by prometheus-client, by family name."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the one sample ``name`` whose labels include ``labels``."""
    found = [s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    if len(found) != 1:
        raise AssertionError(f"{len(found)} samples {name}{labels}")
    return found[0]


def metrics_section() -> str:
    text = OPERATIONS.read_text()
    return text[text.index("## Metrics\n"):text.index("\n## ", text.index("## Metrics\n") + 1)]


class MetricsTests(MeshTestCase):
    async def serve(self, app=None):
        """The metrics site of ``app`` (the test's node) on a loopback port; returns the port number."""
        site = MetricsSite(app or self.app)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def get(self, port: int, path: bytes = b"/metrics") -> tuple[int, str]:
        response = await Agent(reactor).request(b"GET", b"http://127.0.0.1:%d%s" % (port, path)).addTimeout(
            10, reactor)
        body = await readBody(response)
        return response.code, body.decode()

    async def test_counts(self) -> None:
        """Gauges follow the registry; counters count frames by opcode, events, deliveries and errors by code."""
        await self.start_node(Config(hello_timeout=0.1))
        port = await self.serve()
        a, b = await self.client(), await self.client()
        await a.subscribe("x")
        await b.subscribe("x")
        await b.watch("k", "1")
        await a.publish("x", b"1")
        await a.publish("x", b"2")
        raw = await raw_client(self, self.url)
        raw.send(b"junk")
        await raw.wait_closed()  # no Hello: closed by the hello timeout, after its Error
        code, text = await self.get(port)
        self.assertEqual(code, 200)
        node = str(self.app.node_id)
        for name, value in [
            ("meshd_sessions", 2), ("meshd_members", 2), ("meshd_channels", 1), ("meshd_subscriptions", 2),
            ("meshd_watchables", 1), ("meshd_sessions_opened_total", 3), ("meshd_events_total", 2),
            ("meshd_deliveries_total", 4), ("meshd_hello_timeouts_total", 1), ("meshd_sessions_backlogged", 0),
            ("meshd_draining", 0),
            ("meshd_frames_received_total", 8),  # 2 Hello, 2 Subscribe, Watch, 2 Publish, junk
        ]:
            self.assertEqual(sample(text, name, node=node), value, name)
        self.assertEqual(sample(text, "meshd_errors_total", node=node, code="Malformed"), 1)
        for opcode, count in [("Hello", 2), ("Subscribe", 2), ("Watch", 1), ("Publish", 2)]:
            self.assertEqual(sample(text, "meshd_frames_by_opcode_total", node=node, opcode=opcode), count, opcode)
        self.assertEqual(text.count("# TYPE meshd_errors_total counter"), 1)

    async def test_counters_follow_traffic(self) -> None:
        """Two scrapes around more traffic differ by exactly that traffic; unhandled opcodes count as unknown."""
        await self.start_node()
        port = await self.serve()
        a = await self.client()
        await a.subscribe("x")
        _, before = await self.get(port)
        await a.publish("x", b"1")
        await a.ping()
        raw = await raw_client(self, self.url)
        raw.send(encode(Opcode.Hello))
        raw.send(encode(4321, request_id=7))
        await raw.wait_frames(2)
        _, after = await self.get(port)

        def delta(name: str, **labels: str) -> float:
            try:
                old = sample(before, name, **labels)
            except AssertionError:
                old = 0
            return sample(after, name, **labels) - old

        self.assertEqual(delta("meshd_frames_by_opcode_total", opcode="Publish"), 1)
        self.assertEqual(delta("meshd_frames_by_opcode_total", opcode="Ping"), 1)
        self.assertEqual(delta("meshd_frames_by_opcode_total", opcode="unknown"), 1)
        self.assertEqual(delta("meshd_deliveries_total"), 1)
        self.assertEqual(delta("meshd_errors_total", code=error_code_name(raw.frames[1].error_code)), 1)
        self.assertGreater(delta("meshd_turn_seconds_count"), 0)

    async def test_exposition_parses_and_matches_the_docs(self) -> None:
        """The output parses as Prometheus text, and each metric in docs/operations.md is there with its type."""
        from meshd.channels import ChannelOptions

        history = (ChannelOptions("h.*", history_size=5),)
        first = await self.start_mesh_node(self.settings(0), channels=history)
        second = await self.start_mesh_node(self.settings(1, [first.address]), channels=history)
        await self.wait_for(lambda: first.links() == second.links() == 1, "the link")
        self.app = first.app
        client = await self.client_of(first)
        await client.publish("h.1", b"kept")
        port = await self.serve()
        code, text = await self.get(port)
        self.assertEqual(code, 200)
        found = families(text)
        documented = re.findall(r"^\| `(meshd_\w+)(?:\{[^`]*\})?` \| (\w+) \|", metrics_section(), re.M)
        self.assertGreater(len(documented), 25)
        for name, kind in documented:
            family = found.get(name[: -len("_total")] if name.endswith("_total") else name)
            self.assertIsNotNone(family, name)
            self.assertEqual(family.type, kind, name)
        self.assertIn("process_cpu_seconds", found)
        self.assertIn("process_resident_memory_bytes", found)
        node = str(first.app.node_id)
        self.assertEqual((sample(text, "meshd_history_events", node=node), sample(text, "meshd_history_channels", node=node)),
                         (1, 1))
        self.assertEqual(sample(text, "meshd_history_bytes", node=node), first.app.history.size)
        undocumented = {n for n in found if n.startswith("meshd_")} - {
            n[: -len("_total")] if n.endswith("_total") else n for n, _ in documented}
        self.assertEqual(undocumented, set())

    async def test_link_states(self) -> None:
        """With a 2-node mesh, links, peers, link states, outboxes and routed frames show on both nodes."""
        n0, n1 = await self.cluster_of(2)
        p0, p1 = await self.serve(n0.app), await self.serve(n1.app)
        _, text = await self.get(p0)
        node = str(n0.app.node_id)
        self.assertEqual(sample(text, "meshd_mesh_links", node=node), 1)
        self.assertEqual(sample(text, "meshd_mesh_peers", node=node), 1)
        self.assertEqual(sample(text, "meshd_mesh_link_states", node=node, state="open"), 1)
        self.assertEqual(sample(text, "meshd_mesh_link_states", node=node, state="handshaking"), 0)
        self.assertEqual(sample(text, "meshd_mesh_link_states", node=node, state="closing"), 0)
        peer = str(n1.app.node_id)
        self.assertGreaterEqual(sample(text, "meshd_mesh_outbox_frames", node=node, peer=peer), 0)
        sub = await self.client_of(n1)
        await sub.subscribe("x")
        await self.interest_settled([n0, n1], "x", [n1])
        pub = await self.client_of(n0)
        await pub.publish("x", b"over the mesh")
        await self.wait_for(lambda: len(sub.received) == 1, "the event on n1")
        _, text0 = await self.get(p0)
        _, text1 = await self.get(p1)
        self.assertEqual(sample(text0, "meshd_mesh_routed_sent_total", node=node), 1)
        self.assertEqual(sample(text1, "meshd_mesh_routed_received_total", node=peer), 1)

    async def test_link_round_trips(self) -> None:
        """Each open link's round trip shows once a heartbeat's ping has been answered, in the histogram too."""
        n0, n1 = await self.cluster_of(2)
        port = await self.serve(n0.app)
        await self.wait_for(lambda: n0.mesh.peers[n1.app.node_id].link.rtt is not None, "a measured round trip")
        _, text = await self.get(port)
        node, peer = str(n0.app.node_id), str(n1.app.node_id)
        last = sample(text, "meshd_mesh_link_rtt_last_seconds", node=node, peer=peer)
        self.assertTrue(0 <= last < 1.0, last)
        self.assertGreaterEqual(sample(text, "meshd_mesh_link_rtt_seconds_count", node=node), 1)

    async def test_handshaking_link(self) -> None:
        """A connection that has not said its LinkHello yet counts as handshaking, not as a link."""
        (n0,) = await self.cluster_of(1)
        port = await self.serve(n0.app)
        raw = await self.tls_link(n0)
        self.addCleanup(raw.transport.abortConnection)
        await self.wait_for(lambda: any(link.state == "awaiting_hello" for link in n0.mesh.links), "the connection")
        _, text = await self.get(port)
        node = str(n0.app.node_id)
        self.assertEqual(sample(text, "meshd_mesh_link_states", node=node, state="handshaking"), 1)
        self.assertEqual(sample(text, "meshd_mesh_link_states", node=node, state="open"), 0)
        self.assertEqual(sample(text, "meshd_mesh_links", node=node), 0)

    async def test_link_states_when_a_peer_goes(self) -> None:
        """When a peer stops, its link leaves the states and the peer stays known, unlinked."""
        n0, n1 = await self.cluster_of(2)
        port = await self.serve(n0.app)
        await n1.app.stopService()
        await self.wait_for(lambda: not n0.mesh.links, "the link gone")
        _, text = await self.get(port)
        node = str(n0.app.node_id)
        self.assertEqual(sample(text, "meshd_mesh_links", node=node), 0)
        self.assertEqual(sample(text, "meshd_mesh_peers", node=node), 1)
        self.assertEqual(sample(text, "meshd_mesh_link_states", node=node, state="open"), 0)

    async def test_readiness_follows_seeds(self) -> None:
        """A node whose seed has not linked answers /readyz 503 naming it, then 200 once linked."""
        held = socket.socket()  # the seed's port: bound, not listening, until the seed starts there
        self.addCleanup(held.close)
        held.bind(("127.0.0.1", 0))
        seed_port = held.getsockname()[1]
        seed = f"127.0.0.1:{seed_port}"
        n1 = await self.start_mesh_node(self.settings(1, [seed], reconnect_max_delay=60.0), name="n1")
        port = await self.serve(n1.app)
        code, body = await self.get(port, b"/readyz")
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body), {"status": "not ready",
                                            "not_ready": {"mesh": f"seeds not linked yet: {seed}"}})
        held.close()
        await self.start_mesh_node(self.settings(0, [n1.address], port=seed_port), name="n0")
        await self.wait_for(lambda: n1.links() == 1, "the seed linked")
        code, body = await self.get(port, b"/readyz")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ready"}))

    async def test_seed_given_up(self) -> None:
        """A seed never linked stops holding readiness back after the give-up time."""
        seed = f"127.0.0.1:{_free_port(self)}"
        n1 = await self.start_mesh_node(self.settings(1, [seed], reconnect_max_delay=60.0), name="n1")
        site = MetricsSite(n1.app)
        site.health.start()
        self.assertIn("mesh", site.health.not_ready())
        site.health.started -= SEED_GIVE_UP_ROUNDS * 60.0
        self.assertEqual(site.health.not_ready(), {})

    async def test_readiness_draining_and_listeners(self) -> None:
        """/readyz answers 503 while the node is draining, or before its WebSocket listener is up."""
        unlistened = Application(Config())
        unlistened.startService()
        self.addCleanup(unlistened.stopService)
        port = await self.serve(unlistened)
        code, body = await self.get(port, b"/readyz")
        self.assertEqual(code, 503)
        self.assertEqual(list(json.loads(body)["not_ready"]), ["websocket"])
        await self.start_node()
        port = await self.serve()
        code, body = await self.get(port, b"/readyz")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ready"}))
        self.app._draining = True
        code, body = await self.get(port, b"/readyz")
        self.assertEqual((code, json.loads(body)),
                         (503, {"status": "not ready", "not_ready": {"draining": "the node is draining"}}))
        _, text = await self.get(port)
        self.assertEqual(sample(text, "meshd_draining"), 1)
        with self.assertRaises(AttributeError):
            self.app.draining = False  # read-only from outside

    async def test_healthz_and_other_paths(self) -> None:
        """/healthz answers 200 ok; paths other than the three are 404."""
        await self.start_node()
        port = await self.serve()
        code, body = await self.get(port, b"/healthz")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ok"}))
        code, _ = await self.get(port, b"/other")
        self.assertEqual(code, 404)

    async def test_no_log_line_per_scrape(self) -> None:
        """Scrapes and probes write no access-log line."""
        await self.start_node()
        port = await self.serve()
        lines: list[str] = []

        def observe(event) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        for path in (b"/metrics", b"/healthz", b"/readyz", b"/metrics"):
            await self.get(port, path)
        self.assertEqual([line for line in lines if "GET /" in line], [])

    async def test_curl_examples(self) -> None:
        """The curl examples of docs/operations.md answer as documented against a running node."""
        curl = shutil.which("curl")
        if curl is None:
            raise unittest.SkipTest("no curl")
        await self.start_node()
        bound: list[int] = []

        def observe(event) -> None:  # Twisted logs "Site starting on PORT" once the listener is up
            found = re.search(r"^Site starting on (\d+)$", formatEvent(event))
            if found:
                bound.append(int(found.group(1)))

        globalLogPublisher.addObserver(observe)
        try:
            self.app.serve_metrics("tcp:0:interface=127.0.0.1")
        finally:
            globalLogPublisher.removeObserver(observe)
        self.assertEqual(len(bound), 1)
        site_port = bound[0]
        examples = re.findall(r"^curl -s http://127\.0\.0\.1:9108(/\w+)$", metrics_section(), re.M)
        self.assertEqual(examples, ["/healthz", "/readyz", "/metrics"])
        outputs = {}
        for path in examples:
            out, err, code = await getProcessOutputAndValue(
                curl, ["-s", "--max-time", "10", f"http://127.0.0.1:{site_port}{path}"], env={})
            self.assertEqual(code, 0, err)
            outputs[path] = out.decode()
        self.assertEqual(json.loads(outputs["/healthz"]), {"status": "ok"})
        self.assertEqual(json.loads(outputs["/readyz"]), {"status": "ready"})
        self.assertIn("meshd_sessions", families(outputs["/metrics"]))


class EndOfTurnTimingTests(unittest.SynchronousTestCase):
    def test_once_per_turn(self) -> None:
        """A turn that read frames is timed once, at its end, whatever the number of frames."""
        clock = Clock()
        turn = EndOfTurn(clock)
        timings: list[float] = []
        turn.timed = timings.append
        for _ in range(3):
            if turn.first_read is None:
                turn.reading()
        self.assertEqual(timings, [])
        clock.advance(0)
        self.assertEqual(len(timings), 1)
        self.assertIsNone(turn.first_read)
        clock.advance(0)
        self.assertEqual(len(timings), 1, "a turn that read nothing is not timed")

    def test_untimed(self) -> None:
        """Without a timing hook, reading schedules nothing."""
        clock = Clock()
        turn = EndOfTurn(clock)
        turn.reading()
        self.assertIsNone(turn.first_read)
        self.assertEqual(clock.getDelayedCalls(), [])


def _free_port(testcase) -> int:
    """A loopback port nothing listens on for the test's duration (bound, not listening)."""
    s = socket.socket()
    testcase.addCleanup(s.close)
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
