"""A full mesh of N meshd nodes in one process, over real TLS links on loopback.

    python bench/meshsim.py [--nodes 16 32 [64]] [--messages 200] [--window 1] [--churn 12] [--kill] [--out FILE.json]

Each node is a ``meshd.app.Application`` with a ``[mesh]`` section and its
own certificate (one cluster CA); node i's only seed is node 0, so the mesh
forms by gossip from one seed.  Every node also serves WebSocket clients on
a port of its own, and the clients (``meshd.client``) run in the same
process.  For each N (each in a fresh child process of its own, so that the
memory figures start from the same baseline; ``--in-process`` runs them all
here) it measures:

- formation: from starting the nodes until every node has N-1 open links
  (``mesh.linked()``) and no other connection (``mesh.links``);
- memory: this process's RSS (``VmRSS``) before the nodes start and after
  formation, per node and per link end (each link has both ends here);
- interest per subscribe: one client subscribes to a new channel, then
  unsubscribes; the Interest frames naming that channel that nodes receive
  (each node's ``mesh.interest_received`` is wrapped to count them), and
  how long until every other node knows of it;
- fan-out: one subscriber per node on one channel, a publisher on node 0
  publishing ``--messages`` messages, the next once ``--window`` are
  unacknowledged no more; every subscriber must get each message exactly
  once and in order; elapsed time, deliveries/s, and this process's CPU
  time per delivery (nodes and clients together: it is one process);
- churn (``--churn SECONDS``, 0: none): publishers on nodes 0 and 1 go on
  publishing while one other node at a time is stopped (``stopService``)
  and started again as a new incarnation with the same id and address
  every ``--churn-interval`` seconds; the subscribers on the nodes that
  stayed up must get every message of each origin exactly once, in order.
  With ``--kill`` a node goes as a killed process would: its listeners
  closed and every connection reset, without a Goodbye, so that its peers
  find out from the reset and drop what they queued for it.

Every phase has a timeout; a phase that runs out is reported as such and the
run goes on to the next one, and the whole child is killed past
``--size-timeout``.  Log events of the nodes are counted by their format
(warnings are listed), not printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from uuid import UUID, uuid4

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class LogCounter:
    """Counts the nodes' log events by format; keeps a few of each warning and error."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.warnings: Counter = Counter()
        self.samples: dict[str, str] = {}

    def __call__(self, event: dict) -> None:
        fmt = event.get("log_format") or ""
        self.counts[fmt] += 1
        level = event.get("log_level")
        name = getattr(level, "name", "")
        if name in ("warn", "error", "critical") or event.get("log_failure") is not None:
            self.warnings[fmt] += 1
            if fmt not in self.samples:
                from twisted.logger import formatEvent

                try:
                    self.samples[fmt] = formatEvent(event)[:300]
                except Exception:
                    self.samples[fmt] = fmt

    def count(self, prefix: str) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith(prefix))


