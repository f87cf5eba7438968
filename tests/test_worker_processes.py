"""``[node] workers``: real ``twistd meshd`` processes sharing one port, restarted, drained, in a cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path
from uuid import UUID

import pytest
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial import unittest

from meshd.client import ReconnectingClient, connect
from meshd.constants import CLOSE_DRAINING
from meshd.mesh.local import worker_node_id

from .meshsupport import certified_id, make_certs
from .support import NodeProcess, close_quietly, payloads, sleep

pytestmark = pytest.mark.slow

RULES = """
[[rules]]
match = "*"
anonymous = ["subscribe", "publish", "watch"]
"""


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metric(port: int, name: str) -> dict[str, float]:
    """One metric's samples from the host's /metrics, by their worker label."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = {}
    for labels, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        worker = re.search(r'worker="([^"]*)"', labels)
        found[worker.group(1) if worker else ""] = float(value)
    return found


class WorkerProcessTests(unittest.TestCase):
    timeout = 120

    def host(self, *args: str, workers: int = 2) -> NodeProcess:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        node = NodeProcess("--workers", str(workers), "--metrics", "tcp:0:interface=127.0.0.1", *args, cwd=directory)
        self.addCleanup(node.stop)
        node.wait_listening(("websocket", "metrics"))
        self.wait(lambda: get(node.ports["metrics"], "/readyz")[0] == 200, "every worker ready", node)
        return node

    def wait(self, condition, what: str, node: NodeProcess, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {node.output()[-3000:]}")

    async def clients(self, node: NodeProcess, count: int) -> list:
        clients = []
        for _ in range(count):
            client = await connect(node.url, reactor=reactor)
            client.received = []
            client.add_listener(client.received.append)
            self.addCleanup(close_quietly, client)
            clients.append(client)
        return clients

    async def test_workers_share_one_port_and_a_publish_reaches_every_worker(self) -> None:
        api = '[api]\nlisten = "tcp:0:interface=127.0.0.1"\nkeys = { test = "secret-key-of-the-test" }\n'
        node = self.host("--config", self.config_file(extra=api))
        api_port = int(re.search(r"workers sharing .*API tcp:(\d+):", node.output()).group(1))
        subscribers = await self.clients(node, 16)
        # The kernel spreads connections over the workers by a hash of their addresses.
        served_by = {c.node_id for c in subscribers}
        self.assertEqual(len(served_by), 2, "16 connections all went to one worker")
        sessions = metric(node.ports["metrics"], "meshd_sessions")
        self.assertEqual(set(sessions), {"0", "1"})
        self.assertEqual(sum(sessions.values()), 16)
        await gatherResults([c.subscribe("room") for c in subscribers])
        await sleep(0.5)  # each worker tells the other of its subscribers: one local round trip
        publisher = subscribers[0]
        for i in range(10):
            await publisher.publish("room", b"%d" % i)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(len(c.received) == 10 for c in subscribers):
            await sleep(0.05)
        for c in subscribers:
            self.assertEqual(payloads(c.received), [b"%d" % i for i in range(10)], f"served by {c.node_id}")
        # The API port is shared too: whichever worker answers says which it is, and publishes to all.
        workers = set()
        for _ in range(8):
            info = api_call(api_port, "/api/info")
            self.assertEqual(info["worker"]["count"], 2)
            self.assertEqual(info["worker"]["host"], node_host(node))
            workers.add(info["worker"]["index"])
        self.assertLessEqual(workers, {0, 1})
        api_call(api_port, "/api/publish", {"channel": "room", "data": "from the api"})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(len(c.received) == 11 for c in subscribers):
            await sleep(0.05)
        for c in subscribers:
            self.assertEqual(payloads(c.received)[-1], b"from the api")

    async def test_a_killed_worker_is_restarted_and_its_clients_reconnect(self) -> None:
        node = self.host()
        metrics = node.ports["metrics"]
        _, health = get(metrics, "/healthz")
        victim = health["workers"]["0"]
        self.assertEqual(victim["state"], "running")
        clients = []
        for _ in range(12):
            client = ReconnectingClient(node.url, reactor=reactor, initial_delay=0.1, max_delay=0.5)
            client.received = []
            client.add_listener(client.received.append)
            client.startService()
            self.addCleanup(client.close)
            clients.append(client)
        await gatherResults([c.when_connected() for c in clients])
        await gatherResults([c.subscribe("room") for c in clients])
        killed_id = worker_node_id(UUID(node_host(node)), 0)
        on_victim = [c for c in clients if c.welcome.node == killed_id]
        self.assertTrue(on_victim, "no client landed on worker 0")
        os.kill(victim["pid"], signal.SIGKILL)
        self.wait(lambda: get(metrics, "/healthz")[1]["workers"]["0"]["starts"] == 2, "the restart", node)
        self.wait(lambda: get(metrics, "/readyz")[0] == 200, "ready again", node)
        await gatherResults([c.when_connected() for c in clients])
        new_pid = get(metrics, "/healthz")[1]["workers"]["0"]["pid"]
        self.assertNotEqual(new_pid, victim["pid"])
        self.assertIn(f"Worker 0 ended (signal SIGKILL)", node.output())
        # Back and subscribed again: a publish reaches every client, wherever it reconnected.
        await sleep(0.5)
        await clients[-1].publish("room", b"after")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(b"after" in payloads(c.received) for c in clients):
            await sleep(0.05)
        for c in clients:
            self.assertIn(b"after", payloads(c.received))

    async def test_sigterm_drains_every_worker(self) -> None:
        node = self.host("--config", self.config_file(drain_seconds=1))
        clients = await self.clients(node, 16)
        self.assertEqual(len({c.node_id for c in clients}), 2)
        _, health = get(node.ports["metrics"], "/healthz")
        pids = [w["pid"] for w in health["workers"].values()]
        closes = gatherResults([c.when_closed() for c in clients])
        node.proc.send_signal(signal.SIGTERM)
        reasons = await closes
        self.assertEqual({r.code for r in reasons}, {CLOSE_DRAINING})
        deadline = time.monotonic() + 30
        while node.proc.poll() is None and time.monotonic() < deadline:
            await sleep(0.05)
        self.assertIn(node.proc.returncode, (0, -signal.SIGTERM), node.output()[-3000:])
        for pid in pids:
            self.assertFalse(_alive(pid), f"worker {pid} outlived its supervisor")
        log = node.output()
        self.assertIn("Worker 0 stopped (exit status 0)", log)
        self.assertIn("Worker 1 stopped (exit status 0)", log)

    async def test_a_hosts_workers_join_the_cluster_with_the_hosts_certificate(self) -> None:
        """Each worker links with another host's node over TLS as a node of its own; one certificate serves all."""
        directory = Path(self.mktemp()).resolve()
        certs = make_certs(directory / "certs", ["host", "other"])

        def mesh(name: str, seeds: list[str]) -> str:
            return (f'[mesh]\ncluster = "test"\nlisten = "tcp:0:interface=127.0.0.1"\nseeds = {json.dumps(seeds)}\n'
                    f'ca = "{certs}/ca.pem"\ncert = "{certs}/{name}.pem"\nkey = "{certs}/{name}.key"\n'
                    "heartbeat_interval = 0.3\nheartbeat_timeout = 3.0\nreconnect_max_delay = 0.5\n")

        other_config = directory / "other.toml"
        other_config.write_text(f'[node]\nid = "{certified_id(certs / "other.pem")}"\n'
                                f'[websocket]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                                f'[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n{RULES}{mesh("other", [])}')
        (directory / "other").mkdir()
        other = NodeProcess("--config", str(other_config), cwd=directory / "other")
        self.addCleanup(other.stop)
        other.wait_listening(("websocket", "metrics", "mesh"))
        host_id = certified_id(certs / "host.pem")
        seed = f"127.0.0.1:{other.ports['mesh']}"
        host_config = directory / "host.toml"
        host_config.write_text(f'[node]\nid = "{host_id}"\nworkers = 2\n'
                               f'[websocket]\nlisten = ["tcp:0:interface=127.0.0.1"]\n{RULES}'
                               f'{mesh("host", [seed])}')
        host = self.host("--config", str(host_config))
        workers = {worker_node_id(host_id, i) for i in range(2)}
        # The other node links with both workers, each under its own id.
        self.wait(lambda: metric(other.ports["metrics"], "meshd_mesh_links").get("") == 2, "two links", other)
        subscribers = await self.clients(host, 16)
        self.assertEqual({c.node_id for c in subscribers}, workers)
        far = await self.clients(other, 1)
        for c in subscribers + far:
            await c.subscribe("room")
        await sleep(1.0)
        await far[0].publish("room", b"from the other host")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(c.received for c in subscribers + far):
            await sleep(0.05)
        for c in subscribers + far:
            self.assertEqual(payloads(c.received), [b"from the other host"])

    async def test_the_command_of_the_scaling_doc(self) -> None:
        """docs/scaling.md's command, as written: two workers on the default port, one publish reaching both."""
        import subprocess

        from .support import BIN, ROOT, env

        doc = (ROOT / "docs" / "scaling.md").read_text()
        command = re.search(r"```sh\n(.+?)\n```", doc[doc.index("## Workers"):], re.S).group(1)
        self.assertEqual(command, "twistd -n meshd --workers 2")
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        argv = command.split()
        proc = subprocess.Popen([str(BIN / argv[0]), *argv[1:]], cwd=directory, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def stop() -> None:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
            proc.stdout.close()

        self.addCleanup(stop)
        seen = ""
        deadline = time.monotonic() + 30
        while seen.count("MeshServerFactory starting on 8765") < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        self.assertIn("2 workers sharing WebSocket tcp:8765:interface=127.0.0.1", seen)
        self.assertEqual(seen.count("MeshServerFactory starting on 8765"), 2, seen)
        await sleep(0.5)  # the workers link
        clients = []
        for _ in range(12):
            client = await connect("ws://127.0.0.1:8765", reactor=reactor)
            client.received = []
            client.add_listener(client.received.append)
            self.addCleanup(close_quietly, client)
            clients.append(client)
        self.assertEqual(len({c.node_id for c in clients}), 2)
        await gatherResults([c.subscribe("hello") for c in clients])
        await sleep(0.5)
        await clients[0].publish("hello", b"everywhere")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(c.received for c in clients):
            await sleep(0.05)
        self.assertEqual([payloads(c.received) for c in clients], [[b"everywhere"]] * 12)

    def config_file(self, extra: str = "", **node: object) -> str:
        path = Path(self.mktemp()).with_suffix(".toml")
        keys = "\n".join(f"{k} = {json.dumps(v)}" for k, v in node.items())
        path.write_text(f"[node]\n{keys}\n[websocket]\nlisten = [\"tcp:0:interface=127.0.0.1\"]\n{RULES}{extra}")
        return str(path.resolve())


def api_call(port: int, path: str, body: "dict | None" = None) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={
        "Authorization": "Bearer secret-key-of-the-test"}, data=json.dumps(body).encode() if body else None)
    with urllib.request.urlopen(request, timeout=5) as r:
        return json.loads(r.read())


def node_host(node: NodeProcess) -> str:
    found = re.search(r"meshd host ([0-9a-f-]{36}): ", node.output())
    assert found, node.output()
    return found.group(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
