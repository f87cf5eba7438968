"""Run every benchmark scenario and write a Markdown table.

    python bench/run.py [--quick] [--only NAME ...] [--baseline REV] [--out bench/results/latest.md]

Each scenario starts its server (the raw relay or a meshd node) and the load
generator as separate processes on loopback, measures deliveries per second,
latency, losses, and the CPU and memory of both, and stops them.  Figures
are compared with the relay measured in the same run, since the machine is
shared and noisy.  Every run is bounded in time.

With ``--baseline REV`` every meshd row also runs with the node of git
revision ``REV`` (checked out into a temporary directory), right after the
same row with this tree's node, so that a change is measured against the
commit before it in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs (a host's workers, under its supervisor)."""
    found = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in map(int, children):
        found.append(child)
        found.extend(descendants(child))
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and of every process under it now (a process that ended is not counted)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            total += proc_cpu(p)
        except OSError:
            pass
    return total


def proc_sched(pid: int) -> tuple[int, int]:
    """Nanoseconds spent waiting for a CPU while runnable, and how many times the process got one."""
    _run, wait, slices = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(wait), int(slices)


def machine_cpu() -> list[int]:
    """The machine's CPU time counters (/proc/stat): user, nice, system, idle, iowait, irq, softirq, steal."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


class Window:
    """CPU share and wait for a CPU of some processes over the measuring window."""

    def __init__(self, servers: "list[Server]", loadgens: "list[subprocess.Popen]") -> None:
        self.servers, self.loadgens = servers, loadgens
        self.t0 = time.monotonic()
        self.cpu = {s.proc.pid: tree_cpu(s.proc.pid) for s in servers}
        self.sched = {p: proc_sched(p) for p in self.pids()}
        self.machine = machine_cpu()

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.servers] + [g.pid for g in self.loadgens]

    def close(self) -> dict:
        elapsed = time.monotonic() - self.t0
        waits = {}
        for pid in self.pids():
            (w0, n0), (w1, n1) = self.sched[pid], proc_sched(pid)
            waits[pid] = (w1 - w0) / max(n1 - n0, 1) / 1000
        machine = [b - a for a, b in zip(self.machine, machine_cpu())]
        return {
            "server_cpu": {s.kind + str(s.port): (tree_cpu(s.proc.pid) - self.cpu[s.proc.pid]) / elapsed
                           for s in self.servers},
            "server_rss_mib": {s.kind + str(s.port): proc_rss_kib(s.proc.pid) / 1024 for s in self.servers},
            # Mean time a process waited for a CPU each time it became runnable:
            # with more busy processes than CPUs, every hop of a message pays it.
            "cpu_wait_us": [waits[pid] for pid in self.pids()],
            # The share of the machine's time the hypervisor gave to others.
            "steal": machine[7] / max(sum(machine), 1),
        }


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def env(root: Path = ROOT) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), e.get("PYTHONPATH")]))
    e["PYTHONUNBUFFERED"] = "1"
    return e


class Server:
    """A relay or a meshd node in its own process."""

    def __init__(self, kind: str, port: int, workdir: Path, config: Optional[str] = None, groups: int = 0,
                 root: Path = ROOT) -> None:
        self.kind, self.port = kind, port
        log = open(workdir / f"{kind}-{port}.log", "w")
        if kind == "relay":
            argv = [sys.executable, str(HERE / "relay.py"), str(port), *([str(groups)] if groups else [])]
        elif config:
            path = workdir / f"node-{port}.toml"
            path.write_text(config)
            argv = [str(BIN / "twistd"), "-n", "--pidfile=", "meshd", "--config", str(path)]
        else:
            argv = [str(BIN / "twistd"), "-n", "--pidfile=", "meshd", "--listen", f"tcp:{port}:interface=127.0.0.1"]
        self.proc = subprocess.Popen(argv, env=env(root), cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{kind} did not start on {port}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Result:
    name: str
    server: str
    figures: dict = field(default_factory=dict)


def load(port: int, target: str, extra: list[str], servers: list[Server], timeout: float = 300,
         affinity: Optional[set[int]] = None) -> dict:
    """Run the load generator (on the cores ``affinity`` names, if given); sample the servers' CPU over
    its measuring window."""
    argv = [sys.executable, str(HERE / "loadgen.py"), "--target", target, "--port", str(port), *extra]
    gen = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if affinity:
        os.sched_setaffinity(gen.pid, affinity)
    window = None
    out = {}
    deadline = time.monotonic() + timeout
    for line in gen.stdout:
        line = line.strip()
        if line == "MEASURING":
            window = Window(servers, [gen])
        elif line == "MEASURED" and window is not None:
            out.update(window.close())
        elif line.startswith("{"):
            out.update(json.loads(line))
        if time.monotonic() > deadline:
            gen.kill()
            raise RuntimeError("load generator timed out")
    gen.wait()
    if "error" in out or gen.returncode:
        raise RuntimeError(f"load generator failed: {out.get('error')} {gen.stderr.read()[-2000:]}")
    return out


def load_split(sub_port: int, pub_port: int, rate: float, subscribers: int, duration: float,
               servers: list[Server]) -> dict:
    """Like load(), with the subscribers and the publisher in two load-generator processes.

    At a fixed rate the publisher must not wait for the reactor of a process
    that is also receiving every delivery: there its 1 ms pacer fires late
    whenever reads pile up, and the messages leave in bursts that queue in
    every process after it.
    """
    base = [sys.executable, str(HERE / "loadgen.py"), "--target", "meshd"]
    sub = subprocess.Popen([*base, "--role", "subscribe", "--port", str(sub_port), "--subscribers", str(subscribers)],
                           env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pub = None
    try:
        if sub.stdout.readline().strip() != "READY":
            raise RuntimeError(f"subscribers failed: {sub.stderr.read()[-2000:]}")

        def tell(line: str) -> None:
            sub.stdin.write(line + "\n")
            sub.stdin.flush()

        pub = subprocess.Popen([*base, "--role", "publish", "--port", str(pub_port), "--subscribers", "0",
                                "--rate", str(rate), "--duration", str(duration)],
                               env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, published, window = {}, None, None
        for line in pub.stdout:
            line = line.strip()
            if line == "MEASURING":
                tell("MEASURE")
                window = Window(servers, [sub, pub])
            elif line == "MEASURED" and window is not None:
                tell("STOP")
                out.update(window.close())
            elif line.startswith("{"):
                published = json.loads(line)
        pub.wait(60)
        if not published or "error" in published:
            raise RuntimeError(f"publisher failed: {published} {pub.stderr.read()[-2000:]}")
        tell(f"PUBLISHED {published['published']}")
        received = json.loads(sub.stdout.read().strip().splitlines()[-1])
        sub.wait(60)
        if "error" in received:
            raise RuntimeError(f"subscribers failed: {received}")
        out.update(received)
        out["published"] = published["published"]
        out["loadgen_cpu"] = received["loadgen_cpu"] + published["loadgen_cpu"]
        out["loadgen_cpu_parts"] = (received["loadgen_cpu"], published["loadgen_cpu"])
        return out
    finally:
        for proc in (sub, pub):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def fanout(name: str, kind: str, subscribers: int, workdir: Path, duration: float, extra=(), groups: int = 0,
           tree: "Tree | None" = None) -> Result:
    port = free_port()
    server = Server(kind, port, workdir, groups=groups, root=tree.root if tree else ROOT)
    try:
        figures = load(port, kind, ["--subscribers", str(subscribers), "--duration", str(duration), *extra], [server])
    finally:
        server.stop()
    return Result(name, tree.label if tree else kind, figures)


def history_fanout(name: str, subscribers: int, workdir: Path, duration: float, history: bool,
                   extra=()) -> Result:
    """The fan-out row of one node with a configuration file, its channels keeping history or not."""
    port = free_port()
    channels = '[[channels]]\nmatch = "bench.*"\nhistory_size = 1000\nrecover = true\n' if history else ""
    config = f"""