class Sim:
    """N nodes of one cluster in this process, and their clients."""

    def __init__(self, reactor, n: int, workdir: Path, logs: LogCounter, settings: dict) -> None:
        self.reactor, self.n, self.workdir, self.logs = reactor, n, workdir, logs
        self.extra = settings
        self.certs = workdir / "certs"
        self.ids: list[UUID] = []
        self.apps: list = [None] * n
        self.ws_ports: list = [None] * n
        self.mesh_ports: list[int] = [0] * n
        self.urls: list[str] = [""] * n
        self.clients: list = []
        self.interest_frames = Counter()  # channel -> Interest frames received naming it
        self.interest_frames_total = 0

    def make_certs(self) -> None:
        from meshd.mesh.certs import create_ca, issue_node

        create_ca(self.certs, "sim")
        for i in range(self.n):
            node_id = uuid4()
            issue_node(self.certs, f"n{i}", ["127.0.0.1"], node_id=node_id)
            self.ids.append(node_id)

    def settings(self, i: int, port: int):
        from meshd.config import MeshSettings

        seeds = () if i == 0 else (f"127.0.0.1:{self.mesh_ports[0]}",)
        return MeshSettings(
            cluster="sim", listen=f"tcp:{port}:interface=127.0.0.1", advertise=f"127.0.0.1:{port}",
            ca=self.certs / "ca.pem", cert=self.certs / f"n{i}.pem", key=self.certs / f"n{i}.key",
            seeds=seeds, **self.extra,
        )

    async def start_node(self, i: int) -> None:
        """Start node i (again: a new Application, same id, same mesh port once it has one)."""
        from twisted.internet.endpoints import TCP4ServerEndpoint

        from meshd.app import Application
        from meshd.config import Config
        from meshd.permissions import Rule

        rules = (Rule("*", anonymous=frozenset({"subscribe", "publish", "watch"})),)
        config = Config(source=Path("meshsim.toml"), rules=rules, node_id=self.ids[i], node_name=f"n{i}",
                        mesh=self.settings(i, self.mesh_ports[i]), request_rate=0, drain_seconds=0)
        app = Application(config)
        app.startService()
        self.apps[i] = app
        self.mesh_ports[i] = int(app.mesh.advertise.rpartition(":")[2])
        self._count_interest(app)
        port = await TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(app.factory)
        self.ws_ports[i] = port
        self.urls[i] = f"ws://127.0.0.1:{port.getHost().port}"

    def _count_interest(self, app) -> None:
        """Count the Interest frames this node receives on open links (by the channels they name)."""
        mesh = app.mesh
        original = mesh.interest_received

        def counted(link, interest):
            self.interest_frames_total += 1
            for channel in set(interest.add) | set(interest.remove):
                self.interest_frames[channel] += 1
            return original(link, interest)

        mesh.interest_received = counted  # an instance attribute: Link._dispatch calls mesh.interest_received

    async def stop_node(self, i: int, kill: bool = False) -> None:
        """Stop node i; ``kill``: as a killed process would, its connections reset first, no Goodbye said."""
        app, port = self.apps[i], self.ws_ports[i]
        self.apps[i] = self.ws_ports[i] = None
        if kill and app is not None:
            # A killed process's listeners go with it: peers redialing meanwhile must find nothing there.
            # (The bench reaches into the mesh for it; a node has no way to stop without saying Goodbye.)
            app.mesh._listening.stopListening()
            if port is not None:
                await port.stopListening()
                port = None
            for link in list(app.mesh.links):
                link.transport.abortConnection()
            for session in list(app.registry.sessions.values()):
                session.protocol.transport.abortConnection()
            # Then the node stops at once, before the losses reach it (it would redial): its links
            # are aborting, so the Goodbyes of its stop go nowhere.
        if port is not None:
            await port.stopListening()
        if app is not None and app.running:
            await app.stopService()

    def up(self) -> list[int]:
        return [i for i, a in enumerate(self.apps) if a is not None]

    def linked(self, i: int) -> int:
        return len(self.apps[i].mesh.linked())

    def full(self, nodes: list[int] | None = None) -> bool:
        nodes = self.up() if nodes is None else nodes
        want = self.n - 1
        return all(self.linked(i) == want for i in nodes)

    def settled(self) -> bool:
        """Full mesh and no connection besides the links (no duplicates or handshakes under way)."""
        want = self.n - 1
        return self.full() and all(len(self.apps[i].mesh.links) == want for i in self.up())

    async def client(self, i: int):
        from meshd.client import connect

        c = await connect(self.urls[i], reactor=self.reactor, timeout=30)
        self.clients.append(c)
        return c

    async def close_clients(self) -> None:
        for c in self.clients:
            c.abort()
        self.clients = []

    def metric_sum(self, name: str) -> int:
        return sum(getattr(a.metrics, name) for a in self.apps if a is not None)


async def wait_for(reactor, condition, timeout: float, step: float = 0.02) -> float | None:
    """Seconds until ``condition()`` held, or None past ``timeout``."""
    from twisted.internet.task import deferLater

    t0 = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None
        await deferLater(reactor, step, lambda: None)


