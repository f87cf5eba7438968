"""A client written from docs/protocol.md, docs/recovery.md, docs/configuration.md
and schemas/client.fbs alone, checking history, recovery and presence against
a real node process.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import flatbuffers
import pytest
from websockets.asyncio.client import connect

from meshd.fb.client import Frame as F
from meshd.fb.client import Position as P
from meshd.fb.client.ErrorCode import ErrorCode
from meshd.fb.client.EventType import EventType
from meshd.fb.client.Opcode import Opcode

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TWISTD = REPO / ".venv" / "bin" / "twistd"
TIMEOUT = 5.0

CONFIG = """
[node]
drain_seconds = 0

[websocket]
listen = ["tcp:0:interface=127.0.0.1"]

[auth.tokens]
alice = "alice-secret"

[[rules]]
match = "*"
anonymous = ["subscribe", "publish"]

[[channels]]
match = "hist.*"
history_size = 100
recover = true
presence = true
join_leave = true

[[channels]]
match = "small.*"
history_size = 3
recover = true

[[channels]]
match = "norec.*"
history_size = 100
"""


# ---------------------------------------------------------------- the node


def start_node(tmp: Path, name: str, config: str):
    (tmp / f"{name}.toml").write_text(config)
    log = tmp / f"{name}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [str(TWISTD), "-n", "--pidfile=", "--logfile", str(log), "meshd",
         "--config", str(tmp / f"{name}.toml")],
        cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    port = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if log.exists():
            m = re.search(r"MeshServerFactory starting on (\d+)", log.read_text())
            if m:
                port = int(m.group(1))
                break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if port is None:
        proc.kill()
        err = proc.stderr.read().decode(errors="replace")
        text = log.read_text() if log.exists() else ""
        pytest.fail(f"node {name} did not start:\n{err}\n{text}")
    return proc, f"ws://127.0.0.1:{port}/", log


def stop_node(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def node_url(tmp_path_factory):
    proc, url, _ = start_node(tmp_path_factory.mktemp("node"), "node", CONFIG)
    yield url
    stop_node(proc)


# ---------------------------------------------------------------- encoding


def uuid_of(u) -> uuid.UUID | None:
    if u is None:
        return None
    return uuid.UUID(int=(u.Hi() << 64) | u.Lo())


def encode(opcode, request_id=0, *, channel=None, payload=None, version=0,
           token=None, info=None, batch=False, exclude_self=False,
           positions=None, recover=False, limit=0) -> bytes:
    b = flatbuffers.Builder(256)
    ch = b.CreateString(channel) if channel is not None else None
    tok = b.CreateString(token) if token is not None else None
    inf = b.CreateString(info) if info is not None else None
    pl = b.CreateByteVector(payload) if payload is not None else None
    pv = None
    if positions is not None:
        items = list(positions.items()) if isinstance(positions, dict) else list(positions)
        F.StartPositionsVector(b, len(items))
        for (node, epoch), seq in reversed(items):
            P.CreatePosition(b, node.int >> 64, node.int & (2**64 - 1), epoch, seq)
        pv = b.EndVector()
    F.Start(b)
    F.AddOpcode(b, opcode)
    F.AddRequestId(b, request_id)
    if ch is not None:
        F.AddChannel(b, ch)
    if tok is not None:
        F.AddToken(b, tok)
    if inf is not None:
        F.AddInfo(b, inf)
    if pl is not None:
        F.AddPayload(b, pl)
    F.AddVersion(b, version)
    F.AddBatch(b, batch)
    F.AddExcludeSelf(b, exclude_self)
    if pv is not None:
        F.AddPositions(b, pv)
    F.AddRecover(b, recover)
    F.AddLimit(b, limit)
    # The Python generated code has no finishFrameBuffer (protocol.md section 2
    # names it); Builder.Finish with the identifier does the same.
    b.Finish(F.End(b), file_identifier=b"MSH1")
    return bytes(b.Output())


def decode(data: bytes):
    assert F.Frame.FrameBufferHasIdentifier(data, 0), data[:8]
    return F.Frame.GetRootAs(data, 0)


def payload_of(f) -> bytes:
    # PayloadAsNumpy needs numpy, which is not installed; read the vector directly.
    o = f._tab.Offset(12)
    if o == 0:
        return b""
    start = f._tab.Vector(o)
    return bytes(f._tab.Bytes[start:start + f._tab.VectorLen(o)])


def batch_entries(payload: bytes):
    """Split a Batch-style payload: 4-byte LE length + one Frame buffer, repeated."""
    out, i = [], 0
    while i < len(payload):
        (n,) = struct.unpack_from("<I", payload, i)
        i += 4
        out.append(decode(bytes(payload[i:i + n])))
        i += n
    assert i == len(payload)
    return out


def positions_of(f) -> dict | None:
    if f.PositionsIsNone():
        return None
    out = {}
    for j in range(f.PositionsLength()):
        p = f.Positions(j)
        out[(uuid_of(p.Node(_Uuid())), p.Epoch())] = p.Seq()
    return out


def _Uuid():
    from meshd.fb.client.Uuid import Uuid
    return Uuid()


class Event:
    def __init__(self, f):
        self.type = f.EventType()
        self.channel = f.Channel().decode() if f.Channel() is not None else None
        self.payload = payload_of(f)
        self.session = uuid_of(f.Session())
        self.node = uuid_of(f.Node())
        self.epoch = f.Epoch()
        self.seq = f.Seq()
        self.principal = f.Principal().decode() if f.Principal() is not None else None

    def __repr__(self):
        return f"Event({self.type}, {self.channel}, {self.payload!r}, seq={self.seq})"


class MeshdError(Exception):
    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code


# ---------------------------------------------------------------- the client


class Client:
    def __init__(self):
        self.ws = None
        self.next_id = 1
        self.backlog: list[Event] = []
        self.positions: dict[str, dict] = {}  # channel -> {(node, epoch): seq}
        self.session = None
        self.node = None

    @classmethod
    async def open(cls, url, *, info=None, token=None, batch=False):
        c = cls()
        c.ws = await connect(url, subprotocols=["meshd.v1"], compression=None,
                             max_size=16 * 2**20, open_timeout=TIMEOUT)
        assert c.ws.subprotocol == "meshd.v1"
        welcome, _ = await c.request(Opcode.Hello, version=1, info=info, token=token,
                                     batch=batch)
        assert welcome.Opcode() == Opcode.Welcome
        c.session = uuid_of(welcome.Session())
        c.node = uuid_of(welcome.Node())
        c.principal = welcome.Principal()
        return c

    async def close(self):
        await self.ws.close()

    async def _recv(self, timeout=TIMEOUT):
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(data, bytes)
        f = decode(data)
        if f.Opcode() == Opcode.Batch:
            return batch_entries(payload_of(f))
        return [f]

    def _note(self, ev: Event):
        if ev.channel is not None and ev.epoch:
            kept = self.positions.setdefault(ev.channel, {})
            key = (ev.node, ev.epoch)
            kept[key] = max(kept.get(key, 0), ev.seq)

    async def request(self, opcode, **fields):
        """Send a request; return (answer, events received before the answer)."""
        rid = self.next_id
        self.next_id += 1
        await self.ws.send(encode(opcode, rid, **fields))
        events = []
        while True:
            for f in await self._recv():
                if f.Opcode() == Opcode.Event:
                    ev = Event(f)
                    self._note(ev)
                    events.append(ev)
                elif f.RequestId() == rid:
                    if f.Opcode() == Opcode.Error:
                        self.backlog.extend(events)
                        raise MeshdError(f.ErrorCode(), f.Message())
                    self.backlog.extend(events)
                    return f, events

    async def sync(self) -> list[Event]:
        """Ping; return every event not yet consumed (backlog and up to the Pong)."""
        await self.request(Opcode.Ping)
        out, self.backlog = self.backlog, []
        return out

    async def subscribe(self, channel, **kw):
        ack, before = await self.request(Opcode.Subscribe, channel=channel, **kw)
        # events before the Ack are handed to the caller, not kept in the backlog
        for ev in before:
            self.backlog.remove(ev)
        pos = positions_of(ack)
        if pos is not None:
            kept = self.positions.setdefault(channel, {})
            for k, v in pos.items():
                kept[k] = max(kept.get(k, 0), v)
        return ack, before

    async def publish(self, channel, payload: bytes):
        await self.request(Opcode.Publish, channel=channel, payload=payload)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def hist_events(c, channel, **kw):
    ack, _ = await c.request(Opcode.History, channel=channel, **kw)
    return ack, [Event(f) for f in batch_entries(payload_of(ack))]


# ---------------------------------------------------------------- 1. positions


def published(events) -> list:
    """The payloads of the published (ChannelEvent) events among ``events``, in order: Join and Leave
    events of join_leave channels come between them."""
    return [e.payload for e in events if e.type == EventType.ChannelEvent]


def test_positions_on_events_and_subscribe_acks(node_url):
    async def main():
        a = await Client.open(node_url)
        ack, _ = await a.subscribe("hist.one")
        assert positions_of(ack) is not None, "Ack of a history channel must carry positions"
        ack_plain, _ = await a.subscribe("plain.one")
        assert positions_of(ack_plain) is None, "a plain channel's Ack has no positions"
        await a.publish("hist.one", b"e1")
        await a.publish("hist.one", b"e2")
        await a.publish("plain.one", b"p1")
        evs = await a.sync()
        assert [e.payload for e in evs] == [b"e1", b"e2", b"p1"]
        e1, e2, p1 = evs
        for e in (e1, e2):
            assert e.type == EventType.ChannelEvent
            assert e.node == a.node and e.session == a.session
            assert e.epoch != 0 and e.seq != 0
        assert e1.epoch == e2.epoch and e2.seq > e1.seq
        assert p1.epoch == 0 and p1.seq == 0
        # a second Subscribe Ack now names this node (it has published on the channel)
        ack2, _ = await a.subscribe("hist.one")
        pos = positions_of(ack2)
        assert pos == {(a.node, e2.epoch): e2.seq}, pos
        await a.close()

    run(main())


# ---------------------------------------------------------------- 2. History


def test_history_opcode(node_url):
    async def main():
        pub = await Client.open(node_url)
        for i in range(5):
            await pub.publish("hist.h", b"h%d" % i)
        r = await Client.open(node_url)
        # without subscribing
        ack, evs = await hist_events(r, "hist.h", limit=3)
        assert [e.payload for e in evs] == [b"h2", b"h3", b"h4"]
        assert all(e.channel == "hist.h" and e.epoch and e.seq for e in evs)
        now = positions_of(ack)
        assert now == {(evs[-1].node, evs[-1].epoch): evs[-1].seq}, now
        ack, evs_all = await hist_events(r, "hist.h")
        assert [e.payload for e in evs_all] == [b"h%d" % i for i in range(5)]
        # with positions: those after them, with recovered
        h1 = evs_all[1]
        ack, evs = await hist_events(r, "hist.h", positions={(h1.node, h1.epoch): h1.seq})
        assert [e.payload for e in evs] == [b"h2", b"h3", b"h4"]
        assert ack.Recovered() is True
        # limit leaving some out: recovered false (doc does not say which are returned)
        ack, evs = await hist_events(r, "hist.h", positions={(h1.node, h1.epoch): h1.seq},
                                     limit=1)
        assert ack.Recovered() is False
        print("History positions+limit=1 returned", [e.payload for e in evs])
        assert len(evs) == 1
        # empty positions list: everything held
        ack, evs = await hist_events(r, "hist.h", positions={})
        assert len(evs) == 5 and ack.Recovered() is True
        # a channel without history
        with pytest.raises(MeshdError) as ei:
            await hist_events(r, "plain.h")
        assert ei.value.code == ErrorCode.InvalidArgument
        # a history channel with nothing yet
        ack, evs = await hist_events(r, "hist.empty")
        assert evs == [] and positions_of(ack) is not None
        await pub.close()
        await r.close()

    run(main())


# ---------------------------------------------------------------- 3. recovery


def test_recovery_after_disconnect(node_url):
    async def main():
        ch = "hist.rec"
        a = await Client.open(node_url)
        b = await Client.open(node_url)
        ack, before = await a.subscribe(ch)
        assert before == [] and ack.Recovered() is False
        await b.publish(ch, b"seen1")
        await b.publish(ch, b"seen2")
        assert [e.payload for e in await a.sync()] == [b"seen1", b"seen2"]
        kept = dict(a.positions[ch])
        await a.close()
        missed = [b"m%d" % i for i in range(4)]
        for m in missed:
            await b.publish(ch, m)
        a2 = await Client.open(node_url)
        a2.positions[ch] = dict(kept)
        ack, before = await a2.subscribe(ch, recover=True, positions=kept)
        assert ack.Recovered() is True
        assert published(before) == missed
        seqs = [e.seq for e in before]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        await b.publish(ch, b"live")
        assert published(await a2.sync()) == [b"live"]
        # recover again from the up-to-date positions: nothing to replay
        ack, before = await a2.subscribe(ch, recover=True, positions=a2.positions[ch])
        print("re-Subscribe recover on an already subscribed channel:",
              ack.Recovered(), published(before))
        await a2.close()
        await b.close()

    run(main())


def test_recovery_from_empty_positions_and_without_positions(node_url):
    async def main():
        ch = "hist.fresh"
        a = await Client.open(node_url)
        b = await Client.open(node_url)
        ack, _ = await a.subscribe(ch)
        # protocol.md: the node itself is listed "once it has published on the
        # channel"; a fresh channel's Ack actually lists this node with seq 0.
        fresh = positions_of(ack)
        print("fresh channel Subscribe Ack positions:", fresh, "node", a.node)
        assert fresh == {} or (len(fresh) == 1 and list(fresh)[0][0] == a.node
                               and list(fresh.values()) == [0]), fresh
        await a.close()
        await b.publish(ch, b"x1")
        await b.publish(ch, b"x2")
        a2 = await Client.open(node_url)
        ack, before = await a2.subscribe(ch, recover=True, positions={})
        assert ack.Recovered() is True
        assert published(before) == [b"x1", b"x2"]
        await a2.close()
        # recover without positions: "recovers nothing"
        a3 = await Client.open(node_url)
        ack, before = await a3.subscribe(ch, recover=True)
        assert before == []
        print("recover without positions: recovered =", ack.Recovered())
        assert ack.Recovered() is False
        await a3.close()
        await b.close()

    run(main())


def test_recover_on_history_channel_without_recover_option(node_url):
    async def main():
        ch = "norec.x"
        a = await Client.open(node_url)
        b = await Client.open(node_url)
        ack, _ = await a.subscribe(ch)
        assert positions_of(ack) is not None
        await b.publish(ch, b"n1")
        await a.sync()
        kept = dict(a.positions[ch])
        await a.close()
        await b.publish(ch, b"n2")
        a2 = await Client.open(node_url)
        ack, before = await a2.subscribe(ch, recover=True, positions=kept)
        assert before == [] and ack.Recovered() is False
        await a2.close()
        await b.close()

    run(main())


# ---------------------------------------------------------------- 4. too old


def test_positions_older_than_history(node_url):
    async def main():
        ch = "small.x"  # history_size = 3
        a = await Client.open(node_url)
        b = await Client.open(node_url)
        await a.subscribe(ch)
        await b.publish(ch, b"s0")
        assert [e.payload for e in await a.sync()] == [b"s0"]
        kept = dict(a.positions[ch])
        await a.close()
        for i in range(1, 6):
            await b.publish(ch, b"s%d" % i)
        a2 = await Client.open(node_url)
        ack, before = await a2.subscribe(ch, recover=True, positions=kept)
        assert ack.Recovered() is False
        assert before == []
        # History shows only the last 3 kept
        _, evs = await hist_events(a2, ch)
        assert [e.payload for e in evs] == [b"s3", b"s4", b"s5"]
        # the subscription still works live
        await b.publish(ch, b"s6")
        assert published(await a2.sync()) == [b"s6"]
        # History from the too-old positions: recovered false and, found by
        # experiment (the docs do not say), no events at all, not the 3 it holds.
        hack, hevs = await hist_events(a2, ch, positions=kept)
        assert hack.Recovered() is False and hevs == []
        # but a position within the window is recovered
        await a2.close()
        await b.publish(ch, b"s7")
        a3 = await Client.open(node_url)
        s6 = {(evs[-1].node, evs[-1].epoch): evs[-1].seq}  # position of s5
        ack, before = await a3.subscribe(ch, recover=True, positions=s6)
        assert ack.Recovered() is True
        assert published(before) == [b"s6", b"s7"]
        await a3.close()
        await b.close()

    run(main())


# ---------------------------------------------------------------- 5. presence


def test_presence_and_join_leave(node_url):
    async def main():
        ch = "hist.room"
        obs = await Client.open(node_url)  # no info
        await obs.subscribe(ch)
        a = await Client.open(node_url, info="alpha")
        b = await Client.open(node_url, info="beta", token="alice-secret")
        assert b.principal == b"alice"
        await a.subscribe(ch)
        evs = await obs.sync()
        assert [(e.type, e.session, e.payload, e.principal) for e in evs] == [
            (EventType.Join, a.session, b"alpha", None)]
        assert evs[0].channel == ch and evs[0].node == a.node
        assert await a.sync() == [], "the session itself gets no Join"
        await b.subscribe(ch)
        for c in (obs, a):
            evs = await c.sync()
            assert [(e.type, e.session, e.payload, e.principal) for e in evs] == [
                (EventType.Join, b.session, b"beta", "alice")], evs
        assert await b.sync() == []

        ack, _ = await obs.request(Opcode.Presence, channel=ch)
        entries = {}
        for j in range(ack.PresenceLength()):
            p = ack.Presence(j)
            entries[uuid_of(p.Session())] = (
                uuid_of(p.Node()), p.Principal(), p.Info())
        assert entries == {
            obs.session: (obs.node, None, None),
            a.session: (a.node, None, b"alpha"),
            b.session: (b.node, b"alice", b"beta"),
        }, entries
        ack, _ = await obs.request(Opcode.PresenceStats, channel=ch)
        assert (ack.Sessions(), ack.Principals()) == (3, 1)

        # Unsubscribe: Leave to others, not to itself
        await a.request(Opcode.Unsubscribe, channel=ch)
        for c in (obs, b):
            evs = await c.sync()
            assert [(e.type, e.session, e.payload) for e in evs] == [
                (EventType.Leave, a.session, b"alpha")], evs
        assert await a.sync() == []
        # Disconnect: Leave
        await b.close()
        deadline = time.monotonic() + TIMEOUT
        evs = []
        while not evs and time.monotonic() < deadline:
            evs = await obs.sync()
            await asyncio.sleep(0.02)
        assert [(e.type, e.session, e.principal) for e in evs] == [
            (EventType.Leave, b.session, "alice")], evs
        ack, _ = await obs.request(Opcode.PresenceStats, channel=ch)
        assert (ack.Sessions(), ack.Principals()) == (1, 0)

        # a channel without presence
        with pytest.raises(MeshdError) as ei:
            await obs.request(Opcode.Presence, channel="norec.p")
        assert ei.value.code == ErrorCode.InvalidArgument
        with pytest.raises(MeshdError) as ei:
            await obs.request(Opcode.PresenceStats, channel="plain.p")
        assert ei.value.code == ErrorCode.InvalidArgument
        await a.close()
        await obs.close()

    run(main())


def test_hello_info_too_long(node_url):
    async def main():
        ws = await connect(node_url, subprotocols=["meshd.v1"], compression=None)
        await ws.send(encode(Opcode.Hello, 1, version=1, info="x" * 257))
        f = decode(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert (f.Opcode(), f.ErrorCode()) == (Opcode.Error, ErrorCode.InvalidArgument)
        await ws.send(encode(Opcode.Hello, 2, version=1, info="x" * 256))
        f = decode(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert f.Opcode() == Opcode.Welcome
        await ws.close()

    run(main())


def test_history_size_boundary(node_url):
    """history_size = 3: missing exactly 3 events is still recovered, 4 is not."""
    async def main():
        for missed, ok in ((3, True), (4, False)):
            ch = f"small.boundary{missed}"
            a = await Client.open(node_url)
            b = await Client.open(node_url)
            await a.subscribe(ch)
            await b.publish(ch, b"s0")
            await a.sync()
            kept = dict(a.positions[ch])
            await a.close()
            for i in range(missed):
                await b.publish(ch, b"m%d" % i)
            a2 = await Client.open(node_url)
            ack, before = await a2.subscribe(ch, recover=True, positions=kept)
            assert ack.Recovered() is ok
            assert published(before) == ([b"m%d" % i for i in range(missed)]
                                                   if ok else [])
            await a2.close()
            await b.close()

    run(main())


def test_join_leave_carry_positions(node_url):
    """On a history channel Join and Leave are events of the channel like any other: they carry a
    position, are kept, and come back in History and recoveries."""
    async def main():
        ch = "hist.jl"
        o = await Client.open(node_url)
        await o.subscribe(ch)
        x = await Client.open(node_url, info="x")
        await x.subscribe(ch)
        (join,) = await o.sync()
        assert join.type == EventType.Join and join.epoch and join.seq
        _, evs = await hist_events(o, ch)  # o's own Join (which o did not get) and x's
        assert [e.type for e in evs] == [EventType.Join, EventType.Join] and evs[-1].seq == join.seq
        await x.close()
        deadline = time.monotonic() + TIMEOUT
        got = []
        while not got and time.monotonic() < deadline:
            got = await o.sync()
        assert [e.type for e in got] == [EventType.Leave]
        assert got[0].seq > join.seq
        await o.close()

    run(main())


# ---------------------------------------------------------------- two nodes


MESH_CHANNELS = CONFIG.split("[[rules]]", 1)[1]


def mesh_config(node_id: str, name: str, seeds: list[str]) -> str:
    return f"""