[websocket]
listen = ["tcp:{port}:interface=127.0.0.1"]
[[rules]]
match = "*"
anonymous = ["subscribe", "publish", "watch"]
[limits]
request_rate = 0
{channels}"""
    server = Server("meshd", port, workdir, config)
    try:
        figures = load(port, "meshd", ["--subscribers", str(subscribers), "--duration", str(duration), *extra],
                       [server])
    finally:
        server.stop()
    return Result(name, "history on" if history else "history off", figures)


def idle(name: str, kind: str, connections: int, workdir: Path, tree: "Tree | None" = None) -> Result:
    port = free_port()
    server = Server(kind, port, workdir, root=tree.root if tree else ROOT)
    try:
        time.sleep(1.0)
        before = proc_rss_kib(server.proc.pid)
        argv = [sys.executable, str(HERE / "loadgen.py"), "--target", kind, "--port", str(port), "--idle",
                "--subscribers", str(connections), "--channels", str(connections), "--duration", "600"]
        gen = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, text=True)
        try:
            for line in gen.stdout:
                if line.strip() == "READY":
                    break
            time.sleep(2.0)
            after = proc_rss_kib(server.proc.pid)
        finally:
            gen.kill()
            gen.wait()
    finally:
        server.stop()
    return Result(name, tree.label if tree else kind, {"connections": connections, "rss_before_mib": before / 1024,
                               "rss_after_mib": after / 1024, "kib_per_connection": (after - before) / connections})


def mesh_latency(name: str, workdir: Path, rate: float, duration: float, subscribers: int = 10,
                 tree: "Tree | None" = None) -> list[Result]:
    """Median latency of the same delivery on one node, and from node A to subscribers on node B."""
    from uuid import UUID

    from meshd.mesh.certs import create_ca, issue_node

    workdir.mkdir(parents=True, exist_ok=True)
    certs = workdir / "certs"
    create_ca(certs, "bench")
    ids = {n: UUID(int=i + 1) for i, n in enumerate("ab")}  # certificates name their nodes
    for n in ("a", "b"):
        issue_node(certs, n, ["127.0.0.1"], node_id=ids[n])
    ws = {n: free_port() for n in "ab"}
    mesh = {n: free_port() for n in "ab"}

    # One publisher sends every message: no per-session request limit (older trees have none, nor the key).
    knows = "request_rate" in ((tree.root if tree else ROOT) / "meshd" / "config.py").read_text()
    unlimited = "[limits]\nrequest_rate = 0" if knows else ""

    def config(n: str, seeds: list[str]) -> str:
        return f"""
