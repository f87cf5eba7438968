"""Connections at scale: opening handshakes per second, idle memory per subscribed connection, a reconnect storm.

    python bench/run.py --only conns [--quick] [--baseline REV]

The rows (each with the raw Autobahn relay, ``bench/relay.py``, in the same
run where it makes sense):

- **handshakes/s**: clients open a TCP connection, do the WebSocket opening
  handshake (``meshd.v1``) and close, :data:`IN_FLIGHT` at a time, for a
  bounded time or count; for meshd also with Hello and Subscribe done
  before the close ("connect+hello+subscribe/s").
- **idle memory**: N connections held open (on meshd welcomed and
  subscribed, each to its own channel); the servers' RSS before and after,
  per connection.  The server side is a list of processes: their trees'
  RSS is summed (:func:`tree_rss_kib`), so that a node of several worker
  processes is measured the same way.
- **reconnect storm**: N subscribed clients; the node is stopped with
  SIGTERM (it drains, closing sessions with 4007 over ``node.drain_seconds``)
  and a new node process is started on the same port; the clients
  reconnect with the rule of meshd's clients, taken from
  :mod:`meshd.clientcore` (up to 0.2 s after a 4007, else exponential
  backoff from 0.5 s with jitter) and subscribe again.  Reported: the seconds from the new node
  listening until all N are subscribed again, refused handshakes (any HTTP
  answer but 101) and failed connection attempts.

The clients are this module run as a process (``python bench/conns.py
client SPEC``): non-blocking sockets on one ``selectors`` loop, no Twisted,
a fixed request, a few system calls per connection; several processes, each
under the file-descriptor limit, bound to several loopback source addresses
(127.0.0.2, ...) so that ephemeral ports never run out.  Every loop is
bounded and every process started here is stopped, also on failure.
"""

from __future__ import annotations

import errno
import heapq
import json
import math
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402
from wsraw import mask, opening_request, split_frames  # noqa: E402

#: Connections each client process keeps in their opening handshake at once (handshake rows).
IN_FLIGHT = 128
#: Connections per source address: well under the ephemeral port range (32768-60999).
PER_SOURCE = 10_000
#: Connections per client process: under the hard limit of open files (20,000 here).
PER_PROCESS = 5_000
#: Connections one client process opens at once while setting up held connections.
SETUP_IN_FLIGHT = 256
_IP_BIND_ADDRESS_NO_PORT = 24  # Linux: pick the source port at connect(), per destination

_CONNECTING, _HANDSHAKING, _HELLO, _SUBSCRIBING, _SUBSCRIBED, _CLOSING = range(6)


# -- the client process ------------------------------------------------------------------


class _Conn:
    __slots__ = ("sock", "index", "state", "buffer", "failures", "source")

    def __init__(self, index: int, source: str) -> None:
        self.sock: Optional[socket.socket] = None
        self.index = index
        self.state = _CONNECTING
        self.buffer = b""
        #: Attempts in a row that did not end subscribed (the backoff's attempt number).
        self.failures = 0
        self.source = source


