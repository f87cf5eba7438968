"""The load generator: its own process, with a minimal WebSocket client (wsraw).

It opens subscriber connections, then publishes 128-byte payloads carrying a
sequence number and a send timestamp, keeping a bounded window of messages
in flight (a message is done when every subscriber that should get it has),
or at a fixed rate.  It prints one JSON object of results on its last line.

    python bench/loadgen.py --target meshd|relay --port P [options]
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import sys
import time
from array import array

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredQueue, ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.stdio import StandardIO
from twisted.protocols.basic import LineReceiver

sys.path.insert(0, __import__("os").path.dirname(__file__))
from wsraw import RawWebSocket  # noqa: E402

from meshd.codec import Opcode, decode, encode  # noqa: E402

MAGIC = b"MSHB"
_HEAD = struct.Struct("<4sQQ")  # magic, seq, send time (monotonic ns)


def _stdin_lines() -> DeferredQueue:
    """Lines from standard input, as they come."""
    queue: DeferredQueue = DeferredQueue()

    class Lines(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            queue.put(line.decode().strip())

    StandardIO(Lines())
    return queue


def payload_for(seq: int, size: int) -> bytes:
    head = _HEAD.pack(MAGIC, seq, time.monotonic_ns())
    return head + b"." * max(0, size - len(head))


class Run:
    def __init__(self, args) -> None:
        self.args = args
        self.meshd = args.target == "meshd"
        self.subscribers: list[RawWebSocket] = []
        self.per_channel = args.subscribers * args.subscriptions // args.channels
        #: Deliveries still due per sequence number (index 0 unused); a list
        #: indexes faster than a dict looks up, and nothing is ever removed.
        self.remaining = array("l", [0])
        self.undelivered = 0  # messages some subscriber has not had yet
        #: Each message delivered everywhere lets the next one go (no --rate, one process).
        self.windowed = args.rate == 0 and args.role == "all"
        self.subscriber_role = args.role == "subscribe"
        self.batch = args.batch
        self.seq = 0
        self.measuring = False
        self.stopping = False
        self.latencies = array("q")  # ns, of the deliveries while measuring
        self.sent = 0
        self.duplicates = 0
        self._started = None
        self._paced_count = 0
        self.templates: dict[int, tuple[bytes, int]] = {}

    # -- connections -----------------------------------------------------------------

    async def connect(self, on_message=None, port: int = 0) -> RawWebSocket:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port or self.args.port, timeout=30)
        proto = await endpoint.connect(Factory.forProtocol(
            lambda: RawWebSocket(subprotocol="meshd.v1", on_message=on_message)))
        await proto.opened
        return proto

    async def meshd_request(self, ws: RawWebSocket, frame: bytes) -> None:
        """Send one request and wait for its answer (the only traffic then)."""
        answered = Deferred()
        previous = ws.on_message
        ws.on_message = lambda data: answered.called or answered.callback(data)
        ws.send(frame)
        data = await answered
        ws.on_message = previous
        message = decode(data)
        if message.opcode == Opcode.Error:
            raise RuntimeError(f"node refused: {message.message}")

    async def subscriber(self, index: int) -> RawWebSocket:
        ws = await self.connect()
        if self.meshd:
            await self.meshd_request(ws, encode(Opcode.Hello, request_id=1, version=1, **self.hello_extra()))
            for k in range(self.args.subscriptions):
                channel = self.channel(index * self.args.subscriptions + k)
                await self.meshd_request(ws, encode(Opcode.Subscribe, request_id=2 + k, channel=channel))
        ws.on_message = self.received
        return ws

    def hello_extra(self) -> dict:
        return {"batch": True} if self.args.batch else {}

    def channel(self, index: int) -> str:
        return f"bench.{index % self.args.channels}"

    def expect_through(self, seq: int) -> None:
        """(subscribe role) Messages up to ``seq`` were published by the publisher process."""
        missing = seq + 1 - len(self.remaining)
        if 0 < missing <= 10_000_000:
            self.remaining.extend([self.per_channel] * missing)
            self.undelivered += missing

    async def setup(self) -> None:
        if self.args.role != "publish":
            batch = 200
            for start in range(0, self.args.subscribers, batch):
                stop = min(start + batch, self.args.subscribers)
                self.subscribers += await gatherResults(
                    [ensureDeferred(self.subscriber(i)) for i in range(start, stop)]
                )
        if self.args.role != "subscribe":
            self.publisher = await self.connect(on_message=lambda data: None, port=self.args.publish_port)
            if self.meshd:
                await self.meshd_request(self.publisher, encode(Opcode.Hello, request_id=1, version=1))

    # -- traffic ---------------------------------------------------------------------

    def publish(self) -> None:
        self.seq += 1
        seq = self.seq
        channel_index = seq % self.args.channels
        data = payload_for(seq, self.args.payload)
        if self.meshd:
            # The Publish frame is built once per channel and only its payload
            # bytes change: the generic FlatBuffers builder costs more than the
            # node's whole handling of a message, and would make the load
            # generator the bottleneck.
            template = self.templates.get(channel_index)
            if template is None:
                placeholder = b"\xab" * len(data)
                frame = encode(Opcode.Publish, channel=f"bench.{channel_index}", payload=placeholder)
                template = self.templates[channel_index] = (frame, frame.index(placeholder))
            frame, at = template
            frame = frame[:at] + data + frame[at + len(data):]
        else:
            frame = data
        self.remaining.append(self.per_channel)
        if self.per_channel:
            self.undelivered += 1
        self.sent += 1
        self.publisher.send(frame)

    def received(self, data: bytes) -> None:
        # Runs for every delivery (100k/s and more): locals, no float maths,
        # and the measured count is the length of the latency array.
        now = RawWebSocket.read_at
        remaining = self.remaining
        at = data.find(MAGIC)
        while at >= 0:
            _magic, seq, sent_at = _HEAD.unpack_from(data, at)
            if seq < len(remaining):
                left = remaining[seq]
            elif self.subscriber_role:
                self.expect_through(seq)
                left = remaining[seq] if seq < len(remaining) else 0
            else:
                left = 0
            if left <= 0:
                self.duplicates += 1
            else:
                remaining[seq] = left - 1
                if self.measuring:
                    self.latencies.append(now - sent_at)
                if left == 1:
                    self.undelivered -= 1
                    if self.windowed and not self.stopping:
                        self.publish()
            # A Batch frame holds several events; an Event frame one.
            at = data.find(MAGIC, at + _HEAD.size) if self.batch else -1

    async def run(self) -> dict:
        await self.setup()
        print("READY", flush=True)
        if self.args.role == "subscribe":
            return await self.subscribe_only()
        if self.args.idle:
            await task.deferLater(reactor, self.args.duration, lambda: None)
            return {"connections": len(self.subscribers)}
        if self.args.rate:
            pacer = task.LoopingCall(self._paced)
            pacer.start(0.001)
        else:
            for _ in range(self.args.window):
                self.publish()
        await task.deferLater(reactor, self.args.warmup, lambda: None)
        cpu0, t0 = self.cpu(), time.monotonic()
        self.measuring = True
        print("MEASURING", flush=True)
        await task.deferLater(reactor, self.args.duration, lambda: None)
        self.measuring = False
        elapsed, cpu = time.monotonic() - t0, self.cpu() - cpu0
        print("MEASURED", flush=True)
        self.stopping = True
        if self.args.rate:
            pacer.stop()
        if self.args.role == "publish":
            # The subscribers are another process: just let the last writes leave.
            await task.deferLater(reactor, 0.2, lambda: None)
        await self.drain()
        return self.results(elapsed, cpu, lost=sum(self.remaining))

    async def drain(self) -> None:
        """Let in-flight messages land (at most 5 s); what is still due after that is lost."""
        for _ in range(100):
            if not self.undelivered:
                break
            await task.deferLater(reactor, 0.05, lambda: None)

    def results(self, elapsed: float, cpu: float, lost: int) -> dict:
        lat = sorted(self.latencies)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1000.0 if lat else 0.0
        return {
            "deliveries": len(lat),
            "seconds": elapsed,
            "rate": len(lat) / elapsed,
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "lost": lost,
            "duplicates": self.duplicates,
            "published": self.sent,
            "loadgen_cpu": cpu / elapsed,
        }

    async def subscribe_only(self) -> dict:
        """(subscribe role) Measure between MEASURE and STOP on stdin; PUBLISHED n ends the run."""
        commands = _stdin_lines()
        assert await commands.get() == "MEASURE"
        cpu0, t0 = self.cpu(), time.monotonic()
        self.measuring = True
        assert await commands.get() == "STOP"
        self.measuring = False
        elapsed, cpu = time.monotonic() - t0, self.cpu() - cpu0
        command, published = (await commands.get()).split()
        assert command == "PUBLISHED"
        self.expect_through(int(published))
        await self.drain()
        return self.results(elapsed, cpu, lost=sum(self.remaining[: int(published) + 1]))

    def _paced(self) -> None:
        """Publish what is due at --rate messages per second since the start."""
        now = time.monotonic()
        if self._started is None:
            self._started = now
        due = int((now - self._started) * self.args.rate) - self._paced_count
        for _ in range(due):
            self._paced_count += 1
            self.publish()

    @staticmethod
    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", choices=["meshd", "relay"], required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--subscribers", type=int, default=100)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--subscriptions", type=int, default=1,
                   help="channels each subscriber subscribes to (meshd; spread evenly over --channels)")
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--rate", type=float, default=0, help="messages/s instead of a window")
    p.add_argument("--payload", type=int, default=128)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--batch", action="store_true", help="ask meshd for batched frames")
    p.add_argument("--publish-port", type=int, default=0, help="publish through another node")
    p.add_argument("--idle", action="store_true", help="connect, hold for --duration, publish nothing")
    p.add_argument("--role", choices=["all", "publish", "subscribe"], default="all",
                   help="publish and subscribe in one process (the default), or only one of them: with "
                        "--rate, a publisher process is not slowed down by receiving (see run.py)")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = {}

    async def go():
        result.update(await Run(args).run())

    def done(_):
        print(json.dumps(result), flush=True)
        reactor.stop()

    def failed(f):
        print(json.dumps({"error": str(f.value)}), flush=True)
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(go()).addCallbacks(done, failed))
    reactor.run()


if __name__ == "__main__":
    main()
