"""Three real node processes, certificates made by meshctl certs, one seed each."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Optional
from uuid import UUID

import pytest
from twisted.trial import unittest

from .proxy import Proxy
from .support import NodeProcess
from .test_processes import Background, meshctl

pytestmark = pytest.mark.slow

NODE_IDS = [UUID(int=i + 1) for i in range(3)]  # fixed, so the tests know who dials whom


class ClusterNode:
    """A node's configuration, and the process that runs it once started.

    All its listeners bind port 0; the node advertises the mesh port it
    bound (unless told to advertise another address, a proxy's), and a
    restart listens on that same port again, as the other nodes know it.
    """

    def __init__(self, testcase, directory: Path, index: int, seeds: list[str], forward_watchers: bool = True,
                 advertise: Optional[str] = None) -> None:
        self.testcase, self.index = testcase, index
        self.node_id = NODE_IDS[index]
        self.config = directory / f"n{index}.toml"
        self._write_config(seeds, forward_watchers, advertise or "127.0.0.1:0", 0)
        self._told = advertise
        self.directory = directory
        self.process: Optional[NodeProcess] = None

    def _write_config(self, seeds, forward_watchers: bool, advertise: str, mesh_port: int) -> None:
        self._settings = (seeds, forward_watchers)
        index = self.index
        self.config.write_text(f"""
[node]
id = "{self.node_id}"
[websocket]
listen = ["tcp:0:interface=127.0.0.1"]
[[rules]]
match = "*"
anonymous = ["subscribe", "publish", "watch"]
[metrics]
listen = "tcp:0:interface=127.0.0.1"
[extensions]
modules = ["tests.mesh_extension"]
[mesh]
cluster = "test"
listen = "tcp:{mesh_port}:interface=127.0.0.1"
{"" if advertise.endswith(":0") else f'advertise = "{advertise}"'}
seeds = {json.dumps(seeds)}
ca = "certs/ca.pem"
cert = "certs/n{index}.pem"
key = "certs/n{index}.key"
heartbeat_interval = 0.3
heartbeat_timeout = 3.0
reconnect_max_delay = 0.5
forward_watchers = {"true" if forward_watchers else "false"}
""")

    @property
    def advertise(self) -> str:
        """The address the other nodes dial (known once the node has started)."""
        return self._told or f"127.0.0.1:{self.mesh_port}"

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def mesh_port(self) -> int:
        """The port the running node's mesh listener bound."""
        return self.process.ports["mesh"]

    def start(self) -> "ClusterNode":
        run = self.directory / f"run{self.index}-{time.monotonic_ns()}"
        run.mkdir()
        self.process = NodeProcess("--config", str(self.config), cwd=run)
        self.testcase.addCleanup(self.process.stop)
        self.process.wait_listening(("websocket", "metrics", "mesh"))
        # From now on the node keeps this mesh port, across restarts.
        self._write_config(*self._settings, self.advertise, self.mesh_port)
        return self

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.process.ports['metrics']}/metrics", timeout=5) as r:
            text = r.read().decode()
        match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0


