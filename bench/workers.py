"""Workers: what a host's workers cost per delivery and per publish, and what N cores would deliver.

    python bench/workers.py [--quick] [--only cost connections] [--out FILE]

Also ``python bench/run.py --only workers``.  Three parts, 1 and 2 workers
interleaved in one run (``[node] workers``, docs/scaling.md):

1. **CPU cost at a fixed rate.** One publisher and S subscribers (two
   load-generator processes), publishing at a rate well below saturation;
   the CPU of the host's processes (supervisor and workers) over the
   measuring window, divided by the deliveries and by the publishes made.
   Two subscriber counts give a line through them for 1 worker and for 2:
   CPU per publish = ``c_pub + S * c_del``.  With 2 workers the subscribers
   are spread by the kernel, and each publish also crosses the local link
   once: what the line's intercept gains is ``c_hop``.
2. **Fan-out** with 100 messages in flight, an event frame per delivery,
   the host (1 or 2 workers) pinned to core 0 and the load generator to
   core 1: what the hop costs when one core is the host's; then nothing
   pinned, the load generator sharing both cores with the workers.
3. **Connections on a host of workers** (``--only connections``): what one
   process cannot hold under this machine's limit of 20,000 open files,
   measured with ``bench/conns.py``'s functions: 50,000 idle subscribed
   connections on 3 workers, a reconnect storm of 20,000 clients on 2, and
   handshakes/s with 2 workers against the relay.
4. **The model**: deliveries/s on N cores, each worker on a core of its own
   and the clients elsewhere, every publish reaching every worker, is
   ``N * S / (c_pub + (N - 1) * c_hop + S * c_del)``, with the inputs measured
   in part 1 (``c_del`` as measured with 2 workers, for N of 2 or more).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import HERE, Result, Server, descendants, free_port, load, load_split  # noqa: E402


def host_config(port: int, workers: int) -> str:
    return f"""