[node]
id = "{node_id}"
name = "{name}"
drain_seconds = 0

[websocket]
listen = ["tcp:0:interface=127.0.0.1"]

[mesh]
cluster = "docs"
listen = "tcp:0:interface=127.0.0.1"
seeds = {seeds!r}
ca = "certs/ca.pem"
cert = "certs/{name}.pem"
key = "certs/{name}.key"
heartbeat_interval = 0.2
heartbeat_timeout = 1.0
queue_max_seconds = 1

[auth.tokens]
alice = "alice-secret"

[[rules]]{MESH_CHANNELS}"""


def wait_log(log: Path, pattern: str, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text())
        if m:
            return m
        time.sleep(0.05)
    pytest.fail(f"no {pattern!r} in {log}:\n{log.read_text()}")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mesh")
    meshctl = str(REPO / ".venv" / "bin" / "meshctl")
    subprocess.run([meshctl, "certs", "ca", "--dir", "certs", "--cluster", "docs"],
                   cwd=tmp, check=True, capture_output=True, timeout=30)
    ids = {}
    for n in ("x", "p"):
        out = subprocess.run([meshctl, "certs", "node", n, "--dir", "certs",
                              "--san", "127.0.0.1"],
                             cwd=tmp, check=True, capture_output=True, text=True, timeout=30)
        ids[n] = out.stdout.strip()
    px, url_x, log_x = start_node(tmp, "x", mesh_config(ids["x"], "x", []))
    m = wait_log(log_x, r"advertised as (127\.0\.0\.1:\d+)")
    pp, url_p, log_p = start_node(tmp, "p", mesh_config(ids["p"], "p", [m.group(1)]))
    procs = {"x": px, "p": pp}
    try:
        yield {"x": url_x, "p": url_p, "ids": {k: uuid.UUID(v) for k, v in ids.items()},
               "procs": procs, "logs": {"x": log_x, "p": log_p}}
    finally:
        for proc in procs.values():
            stop_node(proc)


async def wait_linked(url, other: uuid.UUID, channel="hist.linkcheck"):
    """protocol.md: a history Subscribe Ack lists 'for each other linked node,
    the last number it received from it'; poll until the other node shows."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        c = await Client.open(url)
        ack, _ = await c.subscribe(channel)
        await c.close()
        if any(node == other for node, _ in positions_of(ack)):
            return
        await asyncio.sleep(0.1)
    pytest.fail("nodes did not link")


