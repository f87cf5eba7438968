"""Soak: steady publishes to many subscribers, a few of which stall or trickle.

    python bench/soak.py [--duration 180] [--subscribers 1000] [--rate 100] [--size 1024]

Runs the same load twice against a fresh ``twistd meshd`` node each time:
once with every subscriber healthy, once with 1% of them stalled (they stop
reading after they subscribed) and 1% trickling (they read for a moment
once a second and send a small request every few seconds, which keeps a
connection alive that a keep-alive timeout alone would never drop).  It
reports, for each run, the healthy subscribers' deliveries per second and
losses, the node's RSS at the start, at its peak and at the end, how
many of the stalled and trickling clients the node closed with 4002,
and how long until none of them was connected any more (both read from its
metrics).  Every run stops by itself after ``--duration``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import Server, free_port, proc_rss_kib  # noqa: E402
from wsraw import RawWebSocket  # noqa: E402

from meshd.codec import Opcode, decode, encode  # noqa: E402

CHANNEL = "soak"


class Load:
    """The clients of one run, in this process."""

    def __init__(self, port: int, args, bad: bool) -> None:
        self.port, self.args = port, args
        count = args.subscribers
        self.stalled_count = max(1, count // 100) if bad else 0
        self.trickling_count = max(1, count // 100) if bad else 0
        self.healthy_count = count - self.stalled_count - self.trickling_count
        self.delivered = 0
        self.published = 0

    async def connect(self, on_message=None) -> RawWebSocket:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=30)
        ws = await endpoint.connect(Factory.forProtocol(lambda: RawWebSocket(subprotocol="meshd.v1")))
        await ws.opened
        for request in (encode(Opcode.Hello, request_id=1, version=1),
                        encode(Opcode.Subscribe, request_id=2, channel=CHANNEL)):
            answered: Deferred = Deferred()
            ws.on_message = lambda data, d=answered: d.called or d.callback(data)
            ws.send(request)
            if decode(await answered).opcode == Opcode.Error:
                raise RuntimeError("the node refused a subscriber")
        ws.on_message = on_message or (lambda data: None)
        return ws

    def count(self, data: bytes) -> None:
        self.delivered += 1

    async def setup(self) -> None:
        healthy = []
        for start in range(0, self.healthy_count, 200):
            stop = min(start + 200, self.healthy_count)
            healthy += await gatherResults([ensureDeferred(self.connect(self.count)) for _ in range(start, stop)])
        self.stalled = [await self.connect() for _ in range(self.stalled_count)]
        self.trickling = [await self.connect() for _ in range(self.trickling_count)]
        for ws in self.stalled + self.trickling:  # a small window: each moment of reading takes in a few KiB
            ws.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        for ws in self.stalled + self.trickling:
            ws.transport.pauseProducing()
        self.publisher = await self.connect()

    def publish(self) -> None:
        self.published += 1
        self.publisher.send(encode(Opcode.Publish, channel=CHANNEL, payload=b"s" * self.args.size))

    def trickle(self, beat: int) -> None:
        """Read for a moment; every few beats send a small request."""
        for ws in self.trickling:
            ws.transport.resumeProducing()
            reactor.callLater(0.002, ws.transport.pauseProducing)
            if beat % 5 == 0:
                ws.send(encode(Opcode.Ping, request_id=9))


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.split(" ", 1)[0].split("{", 1)[0] == name:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def one_run(args, work: Path, bad: bool) -> dict:
    port, metrics_port = free_port(), free_port()
    config = f"""
[websocket]
listen = ["tcp:{port}:interface=127.0.0.1"]
[[rules]]
match = "*"
anonymous = ["subscribe", "publish"]
[metrics]
listen = "tcp:{metrics_port}:interface=127.0.0.1"
[limits]
max_send_buffer = {args.max_send_buffer}
"""
    server = Server("meshd", port, work, config)
    try:
        load = Load(port, args, bad)
        await load.setup()
        rss_start = proc_rss_kib(server.proc.pid)
        rss_peak = rss_start
        interval = 1.0 / args.rate
        pacer = task.LoopingCall(load.publish)
        pacer.start(interval)
        beat = 0
        closed_at = None
        started = time.monotonic()
        bad_total = load.stalled_count + load.trickling_count
        while time.monotonic() - started < args.duration:
            await task.deferLater(reactor, 1.0, lambda: None)
            beat += 1
            load.trickle(beat)
            rss_peak = max(rss_peak, proc_rss_kib(server.proc.pid))
            if bad_total and closed_at is None:
                sessions = await deferToThread(metric, metrics_port, "meshd_sessions")
                if sessions <= load.healthy_count + 1:  # the bad ones are gone; the publisher stays
                    closed_at = time.monotonic() - started
        pacer.stop()
        elapsed = time.monotonic() - started
        await task.deferLater(reactor, 2.0, lambda: None)  # the last publishes arrive
        expected = load.published * load.healthy_count
        closes = await deferToThread(metric, metrics_port, "meshd_slow_consumer_closes_total")
        return {
            "bad_clients": bad_total,
            "healthy": load.healthy_count,
            "published": load.published,
            "healthy_deliveries_per_s": load.delivered / elapsed,
            "healthy_lost": expected - load.delivered,
            "slow_closes": closes,
            "all_bad_closed_after_s": closed_at,
            "rss_start_mib": rss_start / 1024,
            "rss_peak_mib": rss_peak / 1024,
            "rss_end_mib": proc_rss_kib(server.proc.pid) / 1024,
        }
    finally:
        server.stop()


def table(rows: list[dict]) -> str:
    out = ["| run | healthy subscribers | deliveries/s (healthy) | lost | closed 4002 | all bad gone after | "
           "RSS start MiB | RSS peak MiB | RSS end MiB |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        name = f"{r['bad_clients']} stalled or trickling" if r["bad_clients"] else "all healthy"
        after = f"{r['all_bad_closed_after_s']:.0f} s" if r["all_bad_closed_after_s"] is not None else "—"
        out.append(f"| {name} | {r['healthy']} | {r['healthy_deliveries_per_s']:,.0f} | {r['healthy_lost']} | "
                   f"{r['slow_closes']:.0f} | {after} | {r['rss_start_mib']:.0f} | {r['rss_peak_mib']:.0f} | "
                   f"{r['rss_end_mib']:.0f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=180.0, help="seconds of steady publishing per run")
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--rate", type=float, default=100.0, help="publishes per second")
    p.add_argument("--size", type=int, default=1024, help="payload bytes")
    p.add_argument("--max-send-buffer", type=int, default=1 << 20, help="the node's limits.max_send_buffer")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON results here")
    args = p.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows: list[dict] = []

    async def go() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for bad in (False, True):
                rows.append(await one_run(args, Path(tmp), bad))

    def done(result):
        print(table(rows))
        print(json.dumps(rows))
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
        reactor.stop()
        return result

    def failed(failure):
        print(failure.getTraceback(), file=sys.stderr)
        os._exit(1)

    reactor.callWhenRunning(lambda: ensureDeferred(go()).addCallbacks(done, failed))
    reactor.run()


if __name__ == "__main__":
    main()