[node]
workers = {workers}
drain_seconds = 0
[websocket]
listen = ["tcp:{port}:interface=127.0.0.1"]
[[rules]]
match = "*"
anonymous = ["subscribe", "publish", "watch"]
[limits]
request_rate = 0
"""


def start(workers: int, work: Path, port: int = 0, config: str = "") -> Server:
    """A host of ``workers`` (its own configuration on a free port unless given), once its workers are up."""
    port = port or free_port()
    server = Server("meshd", port, work, config or host_config(port, workers))
    if workers > 1:
        deadline = time.monotonic() + 30
        while len(descendants(server.proc.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # every worker listening, and linked with the others over its Unix socket
    return server


def pin(server: Server, cores: set[int]) -> None:
    for pid in [server.proc.pid, *descendants(server.proc.pid)]:
        os.sched_setaffinity(pid, cores)


def cost(workers: int, subscribers: int, rate: float, duration: float, work: Path) -> Result:
    server = start(workers, work)
    try:
        f = load_split(server.port, server.port, rate, subscribers, duration, [server])
    finally:
        server.stop()
    cpu = sum(f["server_cpu"].values())  # cores busy over the window
    f["workers"] = workers
    f["subscribers"] = subscribers
    f["publish_rate"] = f["published"] / f["seconds"] if f.get("seconds") else rate
    f["cpu_us_per_delivery"] = cpu / f["rate"] * 1e6 if f["rate"] else 0.0
    f["cpu_us_per_publish"] = cpu / rate * 1e6
    return Result(f"{rate:,.0f} msg/s to {subscribers} subscribers", f"{workers} worker{'s' * (workers > 1)}", f)


def fanout(workers: int, subscribers: int, duration: float, work: Path, pinned: bool) -> Result:
    """Fan-out with 100 messages in flight, an event frame per delivery (no Batch frames: they make
    deliveries so cheap for the host that the load generator, reading them, is all that is measured)."""
    server = start(workers, work)
    try:
        argv = ["--subscribers", str(subscribers), "--duration", str(duration), "--window", "100"]
        if pinned:
            pin(server, {0})
            f = load(server.port, "meshd", argv, [server], affinity={1})
        else:
            f = load(server.port, "meshd", argv, [server])
    finally:
        server.stop()
    f["workers"] = workers
    f["pinned"] = pinned
    where = "host on core 0, load generator on core 1" if pinned else "host and load generator on both cores"
    return Result(f"fan-out @ S={subscribers}: {where}", f"{workers} worker{'s' * (workers > 1)}", f)


def model(costs: list[Result]) -> dict:
    """The model's inputs, in µs, from the fixed-rate rows (means of the repeats).

    For each number of workers W, a line through the two subscriber counts:
    CPU per publish = ``c_pub(W) + S * c_del(W)``.  ``c_hop`` is what the
    second worker adds per publish, ``c_pub(2) - c_pub(1)``: the routed frame
    sent, read and handed to the other worker's subscribers;
    ``c_del(2) / c_del(1)`` is what a delivery costs more when four busy
    processes (two workers, two load generators) share two cores.
    """
    def line(workers: int) -> tuple[float, float]:
        points = {}
        for r in costs:
            if r.figures["workers"] == workers:
                points.setdefault(r.figures["subscribers"], []).append(r.figures["cpu_us_per_publish"])
        (few, a), (many, b) = sorted((s, sum(v) / len(v)) for s, v in points.items())
        slope = (b - a) / (many - few)
        return a - few * slope, slope

    c_pub, c_del = line(1)
    c_pub2, c_del2 = line(2)
    return {"c_pub_us": c_pub, "c_del_us": c_del, "c_hop_us": c_pub2 - c_pub, "c_del2_us": c_del2}


def projection(m: dict, subscribers: int, cores=(1, 2, 4, 8, 16)) -> list[tuple[int, float]]:
    """Deliveries/s on N cores: a worker on each, subscribers spread evenly, every publish reaching every worker."""
    rates = []
    for n in cores:
        c_del = m["c_del_us"] if n == 1 else m["c_del2_us"]
        per_publish = m["c_pub_us"] + (n - 1) * m["c_hop_us"] + subscribers * c_del
        rates.append((n, n * subscribers / (per_publish * 1e-6)))
    return rates


# -- connections on a host of workers (bench/conns.py's rows) ---------------------------


def host_target(workers: int):
    """A ``conns`` target: one ``twistd meshd`` with ``[node] workers``, measured over its process tree."""
    import conns

    class Host(conns.Target):
        def start(self, port: int, workdir: Path) -> list[Server]:
            config = conns.NODE_CONFIG.format(port=port, drain=self.drain).replace(
                "[node]\n", f"[node]\nworkers = {workers}\n", 1)
            return [start(workers, workdir, port, config)]

    return Host(f"meshd, {workers} workers", "meshd")


def host_connections(work: Path, quick: bool = False) -> list[Result]:
    """What one process cannot hold under this machine's 20,000-file limit, a host of workers can:
    50,000 idle subscribed connections (3 workers), a storm of 20,000 (2 workers); and handshakes/s
    with 2 workers against the relay (the client process shares the two cores)."""
    import conns

    seconds = 2.0 if quick else 5.0
    relay = conns.Target("relay", "relay")
    rows = [conns.handshakes(relay, work, seconds), conns.handshakes(host_target(2), work, seconds)]
    rows.append(conns.idle_memory(host_target(3), work, 3_000 if quick else 50_000))
    rows.append(conns.storm(host_target(2), work, 1_000 if quick else 20_000))
    return rows


def table(costs: list[Result], fanouts: list[Result], m: dict) -> str:
    rows = ["| fixed rate | host | deliveries/s | lost | host CPU (cores) | CPU µs per delivery | CPU µs per publish | "
            "loadgen CPU | steal |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in costs:
        f = r.figures
        rows.append(f"| {r.name} | {r.server} | {f['rate']:,.0f} | {f['lost']} | {sum(f['server_cpu'].values()):.2f} | "
                    f"{f['cpu_us_per_delivery']:.2f} | {f['cpu_us_per_publish']:.1f} | "
                    f"{' + '.join(f'{v:.0%}' for v in f['loadgen_cpu_parts'])} | {f.get('steal', 0):.0%} |")
    rows += ["", "| fan-out | host | deliveries/s | vs 1 worker | host CPU (cores) | loadgen CPU | steal |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in fanouts:
        f = r.figures
        base = next((b.figures["rate"] for b in fanouts
                     if b.figures["workers"] == 1 and b.figures["pinned"] == f["pinned"]), None)
        ratio = f"{f['rate'] / base:.2f}x" if base else ""
        rows.append(f"| {r.name} | {r.server} | {f['rate']:,.0f} | {ratio} | {sum(f['server_cpu'].values()):.2f} | "
                    f"{f['loadgen_cpu']:.0%} | {f.get('steal', 0):.0%} |")
    rows += ["", f"Model inputs: c_pub = {m['c_pub_us']:.1f} µs, c_del = {m['c_del_us']:.2f} µs with 1 worker, "
                 f"{m['c_del2_us']:.2f} µs with 2 ({m['c_del2_us'] / m['c_del_us']:.2f}x); "
                 f"c_hop = {m['c_hop_us']:.1f} µs per publish and other worker", ""]
    for s in (100, 1000):
        rows.append(f"Projected deliveries/s at S={s}: " + ", ".join(
            f"{n} cores {rate / 1000:,.0f}k" for n, rate in projection(m, s)))
    return "\n".join(rows) + "\n"


def group(work: Path, quick: bool = False) -> tuple[list[Result], list[Result], dict]:
    duration = 2.0 if quick else 5.0
    repeats = 1 if quick else 2
    costs: list[Result] = []
    # 2,000 publishes/s to 10 subscribers, 200/s to 200: 20k and 40k deliveries/s, far from saturation.
    for subscribers, rate in ((10, 2000.0), (200, 200.0)):
        for _ in range(repeats):
            for workers in (1, 2):
                costs.append(cost(workers, subscribers, rate, duration, work))
    # Pinned: one core for the host, whatever its workers (the hop's cost at saturation), one for the clients.
    # Then both cores for everything: what a second worker buys when the clients share the machine.
    fanouts = [fanout(workers, 1000, duration, work, pinned) for pinned in (True, False) for workers in (1, 2)]
    return costs, fanouts, model(costs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    p.add_argument("--only", nargs="*", choices=["cost", "connections"], default=["cost", "connections"],
                   help="cost: parts 1-3; connections: 50,000 connections, a storm of 20,000, handshakes")
    p.add_argument("--out", type=Path, default=HERE / "results" / "workers.md")
    args = p.parse_args()
    rows: list[Result] = []
    text = f"Machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
    model_inputs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "cost" in args.only:
            costs, fanouts, model_inputs = group(Path(tmp), args.quick)
            rows += costs + fanouts
            text += table(costs, fanouts, model_inputs)
        if "connections" in args.only:
            import conns

            host = host_connections(Path(tmp), args.quick)
            rows += host
            text += "\n" + conns.table(host)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"rows": [r.__dict__ for r in rows], "model": model_inputs}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