def test_mesh_recovery_on_either_node(mesh):
    """Subscribed on X, publisher on P; recover on X and on P."""
    async def main():
        await wait_linked(mesh["x"], mesh["ids"]["p"])
        await wait_linked(mesh["p"], mesh["ids"]["x"])
        for where in ("x", "p"):
            ch = f"hist.mesh.{where}"
            a = await Client.open(mesh["x"])
            pub = await Client.open(mesh["p"])
            await a.subscribe(ch)
            # protocol.md section 5: interest reaches the peer about a round trip
            # after the Ack; publish markers until one arrives.
            deadline = time.monotonic() + TIMEOUT
            got = []
            i = 0
            while not got and time.monotonic() < deadline:
                await pub.publish(ch, b"warm%d" % i)
                i += 1
                await asyncio.sleep(0.05)
                got = await a.sync()
            assert got, "no event crossed the mesh"
            assert all(e.node == mesh["ids"]["p"] and e.epoch and e.seq for e in got)
            kept = dict(a.positions[ch])
            await a.close()
            missed = [b"mm%d" % k for k in range(3)]
            for m in missed:
                await pub.publish(ch, m)
            a2 = await Client.open(mesh[where])
            t0 = time.monotonic()
            ack, before = await a2.subscribe(ch, recover=True, positions=kept)
            took = time.monotonic() - t0
            print(f"mesh recovery on {where}: recovered={ack.Recovered()} "
                  f"replayed={published(before)} in {took:.2f}s")
            assert ack.Recovered() is True
            assert published(before) == missed
            await pub.publish(ch, b"live")
            deadline = time.monotonic() + TIMEOUT
            live = []
            while not live and time.monotonic() < deadline:
                live = await a2.sync()
            assert published(live) == [b"live"]
            await a2.close()
            await pub.close()

    run(main())