[node]
id = "{ids[n]}"
[websocket]
listen = ["tcp:{ws[n]}:interface=127.0.0.1"]
[[rules]]
match = "*"
anonymous = ["subscribe", "publish", "watch"]
{unlimited}
[mesh]
cluster = "bench"
listen = "tcp:{mesh[n]}:interface=127.0.0.1"
seeds = {json.dumps(seeds)}
ca = "{certs / 'ca.pem'}"
cert = "{certs / (n + '.pem')}"
key = "{certs / (n + '.key')}"
"""

    root, label = (tree.root, tree.label) if tree else (ROOT, "meshd")
    a = Server("meshd", ws["a"], workdir, config("a", []), root=root)
    b = Server("meshd", ws["b"], workdir, config("b", [f"127.0.0.1:{mesh['a']}"]), root=root)
    results = []
    try:
        time.sleep(2.0)  # link
        local = load_split(ws["a"], ws["a"], rate, subscribers, duration, [a, b])
        results.append(Result(f"{name}: same node", label, local))
        cross = load_split(ws["b"], ws["a"], rate, subscribers, duration, [a, b])
        results.append(Result(f"{name}: A to B", label, cross))
    finally:
        a.stop()
        b.stop()
    return results


@dataclass
class Tree:
    """A meshd source tree whose node a row runs: this one, or a checked-out baseline revision."""

    label: str
    root: Path


def checkout(rev: str, into: Path) -> Tree:
    """``rev``'s tree, unpacked into ``into`` (its node runs with PYTHONPATH pointing there)."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", sha], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return Tree(f"meshd@{sha}", into)


