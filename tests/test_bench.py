"""The benchmark suite still runs: every scenario kind, briefly, with real processes.

Nothing here looks at speed; a scenario passes when its processes start,
measure and stop, and every message reached every subscriber it was for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.trial import unittest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import run  # noqa: E402

pytestmark = pytest.mark.slow


class BenchSmokeTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)

    def assertAllDelivered(self, figures: dict) -> None:
        self.assertEqual(figures["lost"], 0, figures)
        self.assertGreater(figures["rate"], 0, figures)
        self.assertTrue(figures["cpu_wait_us"], figures)

    def test_fanout_meshd_and_relay(self) -> None:
        """The windowed fan-out, against a node (with batch frames too) and against the relay."""
        for kind, extra in (("meshd", []), ("meshd", ["--batch"]), ("relay", [])):
            result = run.fanout(f"{kind} smoke", kind, 5, self.work, 1.0, ["--warmup", "0.2", *extra])
            self.assertAllDelivered(result.figures)

    def test_many_channels(self) -> None:
        """Publishes spread over channels, each connection in several; and the relay in groups."""
        result = run.fanout("channels smoke", "meshd", 10, self.work, 1.0,
                            ["--warmup", "0.2", "--channels", "5", "--subscriptions", "2", "--window", "20"])
        self.assertAllDelivered(result.figures)
        result = run.fanout("relay groups smoke", "relay", 10, self.work, 1.0,
                            ["--warmup", "0.2", "--channels", "5", "--window", "20"], groups=5)
        self.assertAllDelivered(result.figures)

    def test_mesh_latency_rows(self) -> None:
        """The fixed-rate rows: subscriber and publisher processes, on one node and across two."""
        same, cross = run.mesh_latency("smoke", self.work, 300, 1.0, subscribers=2)
        for result in (same, cross):
            self.assertAllDelivered(result.figures)
            self.assertGreater(result.figures["deliveries"], 0)
            self.assertEqual(len(result.figures["server_cpu"]), 2)

    def test_idle_memory(self) -> None:
        """The idle-connection count: connections held, RSS read before and after."""
        result = run.idle("idle smoke", "meshd", 50, self.work)
        self.assertEqual(result.figures["connections"], 50)

    def test_connections(self) -> None:
        """bench/conns.py: handshakes against the relay and a node, idle subscribed connections, a storm all back."""
        import conns

        relay, node = conns.Target("relay", "relay"), conns.Target("meshd", "meshd", drain=0.5)
        results = [conns.handshakes(relay, self.work, 0.5), conns.handshakes(node, self.work, 0.5),
                   conns.handshakes(node, self.work, 0.5, subscribe=True)]
        for result in results:
            self.assertGreater(result.figures["done"], 0, result.figures)
            self.assertEqual((result.figures["refused"], result.figures["dropped"]), ({}, 0), result.figures)
        results.append(conns.idle_memory(node, self.work, 50, settle=0.2))
        storm = conns.storm(node, self.work, 50)
        self.assertEqual((storm.figures["refused"], storm.figures["dropped"]), ({}, 0), storm.figures)
        self.assertEqual(storm.figures["closes"], {"4007": 50})
        self.assertIn("reconnect storm", conns.table([*results, storm]))

    def test_forwarding_cost(self) -> None:
        """bench/forward.py: every forwarded publish reached node B's subscriber."""
        out = subprocess.run([sys.executable, str(BENCH / "forward.py"), "--reads", "50"], env=run.env(),
                             capture_output=True, text=True, timeout=120, cwd=self.work)
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        self.assertEqual(figures["delivered"], figures["published"])

    def test_soak(self) -> None:
        """bench/soak.py: with and without clients that stall or trickle, healthy ones lose nothing and the others are closed."""
        out = subprocess.run([sys.executable, str(BENCH / "soak.py"), "--duration", "10", "--subscribers", "20",
                              "--rate", "200", "--size", "8192", "--max-send-buffer", "65536"], env=run.env(),
                             capture_output=True, text=True, timeout=180, cwd=self.work)
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        clean, bad = json.loads(out.stdout.strip().splitlines()[-1])
        self.assertEqual((clean["bad_clients"], clean["healthy_lost"], clean["slow_closes"]), (0, 0, 0))
        self.assertEqual((bad["bad_clients"], bad["healthy_lost"]), (2, 0))
        self.assertEqual(bad["slow_closes"], 2, bad)


class MeshSimulationSmokeTests(unittest.SynchronousTestCase):
    def test_small_mesh(self) -> None:
        """bench/meshsim.py on 4 nodes: the mesh forms from one seed, each subscribe is told to every other
        node once, and every message reaches every subscriber once and in order, under churn too."""
        out = Path(self.mktemp()).resolve().with_suffix(".json")
        result = subprocess.run(
            [sys.executable, str(BENCH / "meshsim.py"), "--nodes", "4", "--messages", "50", "--churn", "4",
             "--churn-interval", "1.5", "--out", str(out)],
            capture_output=True, text=True, timeout=180,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        [figures] = json.loads(out.read_text())
        self.assertEqual(figures["failures"], [], result.stdout)
        self.assertEqual(figures["open_links"], 6, result.stdout)  # a full mesh of 4: 6 links
        self.assertEqual(figures["interest_frames_subscribe"], 3)
        for phase in ("fanout", "churn"):
            self.assertEqual((figures[phase]["missing"], figures[phase]["duplicates"], figures[phase]["out_of_order"]),
                             (0, 0, 0), phase)


class WorkersBenchSmokeTests(unittest.SynchronousTestCase):
    """bench/workers.py: the fixed-rate cost rows with 1 and 2 workers, and the model from them."""

    def test_cost_rows_and_model(self) -> None:
        import workers

        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        costs = [workers.cost(w, s, 200.0, 1.0, work) for s in (2, 6) for w in (1, 2)]
        for result in costs:
            self.assertEqual(result.figures["lost"], 0, result.figures)
            self.assertGreater(result.figures["rate"], 0, result.figures)
            self.assertGreater(result.figures["cpu_us_per_publish"], 0, result.figures)
        model = workers.model(costs)
        self.assertEqual(set(model), {"c_pub_us", "c_del_us", "c_hop_us", "c_del2_us"})
        [(one, _), (two, _)] = workers.projection(model, 100, cores=(1, 2))
        self.assertEqual((one, two), (1, 2))