def test_mesh_presence_and_join_leave(mesh):
    async def main():
        ch = "hist.meshroom"
        obs = await Client.open(mesh["x"])
        await obs.subscribe(ch)
        remote = await Client.open(mesh["p"], info="remote", token="alice-secret")
        local = await Client.open(mesh["x"], info="local")
        # wait until X's interest has reached P (a Join routed from P needs it)
        await asyncio.sleep(0.3)
        await remote.subscribe(ch)
        await local.subscribe(ch)
        deadline = time.monotonic() + TIMEOUT
        evs = []
        while len(evs) < 2 and time.monotonic() < deadline:
            evs += await obs.sync()
        joins = {(e.type, e.session, e.node, e.payload, e.principal) for e in evs}
        assert joins == {
            (EventType.Join, remote.session, remote.node, b"remote", "alice"),
            (EventType.Join, local.session, local.node, b"local", None),
        }, evs
        for asker in (obs, remote):
            ack, _ = await asker.request(Opcode.Presence, channel=ch)
            entries = {}
            for j in range(ack.PresenceLength()):
                p = ack.Presence(j)
                entries[uuid_of(p.Session())] = (uuid_of(p.Node()), p.Info())
            assert entries == {
                obs.session: (obs.node, None),
                remote.session: (remote.node, b"remote"),
                local.session: (local.node, b"local"),
            }, entries
            ack, _ = await asker.request(Opcode.PresenceStats, channel=ch)
            assert (ack.Sessions(), ack.Principals()) == (3, 1)
        await remote.close()
        deadline = time.monotonic() + TIMEOUT
        evs = []
        while not evs and time.monotonic() < deadline:
            evs = await obs.sync()
        assert [(e.type, e.session) for e in evs] == [(EventType.Leave, remote.session)]
        await local.close()
        await obs.close()

    run(main())