async def sleep(reactor, seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


def check_sequence(got: list[int], count: int) -> dict:
    """How ``got`` differs from 0..count-1: missing, duplicated, out of order."""
    seen: Counter = Counter(got)
    dups = sum(v - 1 for v in seen.values() if v > 1)
    missing = sum(1 for k in range(count) if k not in seen)
    disorder = sum(1 for a, b in pairwise(got) if b <= a)
    return {"ok": got == list(range(count)), "missing": missing, "duplicates": dups, "out_of_order": disorder}


async def publish_window(client, channel: str, count: int, window: int, payload=lambda k: b"%d" % k) -> None:
    """Publish ``count`` messages with at most ``window`` unacknowledged."""
    from twisted.internet.defer import DeferredList

    pending = []
    for k in range(count):
        pending.append(client.publish(channel, payload(k)))
        if len(pending) >= window:
            await pending.pop(0)
    if pending:
        await DeferredList(pending, fireOnOneErrback=True, consumeErrors=True)


async def run_size(reactor, n: int, args) -> dict:
    from twisted.logger import globalLogPublisher

    out: dict = {"nodes": n, "links": n * (n - 1) // 2, "failures": []}
    logs = LogCounter()
    globalLogPublisher.addObserver(logs)
    extra = {}
    if args.heartbeat_timeout:
        extra["heartbeat_timeout"] = args.heartbeat_timeout
    if args.heartbeat_interval:
        extra["heartbeat_interval"] = args.heartbeat_interval
    out["heartbeat"] = [args.heartbeat_interval or 1.0, args.heartbeat_timeout or 5.0]
    with tempfile.TemporaryDirectory() as tmp:
        sim = Sim(reactor, n, Path(tmp), logs, extra)
        sim.make_certs()
        out["lost_links_by_phase"] = {}
        try:
            await _phases(reactor, sim, n, args, out)
        except Exception as e:  # report what ran; the cleanup below still runs
            out["failures"].append(f"{type(e).__name__}: {e}")
        finally:
            out["lost_links_by_phase"]["before teardown"] = logs.count("Lost the link")
            await sim.close_clients()
            t = time.monotonic()
            for i in sim.up():
                try:
                    await sim.stop_node(i)
                except Exception as e:
                    out["failures"].append(f"stopping n{i}: {e}")
            out["stop_s"] = time.monotonic() - t
    out["log_counts"] = {
        "linked": logs.count("Linked with"),
        "two_links": logs.count("Two links with"),
        "lost_link": logs.count("Lost the link"),
        "closed_link": logs.count("Node {node} at {address} closed the link"),
        "closed_before_linking": logs.count("Mesh connection {direction}"),
        "learned": logs.count("Learned of node"),
        "queue_dropped": logs.count("Dropped {count} queued"),
    }
    out["warnings"] = {fmt[:120]: [count, logs.samples.get(fmt, "")] for fmt, count in logs.warnings.most_common(12)}
    globalLogPublisher.removeObserver(logs)
    return out


async def _phases(reactor, sim: Sim, n: int, args, out: dict) -> None:
    fails = out["failures"]
    # -- formation -------------------------------------------------------------------
    gc.collect()
    rss0, cpu0 = rss_kib(), cpu_seconds()
    t0 = time.monotonic()
    await sim.start_node(0)
    for i in range(1, n):
        await sim.start_node(i)
    out["start_s"] = time.monotonic() - t0
    timeout = args.formation_timeout + n
    full = await wait_for(reactor, sim.full, timeout - (time.monotonic() - t0), step=0.01)
    if full is None:
        counts = sorted(sim.linked(i) for i in range(n))
        fails.append(f"formation: no full mesh after {timeout:.0f}s; links per node min {counts[0]} "
                     f"median {counts[n // 2]} max {counts[-1]} of {n - 1}")
        out["formation_s"] = None
        out["links_min"] = counts[0]
        return
    out["formation_s"] = time.monotonic() - t0
    out["formation_cpu_s"] = cpu_seconds() - cpu0
    settled = await wait_for(reactor, sim.settled, 20)
    out["settled_s"] = None if settled is None else time.monotonic() - t0
    if settled is None:
        extra = sum(len(sim.apps[i].mesh.links) - (n - 1) for i in range(n))
        fails.append(f"formation: {extra} connections besides the links 20s after the full mesh")
    out["open_links"] = sum(sim.linked(i) for i in range(n)) // 2
    await sleep(reactor, 1.0)
    gc.collect()
    rss1 = rss_kib()
    out["rss_before_mib"], out["rss_after_mib"] = rss0 / 1024, rss1 / 1024
    out["kib_per_node"] = (rss1 - rss0) / n
    out["kib_per_link_end"] = (rss1 - rss0) / (n * (n - 1))
    out["formation_log"] = {"two_links": sim.logs.count("Two links with"),
                            "closed_before_linking": sim.logs.count("Mesh connection {direction}")}
    # Idle cost of the full mesh: heartbeats on every link.
    c0, t1 = cpu_seconds(), time.monotonic()
    await sleep(reactor, 3.0)
    out["idle_cpu"] = (cpu_seconds() - c0) / (time.monotonic() - t1)

    out["lost_links_by_phase"]["formation"] = sim.logs.count("Lost the link")
    # -- interest per subscribe ------------------------------------------------------
    channel = f"sim.interest.{n}"
    sub = await sim.client(n // 2)
    holder = sim.ids[n // 2]
    others = [i for i in range(n) if i != n // 2]

    def knows(present: bool):
        def check() -> bool:
            for i in others:
                peer = sim.apps[i].mesh.peers.get(holder)
                if peer is None or (channel in peer.interests) != present:
                    return False
            return True
        return check

    before, total0 = sim.interest_frames[channel], sim.interest_frames_total
    t = time.monotonic()
    await sub.subscribe(channel)
    seen = await wait_for(reactor, knows(True), 15, step=0.002)
    out["interest_settle_ms"] = None if seen is None else (time.monotonic() - t) * 1000
    await sleep(reactor, 0.5)
    out["interest_frames_subscribe"] = sim.interest_frames[channel] - before
    out["interest_frames_all_subscribe"] = sim.interest_frames_total - total0
    if seen is None:
        fails.append("interest: not every node learned of the subscription within 15s")
    before = sim.interest_frames[channel]
    await sub.unsubscribe(channel)
    gone = await wait_for(reactor, knows(False), 15, step=0.002)
    await sleep(reactor, 0.5)
    out["interest_frames_unsubscribe"] = sim.interest_frames[channel] - before
    if gone is None:
        fails.append("interest: not every node learned of the unsubscribe within 15s")

    # -- fan-out ---------------------------------------------------------------------
    channel = f"sim.fanout.{n}"
    m = args.messages
    got: list[list[int]] = [[] for _ in range(n)]
    subs = []
    for i in range(n):
        c = await sim.client(i)
        c.add_listener(lambda e, box=got[i]: box.append(int(e.payload)) if e.channel == channel else None)
        await c.subscribe(channel)
        subs.append(c)
    ids = set(sim.ids) - {sim.ids[0]}
    ready = await wait_for(reactor, lambda: all(
        channel in p.interests for node, p in sim.apps[0].mesh.peers.items() if node in ids), 15)
    if ready is None:
        fails.append("fan-out: node 0 did not learn every subscriber node's interest within 15s")
    pub = await sim.client(0)
    dup0 = sim.metric_sum("mesh_duplicates")
    gc.collect()
    c0, t = cpu_seconds(), time.monotonic()
    try:
        await publish_window(pub, channel, m, args.window)
    except Exception as e:
        fails.append(f"fan-out: publish failed: {e}")
    out["publish_s"] = time.monotonic() - t
    done = await wait_for(reactor, lambda: all(len(g) >= m for g in got), args.phase_timeout, step=0.001)
    elapsed = time.monotonic() - t
    cpu = cpu_seconds() - c0
    await sleep(reactor, 0.5)  # late duplicates
    checks = [check_sequence(g, m) for g in got]
    delivered = sum(len(g) for g in got)
    out["fanout"] = {
        "messages": m, "window": args.window, "elapsed_s": elapsed, "complete": done is not None,
        "delivered": delivered, "expected": n * m, "deliveries_per_s": delivered / elapsed,
        "cpu_us_per_delivery": cpu / max(delivered, 1) * 1e6, "cpu_share": cpu / elapsed,
        # less the idle mesh's own CPU (heartbeats) over the same time; meaningless once that saturates the core
        "cpu_us_per_delivery_net": max(0.0, cpu - out["idle_cpu"] * elapsed) / max(delivered, 1) * 1e6,
        "subscribers_ok": sum(c["ok"] for c in checks),
        "missing": sum(c["missing"] for c in checks), "duplicates": sum(c["duplicates"] for c in checks),
        "out_of_order": sum(c["out_of_order"] for c in checks),
        "mesh_duplicates": sim.metric_sum("mesh_duplicates") - dup0,
    }
    if out["fanout"]["subscribers_ok"] != n:
        fails.append(f"fan-out: {n - out['fanout']['subscribers_ok']} subscribers did not get 0..{m - 1} once in order")
    for c in subs + [pub]:
        c.abort()
    sim.clients = []
    await sleep(reactor, 0.5)

    out["lost_links_by_phase"]["after fan-out"] = sim.logs.count("Lost the link")
    # -- churn -----------------------------------------------------------------------
    if args.churn > 0:
        out["churn"] = await churn(reactor, sim, n, args, fails)
    out["mesh_queue_dropped"] = sim.metric_sum("mesh_queue_dropped")
    out["mesh_refusals"] = sim.metric_sum("mesh_refusals")


async def churn(reactor, sim: Sim, n: int, args, fails: list) -> dict:
    """Publish from nodes 0 and 1 while the others are stopped and started again one at a time."""
    from twisted.internet.defer import ensureDeferred

    channel = f"sim.churn.{n}"
    origins = (0, 1)
    # received[i][origin] = payload numbers, in arrival order, for the subscriber on node i
    received: dict[int, dict[int, list[int]]] = {}

    async def subscribe(i: int, tag: str) -> None:
        c = await sim.client(i)
        box = received.setdefault(tag, {o: [] for o in origins})

        def on_event(e) -> None:
            if e.channel == channel:
                o, k = e.payload.split(b":")
                box[int(o)].append(int(k))
        c.add_listener(on_event)
        await c.subscribe(channel)

    for i in range(n):
        await subscribe(i, f"n{i}")
    await wait_for(reactor, lambda: all(
        channel in p.interests for o in origins for node, p in sim.apps[o].mesh.peers.items()), 15)

    published = {o: 0 for o in origins}
    stop = [False]
    pubs = {o: await sim.client(o) for o in origins}
    errors: list[str] = []

    async def publisher(o: int) -> None:
        c = pubs[o]
        while not stop[0]:
            k = published[o]
            try:
                await c.publish(channel, b"%d:%d" % (o, k))
            except Exception as e:
                errors.append(f"publisher on n{o}: {e}")
                return
            published[o] = k + 1
            await sleep(reactor, args.churn_pause)

    running = [ensureDeferred(publisher(o)) for o in origins]
    victims = list(range(2, n))
    restarts = []
    stayed = set(range(n))
    t_end = time.monotonic() + args.churn
    k = 0
    while time.monotonic() < t_end and victims:
        await sleep(reactor, args.churn_interval / 2)
        v = victims[k % len(victims)]
        k += 1
        stayed.discard(v)
        t = time.monotonic()
        lost0 = sim.logs.count("Lost the link")
        shut0 = sim.logs.count("Node {node} is shutting down")
        await sim.stop_node(v, kill=args.kill)
        await sleep(reactor, args.churn_interval / 2)
        lost1 = sim.logs.count("Lost the link")
        shut1 = sim.logs.count("Node {node} is shutting down")
        await sim.start_node(v)
        started = time.monotonic()
        relinked = await wait_for(reactor, lambda: sim.full(), 30)
        restarts.append({"node": v, "stopped_s": started - t, "relink_s": relinked,
                         "lost_on_stop": lost1 - lost0, "shutdown_seen": shut1 - shut0,
                         "lost_on_restart": sim.logs.count("Lost the link") - lost1})
        if relinked is None:
            fails.append(f"churn: n{v} restarted, no full mesh within 30s "
                         f"(its links {sim.linked(v)}, min of others {min(sim.linked(i) for i in sim.up())})")
        else:
            await subscribe(v, f"n{v}#{k}")  # a new subscriber on the new incarnation (not checked for loss)
    stop[0] = True
    for d in running:
        await d
    total = published
    settle = await wait_for(reactor, lambda: all(
        len(received[f"n{i}"][o]) >= total[o] for i in stayed for o in origins), args.phase_timeout)
    await sleep(reactor, 0.5)
    bad = []
    dups = disorder = missing = 0
    for i in sorted(stayed):
        for o in origins:
            r = check_sequence(received[f"n{i}"][o], total[o])
            dups += r["duplicates"]
            disorder += r["out_of_order"]
            missing += r["missing"]
            if not r["ok"]:
                bad.append(f"n{i} from n{o}: {r}")
    rejoined_bad = 0
    for tag, box in received.items():
        if "#" in tag:
            for o in origins:
                r = box[o]
                if len(set(r)) != len(r) or r != sorted(r):
                    rejoined_bad += 1
    if bad:
        fails.append(f"churn: {len(bad)} (subscriber, origin) pairs on nodes that stayed up not exactly once "
                     f"in order: {bad[:3]}")
    fails.extend(errors)
    for c in sim.clients:
        c.abort()
    sim.clients = []
    return {
        "seconds": args.churn, "killed": args.kill, "restarts": len(restarts), "published": dict(total),
        "stayed": len(stayed), "settled": settle is not None, "pairs_bad": len(bad),
        "missing": missing, "duplicates": dups, "out_of_order": disorder,
        "rejoined_subscribers_bad": rejoined_bad,
        "relink_s": [r["relink_s"] for r in restarts],
        "restart_detail": restarts,
    }


def fmt(v, spec: str = ".2f", none: str = "—") -> str:
    return none if v is None else format(v, spec)


def table(r: dict) -> str:
    n = r["nodes"]
    rows = [f"### N = {n}", "", "| figure | value |", "| --- | ---: |"]

    def row(name: str, value: str) -> None:
        rows.append(f"| {name} | {value} |")

    hb = r.get("heartbeat")
    if hb:
        row("mesh heartbeat_interval / heartbeat_timeout (s)", f"{hb[0]:g} / {hb[1]:g}")
    row("links in a full mesh, N(N-1)/2", f"{r['links']}")
    row("open links after formation", fmt(r.get("open_links"), "d"))
    row("nodes started (s)", fmt(r.get("start_s")))
    row("formation: every node N-1 links (s)", fmt(r.get("formation_s")))
    row("formation: no other connections left (s)", fmt(r.get("settled_s")))
    row("CPU during formation (s)", fmt(r.get("formation_cpu_s")))
    fl = r.get("formation_log", {})
    row("nodes learned by gossip (log 'Learned of node', all nodes)", fmt(r.get("log_counts", {}).get("learned"), "d"))
    row("duplicate links resolved during formation", fmt(fl.get("two_links"), "d"))
    row("connections closed before linking during formation", fmt(fl.get("closed_before_linking"), "d"))
    row("RSS before / after formation (MiB)",
        f"{fmt(r.get('rss_before_mib'), '.1f')} / {fmt(r.get('rss_after_mib'), '.1f')}")
    row("memory per node (KiB)", fmt(r.get("kib_per_node"), ",.0f"))
    row("memory per link end (KiB)", fmt(r.get("kib_per_link_end"), ",.1f"))
    row("idle CPU of the full mesh (heartbeats), share of a core", fmt(r.get("idle_cpu"), ".0%"))
    row("Interest frames per subscribe (naming the channel)", fmt(r.get("interest_frames_subscribe"), "d"))
    row("Interest frames per unsubscribe", fmt(r.get("interest_frames_unsubscribe"), "d"))
    row("subscribe to every node knowing it (ms)", fmt(r.get("interest_settle_ms"), ".1f"))
    f = r.get("fanout")
    if f:
        row(f"fan-out: {f['messages']} msgs to {n} subscribers, window {f['window']} (s)", fmt(f["elapsed_s"]))
        row("fan-out: delivered / expected", f"{f['delivered']} / {f['expected']}")
        row("fan-out: subscribers all once, in order", f"{f['subscribers_ok']} / {n}")
        row("fan-out: missing / duplicates / out of order",
            f"{f['missing']} / {f['duplicates']} / {f['out_of_order']}")
        row("fan-out: deliveries/s", fmt(f["deliveries_per_s"], ",.0f"))
        row("fan-out: process CPU per delivery (µs)", fmt(f["cpu_us_per_delivery"], ",.0f"))
        row("fan-out: the same, less the idle mesh's CPU (µs)", fmt(f.get("cpu_us_per_delivery_net"), ",.0f"))
    c = r.get("churn")
    if c:
        row(f"churn: restarts in {c['seconds']:.0f}s", f"{c['restarts']}")
        row("churn: how a node goes", "killed (connections reset, no Goodbye)" if c.get("killed") else "stopped")
        row("churn: published (n0, n1)", f"{c['published'].get(0, c['published'].get('0'))}, "
            f"{c['published'].get(1, c['published'].get('1'))}")
        row("churn: stayed-up subscribers × origins not exactly once in order", f"{c['pairs_bad']}")
        row("churn: missing / duplicates / out of order", f"{c['missing']} / {c['duplicates']} / {c['out_of_order']}")
        row("churn: relink after restart (s)", ", ".join(fmt(x, ".1f") for x in c["relink_s"]))
        d = c.get("restart_detail", [])
        row("churn: per stop, 'is shutting down' / 'Lost the link' logged",
            ", ".join(f"{x['shutdown_seen']}/{x['lost_on_stop']}" for x in d))
        row("churn: per restart, 'Lost the link' logged while relinking", ", ".join(str(x["lost_on_restart"]) for x in d))
    lc = r.get("log_counts", {})
    row("log: links lost / closed by peer / closed before linking",
        f"{lc.get('lost_link', 0)} / {lc.get('closed_link', 0)} / {lc.get('closed_before_linking', 0)}")
    lp = r.get("lost_links_by_phase", {})
    row("'Lost the link' logged, cumulative: " + ", ".join(lp), ", ".join(str(v) for v in lp.values()))
    row("mesh_queue_dropped / mesh_refusals (all nodes)",
        f"{fmt(r.get('mesh_queue_dropped'), 'd')} / {fmt(r.get('mesh_refusals'), 'd')}")
    row("stopping all nodes (s)", fmt(r.get("stop_s")))
    rows.append("")
    if r["failures"]:
        rows.append("Failures: " + "; ".join(r["failures"]))
        rows.append("")
    if r.get("warnings"):
        rows.append("Warnings logged (count, first):")
        for count, sample in r["warnings"].values():
            rows.append(f"- {count} x `{sample[:200]}`")
        rows.append("")
    return "\n".join(rows)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--messages", type=int, default=200)
    p.add_argument("--window", type=int, default=1, help="publishes awaiting their Ack at a time")
    p.add_argument("--churn", type=float, default=12.0, help="seconds of churn (0: none)")
    p.add_argument("--churn-interval", type=float, default=3.0, help="a node stopped and started every this")
    p.add_argument("--churn-pause", type=float, default=0.005, help="pause between a publisher's publishes")
    p.add_argument("--kill", action="store_true",
                   help="churn kills nodes (every connection reset, no Goodbye) instead of stopping them")
    p.add_argument("--formation-timeout", type=float, default=60.0, help="plus one second per node")
    p.add_argument("--phase-timeout", type=float, default=60.0)
    p.add_argument("--heartbeat-timeout", type=float, default=0.0, help="mesh.heartbeat_timeout (0: default, 5)")
    p.add_argument("--heartbeat-interval", type=float, default=0.0, help="mesh.heartbeat_interval (0: default, 1)")
    p.add_argument("--size-timeout", type=float, default=600.0, help="a child (one N) is killed past this")
    p.add_argument("--in-process", action="store_true", help="every N in this process (no child per N)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    return p.parse_args()


def run_sizes(args) -> list[dict]:
    """Every N in this process, under react()."""
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    results: list[dict] = []

    async def main(reactor) -> None:
        from twisted.logger import globalLogBeginner

        globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)  # events go to LogCounter only
        for n in args.nodes:
            results.append(await run_size(reactor, n, args))

    try:
        task.react(lambda reactor: ensureDeferred(main(reactor)))
    except SystemExit as e:
        if e.code:
            raise
    return results


def main() -> None:
    args = parse()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.child or args.in_process:
        results = run_sizes(args)
        if args.child:
            print("RESULT " + json.dumps(results[0]), flush=True)
            return
    else:
        results = []
        for n in args.nodes:
            argv = [sys.executable, __file__, "--child", "--nodes", str(n)]
            for key in ("messages", "window", "churn", "churn_interval", "churn_pause", "formation_timeout",
                        "phase_timeout", "heartbeat_timeout", "heartbeat_interval"):
                argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            if args.kill:
                argv.append("--kill")
            t = time.monotonic()
            try:
                proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=args.size_timeout,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    r = {"nodes": n, "links": n * (n - 1) // 2,
                         "failures": [f"child exited {proc.returncode}: {proc.stderr[-1500:]}"]}
                else:
                    r = json.loads(line[7:])
            except subprocess.TimeoutExpired:
                r = {"nodes": n, "links": n * (n - 1) // 2, "failures": [f"killed after {args.size_timeout:.0f}s"]}
            r["wall_s"] = time.monotonic() - t
            results.append(r)
            print(table(r), flush=True)
    if args.in_process:
        for r in results:
            print(table(r), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