def table(results: list[Result], baselines: dict) -> str:
    rows = ["| scenario | server | deliveries/s | vs relay | p50 ms | p99 ms | lost | server CPU | loadgen CPU | "
            "CPU wait µs | steal | server RSS MiB |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    single_channel = {r.server: r.figures["rate"] for r in results if r.name == "meshd fan-out @ S=1000"}
    for r in results:
        f = r.figures
        if "kib_per_connection" in f:
            continue
        base = baselines.get(r.name.split(" @ ")[-1])
        ratio = f"{f['rate'] / base:.2f}x" if base else ""
        if " channels x " in r.name and single_channel.get(r.server):  # that target compares with the single channel
            ratio = f"{f['rate'] / single_channel[r.server]:.2f}x of fan-out"
            layout = baselines.get("10,000 connections") if "10,000 connections" in r.name else None
            if layout:
                ratio += f"; {f['rate'] / layout:.2f}x the relay here"
        elif r.name.startswith("relay 1,000 groups"):
            ratio = "1.00x"
        cpu = ", ".join(f"{v:.0%}" for v in f.get("server_cpu", {}).values())
        rss = ", ".join(f"{v:.0f}" for v in f.get("server_rss_mib", {}).values())
        gen = " + ".join(f"{v:.0%}" for v in f["loadgen_cpu_parts"]) if "loadgen_cpu_parts" in f \
            else f"{f['loadgen_cpu']:.0%}"
        servers = len(f.get("server_cpu", {}))
        waits = [f"{w:.0f}" for w in f.get("cpu_wait_us", [])]
        wait = ", ".join(waits[:servers]) + " / " + " + ".join(waits[servers:]) if waits else ""
        rows.append(f"| {r.name} | {r.server} | {f['rate']:,.0f} | {ratio} | {f['p50_us'] / 1000:.2f} | "
                    f"{f['p99_us'] / 1000:.2f} | {f['lost']} | {cpu} | {gen} | {wait} | {f.get('steal', 0):.0%} | {rss} |")
    idle_rows = [r for r in results if "kib_per_connection" in r.figures]
    if idle_rows:
        rows += ["", "| idle scenario | server | connections | RSS before MiB | RSS after MiB | KiB per connection |",
                 "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in idle_rows:
            f = r.figures
            rows.append(f"| {r.name} | {r.server} | {f['connections']} | {f['rss_before_mib']:.1f} | "
                        f"{f['rss_after_mib']:.1f} | {f['kib_per_connection']:.1f} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    p.add_argument("--only", nargs="*", help="scenario groups: fanout, channels, idle, mesh, history, conns")
    p.add_argument("--baseline", metavar="REV", help="also run every meshd row with the node of git revision REV")
    p.add_argument("--out", type=Path, default=HERE / "results" / "latest.md")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    duration = 2.0 if args.quick else 5.0
    groups = set(args.only or ["fanout", "channels", "idle", "mesh"])
    results: list[Result] = []
    conn_results: list[Result] = []
    baselines: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trees = [Tree("meshd", ROOT)]
        if args.baseline:
            trees.append(checkout(args.baseline, work / "baseline"))
        if "fanout" in groups or "channels" in groups:
            for s in (100, 1000):
                r = fanout(f"relay @ S={s}", "relay", s, work, duration)
                baselines[f"S={s}"] = r.figures["rate"]
                results.append(r)
                if "fanout" in groups:
                    for tree in trees:
                        results.append(fanout(f"meshd fan-out @ S={s}", "meshd", s, work, duration, tree=tree))
                    for tree in trees:
                        results.append(fanout(f"meshd fan-out, batch frames @ S={s}", "meshd", s, work, duration,
                                              ["--batch"], tree=tree))
        if "channels" in groups:
            # 1,000 channels with 10 subscribers each: the same 1,000 connections
            # as the single channel (each in 10 channels), then 10,000
            # connections in one channel each.
            for tree in trees:
                results.append(fanout("meshd 1,000 channels x 10, 1,000 connections @ S=1000", "meshd", 1000, work,
                                      duration, ["--channels", "1000", "--subscriptions", "10", "--window", "1000"],
                                      tree=tree))
            # The relay in the same layout: connections in 1,000 groups of 10.
            spread = ["--channels", "1000", "--window", "1000"]
            r = fanout("relay 1,000 groups x 10, 10,000 connections", "relay", 10_000, work, duration, spread,
                       groups=1000)
            baselines["10,000 connections"] = r.figures["rate"]
            results.append(r)
            for tree in trees:
                results.append(fanout("meshd 1,000 channels x 10, 10,000 connections @ S=1000", "meshd", 10_000,
                                      work, duration, spread, tree=tree))
        if "history" in groups:
            # What a history channel costs its fan-out: the same node and load, the channel keeping
            # history or not, interleaved (each event numbered, encoded with its position, kept).
            for s in (100, 1000):
                for on in (False, True, False, True):
                    results.append(history_fanout(f"meshd fan-out, batch frames @ S={s}", s, work, duration, on,
                                                  ["--batch"]))
        if "idle" in groups:
            n = 1000 if args.quick else 5000
            results.append(idle(f"relay, {n} idle", "relay", n, work))
            for tree in trees:
                results.append(idle(f"meshd, {n} idle subscribed", "meshd", n, work, tree=tree))
        if "mesh" in groups:
            # The last pair leaves the machine more idle CPU: the hop on its own.
            for rate, subscribers in ((2_000, 10), (10_000, 10), (10_000, 1)):
                who = "1 subscriber" if subscribers == 1 else f"{subscribers} subscribers"
                for tree in trees:
                    results += mesh_latency(f"{rate:,} msg/s to {who}", work / f"mesh{rate}-{subscribers}-{tree.label}",
                                            rate, duration, subscribers, tree=tree)
        if "conns" in groups:
            import conns

            conn_results = conns.group(work, trees, quick=args.quick)
    header = (f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"{platform.system()} {platform.release()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n")
    text = header + (table(results, baselines) if results else "")
    if conn_results:
        text += "\n" + conns.table(conn_results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    (args.out.with_suffix(".json")).write_text(json.dumps([r.__dict__ for r in results + conn_results], indent=1))
    print(text)


if __name__ == "__main__":
    main()