def test_mesh_node_killed(mesh):
    """recovery.md: with a subscriber that left X and a publisher on P, the
    client recovers on P after X was killed; protocol.md: Leave events for the
    sessions of a node that is gone, once the mesh gives it up."""
    async def main():
        chans = ("small.killed", "hist.killed")  # without / with presence+join_leave
        await wait_linked(mesh["p"], mesh["ids"]["x"])
        obs = await Client.open(mesh["p"])
        for ch in chans:
            await obs.subscribe(ch)
        gone = await Client.open(mesh["x"], info="doomed")
        a = await Client.open(mesh["x"])
        await asyncio.sleep(0.3)  # P's interest reaches X
        for ch in chans:
            await a.subscribe(ch)
        await gone.subscribe("hist.killed")
        deadline = time.monotonic() + TIMEOUT
        evs = []
        while len(evs) < 2 and time.monotonic() < deadline:
            evs += await obs.sync()
        assert {(e.type, e.payload) for e in evs} == {(EventType.Join, b""),
                                                      (EventType.Join, b"doomed")}
        for ch in chans:  # a receives events from P
            deadline = time.monotonic() + TIMEOUT
            got = []
            i = 0
            while not got and time.monotonic() < deadline:
                await obs.publish(ch, b"k%d" % i)
                i += 1
                await asyncio.sleep(0.05)
                got = await a.sync()
            assert got
        await obs.sync()
        kept = {ch: dict(a.positions[ch]) for ch in chans}
        # X is named only where it published: the Joins of its sessions on the join_leave channel
        assert mesh["ids"]["x"] not in {n for n, _ in kept["small.killed"]}
        assert mesh["ids"]["x"] in {n for n, _ in kept["hist.killed"]}
        mesh["procs"]["x"].kill()
        mesh["procs"]["x"].wait(5)
        for ch in chans:
            for m in (b"z0", b"z1"):
                await obs.publish(ch, m)
        # Leave for both X sessions, after heartbeat_timeout + queue_max_seconds
        t0 = time.monotonic()
        deadline = t0 + 8
        leaves = []
        while len(leaves) < 2 and time.monotonic() < deadline:
            leaves += [e for e in await obs.sync() if e.type == EventType.Leave]
            await asyncio.sleep(0.1)
        print(f"Leaves for the killed node's sessions after {time.monotonic() - t0:.2f}s:",
              [e.payload for e in leaves])
        assert {e.session for e in leaves} == {a.session, gone.session}
        assert all(e.node == mesh["ids"]["x"] for e in leaves)
        # the documented promise, on a history channel without join_leave
        a2 = await Client.open(mesh["p"])
        ack, before = await a2.subscribe("small.killed", recover=True,
                                         positions=kept["small.killed"])
        assert ack.Recovered() is True
        assert published(before) == [b"z0", b"z1"]
        await a2.close()
        mesh["killed"] = kept
        await obs.close()

    run(main())


def test_mesh_node_killed_join_leave_channel(mesh):
    """The same recovery on a channel with join_leave, with every position X's Ack handed out (X itself
    at seq 0 included): X's Join and Leave events are events of the channel, numbered and followed, so
    P vouches for them."""
    async def main():
        kept = mesh["killed"]["hist.killed"]
        a2 = await Client.open(mesh["p"])
        ack, before = await a2.subscribe("hist.killed", recover=True, positions=kept)
        print("join_leave channel, all positions:", ack.Recovered(),
              [(e.type, e.payload, e.seq) for e in before])
        await a2.close()
        a3 = await Client.open(mesh["p"])
        only_p = {k: v for k, v in kept.items() if k[0] == mesh["ids"]["p"]}
        ack3, before3 = await a3.subscribe("hist.killed", recover=True, positions=only_p)
        print("join_leave channel, P's position only:", ack3.Recovered(),
              [(e.type, e.payload, e.seq) for e in before3])
        _, held = await hist_events(a3, "hist.killed")
        print("P's History of the join_leave channel:",
              [(e.type, e.payload, e.node == mesh["ids"]["x"], e.seq) for e in held])
        await a3.close()
        assert ack.Recovered() is True
        assert published(before) == [b"z0", b"z1"]

    run(main())
