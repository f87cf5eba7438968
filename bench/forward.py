"""CPU time per publish of a node that forwards every publish to another node.

Node A runs in this process; node B is a ``twistd meshd`` process linked to
it over real TLS on loopback, with a subscriber to the channel, so that A
routes every publish to B.  Publish frames are fed to
A's WebSocket protocol on a ``StringTransport`` in reads of 10, as reads
carry them under load, each in a reactor turn of its own, which ends with
the link's TLS write and ``send()``, for real.  The figures are this process's CPU time
over those reads only, per publish (the mean, and the tenth percentile of
runs of 10 reads): the forwarding node's cost per publish, free of the
scheduling noise of the multi-process latency rows.

    python bench/forward.py [--reads 3000]

Run it from two checkouts, alternately, to compare them.  The machine's
noise reaches even CPU time; for a figure that does not move, count
instructions (the difference of two lengths cancels the start-up):

    valgrind --tool=cachegrind --cache-sim=no python bench/forward.py --reads 200
    valgrind --tool=cachegrind --cache-sim=no python bench/forward.py --reads 1200
    # (I refs of the second - I refs of the first) / 10,000 publishes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from uuid import UUID

from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import Server, free_port  # noqa: E402
from wsraw import RawWebSocket, mask  # noqa: E402

from meshd.app import Application  # noqa: E402
from meshd.codec import Opcode, decode, encode  # noqa: E402
from meshd.config import MeshSettings, load  # noqa: E402
from meshd.mesh.certs import create_ca, issue_node  # noqa: E402

PER_READ = 10
CHANNEL = "bench.0"


def sleep(seconds: float):
    return task.deferLater(reactor, seconds, lambda: None)


async def measure(reads: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="meshd-forward-"))
    certs = work / "certs"
    create_ca(certs, "bench")
    ids = {n: UUID(int=i + 1) for i, n in enumerate("ab")}  # certificates name their nodes
    for n in "ab":
        issue_node(certs, n, ["127.0.0.1"], node_id=ids[n])
    ws_b, mesh_a, mesh_b = free_port(), free_port(), free_port()
    b = Server("meshd", ws_b, work, f"""
[node]
id = "{ids['b']}"
[websocket]
listen = ["tcp:{ws_b}:interface=127.0.0.1"]
[[rules]]
match = "*"
anonymous = ["subscribe", "publish"]
[limits]
request_rate = 0
[mesh]
cluster = "bench"
listen = "tcp:{mesh_b}:interface=127.0.0.1"
ca = "{certs / 'ca.pem'}"
cert = "{certs / 'b.pem'}"
key = "{certs / 'b.key'}"
""")
    try:
        rules = work / "a.toml"
        rules.write_text('[[rules]]\nmatch = "*"\nanonymous = ["subscribe", "publish"]\n[limits]\nrequest_rate = 0\n')
        app = Application(dataclasses.replace(load(rules), auto_ping_interval=0, hello_timeout=0, mesh=MeshSettings(
            cluster="bench", listen=f"tcp:{mesh_a}:interface=127.0.0.1", advertise=f"127.0.0.1:{mesh_a}",
            ca=certs / "ca.pem", cert=certs / "a.pem", key=certs / "a.key", seeds=(f"127.0.0.1:{mesh_b}",),
        ), node_id=ids["a"]))
        app.startService()
        # The subscriber only counts what it gets (the minimal client of the
        # load generator), so that little of this process's time is its.
        subscriber = await TCP4ClientEndpoint(reactor, "127.0.0.1", ws_b).connect(
            Factory.forProtocol(lambda: RawWebSocket(subprotocol="meshd.v1")))
        await subscriber.opened
        for request in (encode(Opcode.Hello, request_id=1, version=1),
                        encode(Opcode.Subscribe, request_id=2, channel=CHANNEL)):
            answered = Deferred()
            subscriber.on_message = answered.callback
            subscriber.send(request)
            if decode(await answered).opcode == Opcode.Error:
                raise RuntimeError("node B refused the subscriber")
        delivered = [0]

        def count(_data: bytes) -> None:
            delivered[0] += 1

        subscriber.on_message = count
        for _ in range(200):
            if any(CHANNEL in p.interests and p.link is not None for p in app.mesh.peers.values()):
                break
            await sleep(0.05)
        else:
            raise RuntimeError("node B's interest in the channel never reached node A")

        publisher = app.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9))
        publisher.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)))
        publisher.dataReceived(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Protocol: meshd.v1\r\n\r\n"
        )
        publisher.dataReceived(mask(encode(Opcode.Hello, version=1)))
        read = mask(encode(Opcode.Publish, channel=CHANNEL, payload=b"\xab" * 128)) * PER_READ

        spans = []  # CPU time of each run of 10 reads
        for _ in range(reads // 10):
            start = time.process_time()
            for _ in range(10):
                publisher.dataReceived(read)
                await sleep(0)  # the rest of the reactor turn: the link flushes
            spans.append(time.process_time() - start)
            await sleep(0.002)  # let node B and the subscriber keep up
        published = len(spans) * 10 * PER_READ
        for _ in range(100):
            if delivered[0] >= published:
                break
            await sleep(0.05)
        subscriber.transport.loseConnection()
        await app.stopService()
        spans.sort()
        per_publish = 1e6 / (10 * PER_READ)
        return {
            "us_per_publish": sum(spans) * per_publish / len(spans),
            # On a shared machine other tenants slow some runs down (caches,
            # stolen cycles counted as ours); the fastest tenth is the cost
            # of the code itself, and the figure to compare checkouts by.
            "us_per_publish_p10": spans[len(spans) // 10] * per_publish,
            "published": published,
            "delivered": delivered[0],
        }
    finally:
        b.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reads", type=int, default=3000, help=f"reads of {PER_READ} publishes to time")
    args = p.parse_args()
    result = {}

    def run() -> None:
        def done(value):
            result.update(value)
            reactor.stop()

        def failed(failure):
            result["error"] = failure.getTraceback()
            reactor.stop()

        ensureDeferred(measure(args.reads)).addCallbacks(done, failed)

    reactor.callWhenRunning(run)
    reactor.run()
    if "error" in result:
        raise SystemExit(result["error"])
    print(json.dumps(result))
    if result["delivered"] != result["published"]:
        raise SystemExit(f"lost {result['published'] - result['delivered']} of {result['published']} publishes")


if __name__ == "__main__":
    main()