def wait(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class ClusterTestCase(unittest.TestCase):
    def make_certs(self) -> Path:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        certs = directory / "certs"
        for args in (["ca", "--dir", str(certs), "--cluster", "test"],
                     *[["node", f"n{i}", "--dir", str(certs), "--san", "127.0.0.1", "--node-id", str(NODE_IDS[i])]
                       for i in range(3)]):
            result = meshctl("certs", *args)
            self.assertEqual(result.returncode, 0, result.stderr)
        return directory

    def cluster(self, forward=(True, True, True)) -> list[ClusterNode]:
        directory = self.make_certs()
        nodes: list[ClusterNode] = []
        for i in range(3):
            seeds = [nodes[-1].advertise] if nodes else []
            nodes.append(ClusterNode(self, directory, i, seeds, forward_watchers=forward[i]).start())
        wait(lambda: all(n.metric("meshd_mesh_links") == 2 for n in nodes), "a full mesh")
        return nodes

    def subscribe(self, node: ClusterNode, *args: str) -> Background:
        bg = Background(*args, "--url", node.url)
        self.addCleanup(bg.kill)
        bg.wait_status("subscribed" if args[0] == "sub" else "watching")
        return bg

    def settle_interest(self) -> None:
        """Subscriptions reach the other nodes one link round trip after the Ack."""
        time.sleep(0.5)

    def call(self, node: ClusterNode, *args: str) -> None:
        result = meshctl("call", *args, "--url", node.url)
        self.assertEqual(result.returncode, 0, result.stderr)


class ClusterTests(ClusterTestCase):
    def test_publish_anywhere_reaches_everyone_once(self) -> None:
        """A full mesh forms from one seed each; a publish on any node reaches every node's subscriber once."""
        nodes = self.cluster()
        subs = [self.subscribe(n, "sub", "room", "--count", "3") for n in nodes]
        self.settle_interest()
        for n in nodes:
            result = meshctl("pub", "room", f"from n{n.index}", "--url", n.url)
            self.assertEqual(result.returncode, 0, result.stderr)
        for sub in subs:
            code, events = sub.finish()
            self.assertEqual(code, 0)
            self.assertEqual(sorted(e["data"] for e in events), ["from n0", "from n1", "from n2"])
        for n in nodes:
            self.assertEqual(n.metric("meshd_mesh_duplicates_total"), 0)

    def test_scopes_across_nodes(self) -> None:
        """local_only stays local, distribute_event skips exclude_id, watchers follow forward_watchers.

        Each listener exits after the events it should get; a wrong event
        would arrive first (the calls run one after another) and show.
        """
        a, b, c = self.cluster(forward=(True, True, False))
        subs = [self.subscribe(n, "sub", "s", "--count", str(k)) for n, k in ((a, 2), (b, 1), (c, 1))]
        watchers = [self.subscribe(n, "watch", "doc", "1", "--count", str(k)) for n, k in ((a, 1), (b, 1), (c, 2))]
        self.settle_interest()
        self.call(a, "1100", "only-a", "--channel", "s")  # broadcast_to_channel(local_only=True) on a
        self.call(a, "1101", str(b.node_id), "--channel", "s")  # distribute_event from a, exclude_id=b
        self.call(b, "1100", "only-b", "--channel", "s")
        self.call(c, "1102", "from-c", "--watchable", "doc", "1")  # c does not forward watchers
        self.call(a, "1102", "from-a", "--watchable", "doc", "1")  # a does
        got = [[e["data"] for e in sub.finish()[1]] for sub in subs]
        self.assertEqual(got, [["only-a", "distributed"], ["only-b"], ["distributed"]])
        seen = [[e["data"] for e in w.finish()[1]] for w in watchers]
        self.assertEqual(seen, [["from-a"], ["from-a"], ["from-c", "from-a"]])

    def test_kill_and_restart(self) -> None:
        """With one node killed the other two keep delivering; restarted, it rejoins."""
        a, b, c = self.cluster()
        c.process.proc.kill()
        c.process.proc.wait()
        wait(lambda: a.metric("meshd_mesh_links") == 1 and b.metric("meshd_mesh_links") == 1, "the loss")
        sub_b = self.subscribe(b, "sub", "room", "--count", "1")
        self.settle_interest()
        self.assertEqual(meshctl("pub", "room", "two nodes", "--url", a.url).returncode, 0)
        self.assertEqual([e["data"] for e in sub_b.finish()[1]], ["two nodes"])
        c.start()
        wait(lambda: all(n.metric("meshd_mesh_links") == 2 for n in (a, b, c)), "the rejoin")
        sub_c = self.subscribe(c, "sub", "room", "--count", "1")
        self.settle_interest()
        self.assertEqual(meshctl("pub", "room", "three again", "--url", a.url).returncode, 0)
        self.assertEqual([e["data"] for e in sub_c.finish()[1]], ["three again"])


class LinkCutTests(ClusterTestCase):
    def test_cut_and_restored_within_the_bound(self) -> None:
        """A link cut and restored within the queue bound loses and duplicates nothing."""
        directory = self.make_certs()
        proxies = [Proxy(), Proxy()]
        for proxy in proxies:
            self.addCleanup(proxy.close)
        # Every byte between the two nodes goes through a proxy: each advertises its proxy,
        # which forwards to the mesh port the node bound.
        a = ClusterNode(self, directory, 0, [f"127.0.0.1:{proxies[1].port}"],
                        advertise=f"127.0.0.1:{proxies[0].port}").start()
        proxies[0].target_port = a.mesh_port
        b = ClusterNode(self, directory, 1, [], advertise=f"127.0.0.1:{proxies[1].port}").start()
        proxies[1].target_port = b.mesh_port
        wait(lambda: a.metric("meshd_mesh_links") == 1 and b.metric("meshd_mesh_links") == 1, "the link")
        total = 30
        sub = self.subscribe(b, "sub", "room", "--count", str(total))
        self.settle_interest()

        def publish(i: int) -> None:
            self.assertEqual(meshctl("pub", "room", str(i), "--url", a.url).returncode, 0)

        for i in range(10):
            publish(i)
        for proxy in proxies:
            proxy.cut()
        wait(lambda: a.metric("meshd_mesh_links") == 0, "the cut to be noticed")
        for i in range(10, 20):
            publish(i)  # queued on a for b
        for proxy in proxies:
            proxy.restore()
        wait(lambda: a.metric("meshd_mesh_links") == 1, "the link to come back")
        for i in range(20, total):
            publish(i)
        code, events = sub.finish()
        self.assertEqual(code, 0)
        self.assertEqual([e["data"] for e in events], [str(i) for i in range(total)])
        self.assertEqual(a.metric("meshd_mesh_queue_dropped_total"), 0)
