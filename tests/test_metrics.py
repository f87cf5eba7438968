"""The metrics endpoint counts what the node did."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.client import Agent, readBody
from twisted.web.server import Site

from meshd.config import Config
from meshd.metrics import MetricsResource

from .support import NodeTestCase, raw_client


class MetricsTests(NodeTestCase):
    async def scrape(self, path: bytes = b"/metrics") -> tuple[int, str]:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(MetricsResource(self.app)))
        self.addCleanup(port.stopListening)
        agent = Agent(reactor)
        response = await agent.request(b"GET", b"http://127.0.0.1:%d%s" % (port.getHost().port, path))
        body = await readBody(response)
        return response.code, body.decode()

    async def test_counts(self) -> None:
        """Gauges follow the registry; counters count frames, events, deliveries and errors."""
        await self.start_node(Config(hello_timeout=0.1))
        a, b = await self.client(), await self.client()
        await a.subscribe("x")
        await b.subscribe("x")
        await b.watch("k", "1")
        await a.publish("x", b"1")
        await a.publish("x", b"2")
        raw = await raw_client(self, self.url)
        raw.send(b"junk")
        await raw.wait_closed()  # no Hello: closed by the hello timeout, after its Error
        code, text = await self.scrape()
        self.assertEqual(code, 200)
        node = f'node="{self.app.node_id}"'
        for line in (
            f"meshd_sessions{{{node}}} 2",
            f"meshd_members{{{node}}} 2",
            f"meshd_channels{{{node}}} 1",
            f"meshd_subscriptions{{{node}}} 2",
            f"meshd_watchables{{{node}}} 1",
            f"meshd_sessions_opened_total{{{node}}} 3",
            f"meshd_events_total{{{node}}} 2",
            f"meshd_deliveries_total{{{node}}} 4",
            f"meshd_hello_timeouts_total{{{node}}} 1",
            f'meshd_errors_total{{{node},code="Malformed"}} 1',
        ):
            self.assertIn(line, text.splitlines())
        frames = [l for l in text.splitlines() if l.startswith("meshd_frames_received_total")]
        self.assertEqual(frames, [f"meshd_frames_received_total{{{node}}} 8"])  # 2 Hello, 2 Subscribe, Watch, 2 Publish, junk
        self.assertEqual(text.count("# TYPE meshd_errors_total counter"), 1)

    async def test_other_paths(self) -> None:
        """Only /metrics is served."""
        await self.start_node()
        code, _ = await self.scrape(b"/other")
        self.assertEqual(code, 404)