class Clients:
    """Client connections of one process, driven by one ``selectors`` loop.

    ``mode`` ``"churn"``: keep ``in_flight`` connections going, each one
    opened, handshaken (and with ``subscribe``, welcomed and subscribed),
    then closed, until ``seconds`` pass or ``count`` are done.  ``"hold"``:
    open ``count`` connections, keep them (answering pings), and bring each
    back with meshd's reconnect rule when the server closes it.
    """

    def __init__(self, spec: dict) -> None:
        self.port: int = spec["port"]
        self.mode: str = spec["mode"]
        self.count: int = spec["count"]
        self.subscribe: bool = spec["subscribe"]
        self.sources: list[str] = spec["sources"]
        self.in_flight: int = spec.get("in_flight", IN_FLIGHT)
        self.seconds: float = spec.get("seconds", 0)
        self.offset: int = spec.get("offset", 0)
        self.request = opening_request(f"127.0.0.1:{self.port}", "dGhlIHNhbXBsZSBub25jZQ==", "/",
                                       "meshd.v1" if spec["meshd"] else None)
        from meshd.clientcore import NOW, backoff_policy, close_action, drain_delay
        from meshd.codec import Opcode, decode, encode

        # The reconnect rule of meshd's clients, with their defaults.
        self._backoff, self._drain_delay = backoff_policy(), drain_delay
        self._now_after = lambda code: close_action(code, token_renewable=False) == NOW
        self._decode, self._opcode = decode, Opcode
        self.hello = mask(encode(Opcode.Hello, request_id=1, version=1))
        self._encode = encode
        self.selector = selectors.DefaultSelector()
        self.timers: list = []
        self.subscribed = 0
        self.done = 0  # churn: connections through
        self.started = 0
        self.pending = 0  # connections between connect() and subscribed (or handshaken, churn)
        self._stdin = b""
        self.refused: dict[str, int] = {}  # HTTP status (not 101) -> count
        self.connect_errors = 0
        self.dropped = 0  # closed by the server before being subscribed, without an HTTP answer
        self.closes: dict[str, int] = {}  # close codes received on subscribed connections
        self.last_subscribed = 0.0
        self.stopping = False

    # -- opening and closing

    def open(self, conn: _Conn) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((conn.source, 0))
        conn.sock, conn.state, conn.buffer = sock, _CONNECTING, b""
        self.started += 1
        self.pending += 1
        code = sock.connect_ex(("127.0.0.1", self.port))
        if code == 0:
            self._connected(conn)
        elif code == errno.EINPROGRESS:
            self.selector.register(sock, selectors.EVENT_WRITE, conn)
        else:
            self._failed(conn, connect_error=True)

    def _connected(self, conn: _Conn) -> None:
        conn.sock.send(self.request)
        conn.state = _HANDSHAKING
        if conn.sock.fileno() in self.selector.get_map():
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
        else:
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)

    def close(self, conn: _Conn) -> None:
        sock, conn.sock = conn.sock, None
        if sock is not None:
            try:
                self.selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        if conn.state == _SUBSCRIBED:
            self.subscribed -= 1
        elif conn.state != _CLOSING:
            self.pending -= 1
        conn.state = _CLOSING

    def _failed(self, conn: _Conn, connect_error: bool = False, status: Optional[str] = None) -> None:
        """The attempt did not end subscribed: back off and try again (hold), or next (churn)."""
        if connect_error:
            self.connect_errors += 1
        elif status is not None:
            self.refused[status] = self.refused.get(status, 0) + 1
        else:
            self.dropped += 1
        self.close(conn)
        conn.failures += 1
        if self.mode == "hold":
            self.later(self._backoff(conn.failures), conn)
        else:
            self.next(conn)

    def later(self, delay: float, conn: _Conn) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, conn.index, conn))

    def next(self, conn: _Conn) -> None:
        """churn: this connection is done; start another if the run is not over."""
        if not self.stopping and (not self.count or self.started < self.count):
            self.open(conn)

    # -- reading

    def readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except ConnectionError:
            data = b""
        if not data:
            if conn.state == _SUBSCRIBED:
                self.close(conn)
                self._reconnect(conn, None)
            else:
                self._failed(conn)
            return
        buffer = conn.buffer + data if conn.buffer else data
        if conn.state == _HANDSHAKING:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                conn.buffer = buffer
                return
            status = buffer[9:12].decode()
            if status != "101":
                self._failed(conn, status=status)
                return
            buffer = buffer[end + 4:]
            if not self.subscribe:
                self._through(conn)
                return
            conn.sock.send(self.hello)
            conn.state = _HELLO
        frames, at = split_frames(buffer)
        for opcode, start, end in frames:
            if opcode == 0x2:
                self._message(conn, buffer[start:end])
            elif opcode == 0x9:
                conn.sock.send(mask(buffer[start:end], opcode=0xA))
            elif opcode == 0x8:
                self._closed_by_server(conn, buffer[start:end])
                return
            if conn.sock is None:
                return
        conn.buffer = buffer[at:]

    def _message(self, conn: _Conn, payload: bytes) -> None:
        if conn.state not in (_HELLO, _SUBSCRIBING):
            return  # an event: idle clients get none
        message = self._decode(payload)
        opcode = self._opcode
        if conn.state == _HELLO and message.opcode == opcode.Welcome:
            channel = f"conns.{self.offset + conn.index}"
            conn.sock.send(mask(self._encode(opcode.Subscribe, request_id=2, channel=channel)))
            conn.state = _SUBSCRIBING
        elif conn.state == _SUBSCRIBING and message.opcode == opcode.Ack:
            self._through(conn)
        else:
            self._failed(conn, status=f"Error {getattr(message, 'message', '')}")

    def _through(self, conn: _Conn) -> None:
        """Handshaken (and subscribed): churn closes it and opens the next; hold keeps it."""
        conn.failures = 0
        self.pending -= 1
        if self.mode == "churn":
            self.done += 1
            conn.state = _CLOSING
            self.close(conn)
            self.next(conn)
            return
        conn.state = _SUBSCRIBED
        self.subscribed += 1
        self.last_subscribed = time.monotonic()

    def _closed_by_server(self, conn: _Conn, body: bytes) -> None:
        code = int.from_bytes(body[:2], "big") if len(body) >= 2 else None
        try:
            conn.sock.send(mask(body[:2], opcode=0x8))  # the close handshake's answer
        except OSError:
            pass
        was_subscribed = conn.state == _SUBSCRIBED
        self.close(conn)
        if was_subscribed:
            self.closes[str(code)] = self.closes.get(str(code), 0) + 1
            self._reconnect(conn, code)
        else:
            conn.state = _HANDSHAKING
            self._failed(conn)

    def _reconnect(self, conn: _Conn, code: Optional[int]) -> None:
        """A subscribed connection ended: at once (within 0.2 s) after a drain, else with backoff."""
        if self.mode != "hold":
            return
        if self._now_after(code):
            self.later(self._drain_delay(), conn)
        else:
            conn.failures += 1
            self.later(self._backoff(conn.failures), conn)

    def writable(self, conn: _Conn) -> None:
        if conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._failed(conn, connect_error=True)
        else:
            self._connected(conn)

    # -- the loop

    def status(self) -> dict:
        return {"subscribed": self.subscribed, "done": self.done, "refused": self.refused,
                "connect_errors": self.connect_errors, "dropped": self.dropped, "closes": self.closes,
                "last_subscribed": self.last_subscribed, "cpu": _cpu()}

    def run(self) -> None:
        conns = [_Conn(i, self.sources[(self.offset + i) // PER_SOURCE % len(self.sources)])
                 for i in range(self.count if self.mode == "hold" else self.in_flight)]
        self.selector.register(0, selectors.EVENT_READ, None)
        print("READY", flush=True)
        waiting = list(reversed(conns))
        going = False
        while not self.stopping:
            while going and waiting and self.pending < SETUP_IN_FLIGHT:
                self.open(waiting.pop())
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                self.open(heapq.heappop(self.timers)[2])
            timeout = max(0.0, self.timers[0][0] - now) if self.timers else 0.5
            for key, _ in self.selector.select(min(timeout, 0.5)):
                conn = key.data
                if conn is None:
                    for line in self.lines():
                        going = self.command(line, going)
                elif conn.sock is None:
                    continue
                elif conn.state == _CONNECTING:
                    self.writable(conn)
                else:
                    self.readable(conn)
            if self.mode == "churn" and going and self.deadline_passed():
                self.stopping = True
        self.finish()

    def lines(self) -> list[str]:
        """The whole lines that arrived on standard input (an empty one at its end)."""
        data = os.read(0, 4096)
        if not data:
            return [""]
        *lines, self._stdin = (self._stdin + data).split(b"\n")
        return [line.decode().strip() for line in lines]

    def command(self, line: str, going: bool) -> bool:
        if line == "GO":
            self.t0, self.cpu0 = time.monotonic(), _cpu()
            return True
        if line == "STATUS":
            print(json.dumps(self.status()), flush=True)
        elif line in ("STOP", ""):
            self.stopping = True
        return going

    def deadline_passed(self) -> bool:
        over = (self.seconds and time.monotonic() - self.t0 >= self.seconds) or (self.count and self.done >= self.count)
        if over:
            self.elapsed, self.cpu = time.monotonic() - self.t0, _cpu() - self.cpu0
        return bool(over)

    def finish(self) -> None:
        out = self.status()
        if self.mode == "churn":
            out.update(elapsed=self.elapsed, client_cpu=self.cpu / self.elapsed)
        print(json.dumps(out), flush=True)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def client_main(spec: dict) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    Clients(spec).run()


# -- the scenarios (run by bench/run.py) -------------------------------------------------------


def tree_rss_kib(pids: "list[int]") -> int:
    """The RSS of ``pids`` and all their descendants, summed (a node of several worker processes)."""
    total = 0
    for pid in {p for root in pids for p in (root, *run.descendants(root))}:
        try:
            total += run.proc_rss_kib(pid)
        except OSError:
            pass  # ended meanwhile
    return total


class ClientGroup:
    """Client processes (:class:`Clients`) sharing out ``count`` connections, each under the fd limit."""

    def __init__(self, port: int, mode: str, count: int, meshd: bool, subscribe: bool, processes: int = 0,
                 **spec) -> None:
        processes = processes or max(1, math.ceil(count / PER_PROCESS))
        sources = [f"127.0.0.{2 + i}" for i in range(max(1, math.ceil(count / PER_SOURCE)) + 1)]
        self.procs: list[subprocess.Popen] = []
        share = math.ceil(count / processes) if count else 0
        try:
            for i in range(processes):
                mine = min(share, count - i * share) if count else 0
                body = dict(spec, port=port, mode=mode, count=mine, meshd=meshd, subscribe=subscribe,
                            sources=sources, offset=i * share)
                proc = subprocess.Popen([sys.executable, __file__, "client", json.dumps(body)], env=run.env(),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                self.procs.append(proc)
            for proc in self.procs:
                if proc.stdout.readline().strip() != "READY":
                    raise RuntimeError("a client process did not start")
        except BaseException:
            self.stop()
            raise

    def tell(self, line: str) -> None:
        for proc in self.procs:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()

    def status(self) -> list[dict]:
        self.tell("STATUS")
        return [json.loads(proc.stdout.readline()) for proc in self.procs]

    def wait_subscribed(self, count: int, timeout: float) -> list[dict]:
        """Poll until ``count`` connections are subscribed (RuntimeError after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.status()
            if sum(s["subscribed"] for s in states) >= count:
                return states
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {sum(s['subscribed'] for s in states)} of {count} subscribed: {states}")
            time.sleep(0.2)

    def results(self) -> list[dict]:
        """churn: the line each process prints as it ends its run by itself (:meth:`stop` reaps them)."""
        out = []
        for proc in self.procs:
            line = proc.stdout.readline()  # the process ends its run by itself (seconds or count)
            if not line.startswith("{"):
                raise RuntimeError("a client process failed")
            out.append(json.loads(line))
        return out

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _sum(states: list[dict], key: str) -> "int | dict":
    if isinstance(states[0][key], dict):
        total: dict = {}
        for s in states:
            for k, v in s[key].items():
                total[k] = total.get(k, 0) + v
        return total
    return sum(s[key] for s in states)


#: A node's configuration for these rows: every operation allowed, no request limit, a listen
#: backlog that holds a storm's SYNs.  {port}, {drain} filled in.
NODE_CONFIG = """
[node]
drain_seconds = {drain}
[websocket]
listen = ["tcp:{port}:interface=127.0.0.1:backlog=4096"]
[[rules]]
match = "*"
anonymous = ["subscribe", "publish", "watch"]
[limits]
request_rate = 0
"""


@dataclass
class Target:
    """What a row runs against: the relay, or a meshd node (of a source tree), as server processes."""

    label: str
    kind: str  # "relay" or "meshd"
    root: Path = field(default_factory=lambda: run.ROOT)
    drain: float = 2.0

    def start(self, port: int, workdir: Path) -> "list[run.Server]":
        """Start the server processes listening on ``port``; a node of several workers would give several."""
        config = NODE_CONFIG.format(port=port, drain=self.drain) if self.kind == "meshd" else None
        return [run.Server(self.kind, port, workdir, config, root=self.root)]


def _stop(servers: "list[run.Server]") -> None:
    for server in servers:
        server.stop()


def handshakes(target: Target, workdir: Path, seconds: float, subscribe: bool = False, count: int = 0,
               processes: int = 1) -> "run.Result":
    """Opening handshakes per second (with ``subscribe``: connect, Hello, Subscribe, close) for ``seconds``."""
    port = run.free_port()
    servers = target.start(port, workdir)
    group = None
    try:
        group = ClientGroup(port, "churn", count, target.kind == "meshd", subscribe, processes=processes,
                            seconds=seconds)
        window = run.Window(servers, group.procs)
        group.tell("GO")
        states = group.results()
        figures = window.close()
    finally:
        if group is not None:
            group.stop()
        _stop(servers)
    done = _sum(states, "done")
    elapsed = max(s["elapsed"] for s in states)
    figures.update(done=done, rate=done / elapsed, refused=_sum(states, "refused"), dropped=_sum(states, "dropped"),
                   connect_errors=_sum(states, "connect_errors"),
                   client_cpu=[s["client_cpu"] for s in states])
    what = "connect+hello+subscribe/s" if subscribe else "handshakes/s"
    return run.Result(what, target.label, figures)


def idle_memory(target: Target, workdir: Path, connections: int, settle: float = 2.0) -> "run.Result":
    """KiB of server RSS (summed over its process trees) per idle connection, subscribed on meshd."""
    port = run.free_port()
    servers = target.start(port, workdir)
    group = None
    try:
        time.sleep(1.0)
        pids = [s.proc.pid for s in servers]
        before = tree_rss_kib(pids)
        meshd = target.kind == "meshd"
        group = ClientGroup(port, "hold", connections, meshd, meshd)
        group.tell("GO")
        t0 = time.monotonic()
        group.wait_subscribed(connections, timeout=30 + connections / 200)
        setup = time.monotonic() - t0
        time.sleep(settle)
        after = tree_rss_kib(pids)
    finally:
        if group is not None:
            group.stop()
        _stop(servers)
    return run.Result(f"{connections:,} idle {'subscribed ' if target.kind == 'meshd' else ''}connections",
                      target.label, {"connections": connections, "rss_before_mib": before / 1024,
                                     "rss_after_mib": after / 1024, "setup_s": setup,
                                     "kib_per_connection": (after - before) / connections})


def storm(target: Target, workdir: Path, connections: int, timeout: float = 180.0) -> "run.Result":
    """``connections`` subscribed clients; SIGTERM the node, start a new one on its port; time until all are back."""
    port = run.free_port()
    servers = target.start(port, workdir)
    group = None
    try:
        group = ClientGroup(port, "hold", connections, True, True)
        group.tell("GO")
        group.wait_subscribed(connections, timeout=30 + connections / 200)
        before = group.status()
        t_stop = time.monotonic()
        for server in servers:
            server.proc.send_signal(signal.SIGTERM)
        for server in servers:
            server.proc.wait(timeout=target.drain + 60)
        stopped = time.monotonic()
        servers = target.start(port, workdir)
        restarted = time.monotonic()
        states = group.wait_subscribed(connections, timeout=timeout)
        back = max(s["last_subscribed"] for s in states)
    finally:
        if group is not None:
            group.stop()
        _stop(servers)
    refused = _sum(states, "refused")
    for status, n in _sum(before, "refused").items():
        refused[status] -= n
    return run.Result(f"reconnect storm, {connections:,} clients", target.label, {
        "connections": connections, "drain_s": stopped - t_stop, "restart_s": restarted - stopped,
        "back_s": back - restarted, "refused": {k: v for k, v in refused.items() if v},
        "connect_errors": _sum(states, "connect_errors") - _sum(before, "connect_errors"),
        "dropped": _sum(states, "dropped") - _sum(before, "dropped"), "closes": _sum(states, "closes"),
    })


def group(workdir: Path, trees: list, quick: bool = False, connections: int = 19_000,
          storm_connections: int = 19_000) -> "list[run.Result]":
    """The rows of ``--only conns``: the relay, then meshd of each tree (this one, a baseline)."""
    seconds = 2.0 if quick else 5.0
    if quick:
        connections = storm_connections = 1000
    relay = Target("relay", "relay")
    nodes = [Target(tree.label, "meshd", tree.root) for tree in trees]
    results = [handshakes(relay, workdir, seconds)]
    results += [handshakes(node, workdir, seconds) for node in nodes]
    results += [handshakes(node, workdir, seconds, subscribe=True) for node in nodes]
    results.append(idle_memory(relay, workdir, connections))
    results += [idle_memory(node, workdir, connections) for node in nodes]
    results += [storm(node, workdir, storm_connections) for node in nodes]
    return results


def table(results: "list[run.Result]") -> str:
    """The rows of :func:`group` as Markdown tables, ratios to the relay of the same run."""
    relay = {r.name: r.figures for r in results if r.server == "relay"}
    rows = ["| connections | server | per second | vs relay handshakes/s | per server CPU-second | vs relay | refused | "
            "server CPU | client CPU | saturated |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    base = relay.get("handshakes/s")
    for r in results:
        f = r.figures
        if "rate" not in f:
            continue
        server_cpu = sum(f["server_cpu"].values())
        client_cpu = sum(f["client_cpu"])
        # Per CPU-second of the server: what the server costs, whatever else the shared machine ran.
        per_cpu = f["rate"] / server_cpu if server_cpu else 0.0
        base_per_cpu = base["rate"] / sum(base["server_cpu"].values()) if base else 0.0
        saturated = "server" if server_cpu >= 0.9 else ("client" if client_cpu >= 0.9 else "neither (machine)")
        ratios = (f"{f['rate'] / base['rate']:.2f}x", f"{per_cpu / base_per_cpu:.2f}x") if base else ("", "")
        rows.append(f"| {r.name} | {r.server} | {f['rate']:,.0f} | {ratios[0]} | {per_cpu:,.0f} | {ratios[1]} | "
                    f"{sum(f['refused'].values()) + f['dropped']} | {server_cpu:.0%} | {client_cpu:.0%} | {saturated} |")
    rows += ["", "| idle | server | connections | RSS before MiB | RSS after MiB | KiB per connection | vs relay | "
                 "set-up s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    relay_kib = next((r.figures["kib_per_connection"] for r in results
                      if r.server == "relay" and "kib_per_connection" in r.figures), None)
    for r in results:
        f = r.figures
        if "kib_per_connection" in f:
            ratio = f"{f['kib_per_connection'] / relay_kib:.2f}x" if relay_kib else ""
            rows.append(f"| {r.name} | {r.server} | {f['connections']:,} | {f['rss_before_mib']:.1f} | "
                        f"{f['rss_after_mib']:.1f} | {f['kib_per_connection']:.2f} | {ratio} | {f['setup_s']:.1f} |")
    rows += ["", "| storm | server | drain s | new node up s | all back s | refused handshakes | failed connects | "
                 "dropped | close codes |", "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for r in results:
        f = r.figures
        if "back_s" in f:
            rows.append(f"| {r.name} | {r.server} | {f['drain_s']:.1f} | {f['restart_s']:.1f} | {f['back_s']:.1f} | "
                        f"{json.dumps(f['refused'])} | {f['connect_errors']} | {f['dropped']} | "
                        f"{json.dumps(f['closes'])} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        client_main(json.loads(sys.argv[2]))
    else:
        sys.exit(__doc__)
