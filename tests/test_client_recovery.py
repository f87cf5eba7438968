"""History channels in the Python clients: positions, recovery after a cut, and History requests.

The Twisted client against in-process nodes; the asyncio client and ``meshctl sub --recover``
against node processes (slow).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from uuid import UUID

import pytest
from twisted.internet import reactor
from twisted.trial import unittest

from meshd.aio import connect as aio_connect
from meshd.channels import ChannelOptions
from meshd.client import ReconnectingClient, Recovery
from meshd.clientcore import Positions
from meshd.codec import Message, Opcode, Position
from meshd.config import Config
from meshd.constants import CLOSE_SLOW_CONSUMER
from meshd.permissions import Rule

from .meshsupport import MeshTestCase
from .support import NodeProcess, NodeTestCase, sleep
from .test_client_reconnect import FAST, Meshctl, publish, wait_for

CHANNELS = (ChannelOptions("chat.*", history_size=2000, history_bytes=4 << 20, recover=True),
            ChannelOptions("small.*", history_size=5, recover=True),
            ChannelOptions("log.*", history_size=100))

#: The same, for a node process.
CONFIG = """
[websocket]
listen = ["tcp:0:interface=127.0.0.1"]
[[channels]]
match = "chat.*"
history_size = 2000
history_bytes = 4194304
recover = true
[[rules]]
match = "*"
anonymous = ["subscribe", "publish"]
"""


class PositionsTests(unittest.SynchronousTestCase):
    """meshd.clientcore.Positions, the tracker both clients share."""

    A, B = UUID(int=1), UUID(int=2)

    def event(self, channel: str, node: UUID, epoch: int, seq: int) -> Message:
        return Message(opcode=Opcode.Event, channel=channel, node=node, epoch=epoch, seq=seq)

    def test_tracks_the_highest_seq_per_origin(self) -> None:
        positions = Positions()
        positions.seen(self.event("chat", self.A, 1, 5))  # not a history channel yet: ignored
        self.assertIsNone(positions.get("chat"))
        positions.acked("chat", Message(opcode=Opcode.Ack, positions=[Position(self.A, 1, 3)]))
        positions.seen(self.event("chat", self.A, 1, 7))
        positions.seen(self.event("chat", self.A, 1, 6))  # never backwards
        positions.seen(self.event("chat", self.B, 9, 2))
        positions.seen(self.event("chat", self.B, 9, 0))  # no position: ignored
        positions.seen(self.event("other", self.A, 1, 99))
        self.assertEqual(positions.get("chat"), [Position(self.A, 1, 7), Position(self.B, 9, 2)])
        positions.acked("plain", Message(opcode=Opcode.Ack))
        self.assertNotIn("plain", positions)
        positions.forget("chat")
        self.assertEqual(positions.channels, ())

    def test_recovering(self) -> None:
        """A recovered Ack merges (the highest of each); a not recovered one starts again from its positions;
        the events between the recovering Subscribe and its Ack are counted."""
        positions = Positions()
        positions.acked("chat", Message(opcode=Opcode.Ack, positions=[Position(self.A, 1, 3)]))
        fields = positions.recovering("chat")
        self.assertEqual(fields, {"channel": "chat", "recover": True, "positions": [Position(self.A, 1, 3)]})
        positions.seen(self.event("chat", self.A, 1, 4))
        positions.seen(self.event("chat", self.B, 2, 8))
        recovery = positions.recovered("chat", Message(opcode=Opcode.Ack, recovered=True,
                                                        positions=[Position(self.A, 1, 4), Position(self.B, 2, 6)]))
        self.assertEqual((recovery.recovered, recovery.events, recovery.positions),
                         (True, 2, (Position(self.A, 1, 3),)))
        self.assertEqual(positions.get("chat"), [Position(self.A, 1, 4), Position(self.B, 2, 8)])
        positions.recovering("chat")
        recovery = positions.recovered("chat", Message(opcode=Opcode.Ack, recovered=False,
                                                        positions=[Position(self.B, 3, 1)]))
        self.assertEqual((recovery.recovered, recovery.events), (False, 0))
        self.assertEqual(positions.get("chat"), [Position(self.B, 3, 1)])


def config() -> Config:
    everyone = Rule("*", anonymous=frozenset({"subscribe", "publish"}))
    return Config(source=Path("test.toml"), channels=CHANNELS, rules=(everyone,))


class TwistedRecoveryTests(NodeTestCase):
    def reconnecting(self, **options) -> ReconnectingClient:
        """A started client collecting events in ``received``, state changes in ``changes`` and recoveries
        in ``recoveries``."""
        options.setdefault("retry_policy", FAST)
        client = ReconnectingClient(self.url, reactor=reactor, **options)
        client.received, client.changes, client.recoveries = [], [], []  # type: ignore[attr-defined]
        client.add_listener(client.received.append)
        client.add_state_listener(client.changes.append)
        client.add_recovery_listener(client.recoveries.append)
        client.startService()
        self.addCleanup(lambda: client.close().addTimeout(10, reactor))
        return client

    def cut(self, client: ReconnectingClient) -> None:
        """The node closes the client's session with a code that it reconnects after."""
        self.app.registry.get(client.session_id).lifecycle.close(CLOSE_SLOW_CONSUMER, "slow consumer")

    def connects(self, client: ReconnectingClient) -> int:
        return [c.state for c in client.changes].count("connected")

    async def test_recovers_a_thousand_events(self) -> None:
        """A subscriber cut while 1,000 events are published gets every one, in order and once (the missed ones
        replayed before the Ack), then live ones; its recovery listener says how many were replayed."""
        await self.start_node(config())
        sub = self.reconnecting()
        stream = sub.events()
        await sub.when_connected().addTimeout(5, reactor)
        ack = await sub.subscribe("chat.room")
        self.assertIsNotNone(ack.positions, "a history channel's Ack carries positions")
        self.assertEqual(sub.positions("chat.room"), ack.positions)
        publisher = await self.client()
        for i in range(300):
            publisher.publish("chat.room", b"%d" % i, ack=False)
        await publisher.ping()
        await wait_for(lambda: len(sub.received) >= 100, "the first events")
        before = len(sub.received)
        self.cut(sub)
        for i in range(300, 1000):
            publisher.publish("chat.room", b"%d" % i, ack=False)
            if i % 100 == 0:
                await publisher.ping()  # the reconnect may come in the middle: the seam must hold
        await publisher.ping()
        await wait_for(lambda: self.connects(sub) == 2, "the reconnect")
        await wait_for(lambda: len(sub.received) >= 1000, "all 1,000 events")
        await publisher.publish("chat.room", b"live")
        await wait_for(lambda: len(sub.received) >= 1001, "the live event")
        await sleep(0.05)
        self.assertEqual([e.payload for e in sub.received], [b"%d" % i for i in range(1000)] + [b"live"])
        [recovery] = sub.recoveries
        self.assertIsInstance(recovery, Recovery)
        self.assertTrue(recovery.recovered)
        self.assertEqual(recovery.channel, "chat.room")
        self.assertGreater(recovery.events, 0)
        self.assertLessEqual(recovery.events, 1000 - before)
        self.assertEqual(recovery.describe(), f"recovered {recovery.events} events on chat.room")
        self.assertEqual(sub.changes[-1].state, "connected")
        last = sub.received[-1]
        self.assertEqual(sub.positions("chat.room"), [Position(last.node, last.epoch, last.seq)])
        streamed = [(await stream.__anext__()).payload for _ in range(1001)]
        self.assertEqual(streamed, [e.payload for e in sub.received])

    async def test_not_recovered_when_history_is_too_short(self) -> None:
        """Positions older than what the node keeps: not recovered, nothing replayed, reported once; the client
        starts again from the Ack's positions, and the next cut recovers."""
        await self.start_node(config())
        sub = self.reconnecting(retry_policy=lambda attempt: 0.3)
        await sub.when_connected().addTimeout(5, reactor)
        await sub.subscribe("small.x")
        publisher = await self.client()
        await publisher.publish("small.x", b"seen")
        await wait_for(lambda: len(sub.received) == 1, "the first event")
        self.cut(sub)
        await wait_for(lambda: sub.state == "disconnected", "the cut")
        for i in range(20):  # history_size 5: "seen" and the next 15 go
            await publisher.publish("small.x", b"missed %d" % i)
        await wait_for(lambda: self.connects(sub) == 2, "the reconnect")
        [recovery] = sub.recoveries
        self.assertEqual((recovery.channel, recovery.recovered, recovery.events), ("small.x", False, 0))
        self.assertTrue(recovery.describe().startswith("not recovered on small.x: "))
        seen = sub.received[0]
        self.assertEqual(recovery.positions, (Position(seen.node, seen.epoch, seen.seq),))
        await publisher.publish("small.x", b"live")
        await wait_for(lambda: len(sub.received) == 2, "the live event")
        self.assertEqual([e.payload for e in sub.received], [b"seen", b"live"])
        # From the new session's positions on, a cut with two events missed recovers them.
        self.cut(sub)
        await wait_for(lambda: sub.state == "disconnected", "the second cut")
        await publisher.publish("small.x", b"after 1")
        await publisher.publish("small.x", b"after 2")
        await wait_for(lambda: self.connects(sub) == 3, "the second reconnect")
        self.assertEqual([(r.recovered, r.events) for r in sub.recoveries], [(False, 0), (True, 2)])
        self.assertEqual([e.payload for e in sub.received], [b"seen", b"live", b"after 1", b"after 2"])

    async def test_recover_off_and_plain_channels(self) -> None:
        """recover=False subscribes again without positions (missed events stay missed, nothing is reported);
        channels without history have no positions; unsubscribing forgets them."""
        await self.start_node(config())
        sub = self.reconnecting(recover=False, retry_policy=lambda attempt: 0.3)
        await sub.when_connected().addTimeout(5, reactor)
        await sub.subscribe("chat.off")
        await sub.subscribe("plain")
        self.assertIsNotNone(sub.positions("chat.off"))
        self.assertIsNone(sub.positions("plain"))
        publisher = await self.client()
        self.cut(sub)
        await wait_for(lambda: sub.state == "disconnected", "the cut")
        await publisher.publish("chat.off", b"missed")
        await wait_for(lambda: self.connects(sub) == 2, "the reconnect")
        await publisher.publish("chat.off", b"live")
        await wait_for(lambda: len(sub.received) == 1, "the live event")
        self.assertEqual(([e.payload for e in sub.received], sub.recoveries), ([b"live"], []))
        await sub.unsubscribe("chat.off")
        self.assertIsNone(sub.positions("chat.off"))

    async def test_history_channel_without_recover(self) -> None:
        """A history channel whose options do not recover: the client tries, and reports not recovered."""
        await self.start_node(config())
        sub = self.reconnecting()
        await sub.when_connected().addTimeout(5, reactor)
        await sub.subscribe("log.a")
        self.cut(sub)
        await wait_for(lambda: self.connects(sub) == 2, "the reconnect")
        self.assertEqual([(r.channel, r.recovered) for r in sub.recoveries], [("log.a", False)])

    async def test_history(self) -> None:
        """history() on both Twisted clients: the latest events, the positions, and those after positions."""
        app = await self.start_node(config())
        publisher = await self.client()
        for i in range(6):
            await publisher.publish("chat.h", b"m%d" % i)
        client = self.reconnecting()
        await client.when_connected().addTimeout(5, reactor)
        latest = await client.history("chat.h", limit=4)
        self.assertEqual([e.payload for e in latest.events], [b"m2", b"m3", b"m4", b"m5"])
        [position] = latest.positions
        self.assertEqual((position.node, position.epoch), (app.node_id, app.incarnation))
        self.assertFalse(latest.recovered)
        since = await publisher.history("chat.h", positions=[position._replace(seq=latest.events[-3].seq)])
        self.assertEqual(([e.payload for e in since.events], since.recovered), ([b"m4", b"m5"], True))
        self.assertEqual(len((await client.history("chat.h")).events), 6)
        self.assertIsNone(client.positions("chat.h"), "history() does not subscribe")


class MeshRecoveryTests(MeshTestCase):
    async def test_recovers_on_the_next_node(self) -> None:
        """A subscriber whose node stops while a peer publishes moves to the peer (its next URL) and recovers
        every event there, in order and once."""
        a = await self.start_mesh_node(self.settings(0), channels=CHANNELS)
        b = await self.start_mesh_node(self.settings(1, [a.address]), channels=CHANNELS)
        await self.wait_for(lambda: a.links() == 1 and b.links() == 1, "the mesh")
        sub = ReconnectingClient([a.url, b.url], reactor=reactor, retry_policy=FAST)
        received: list = []
        recoveries: list = []
        sub.add_listener(received.append)
        sub.add_recovery_listener(recoveries.append)
        sub.startService()
        self.addCleanup(lambda: sub.close().addTimeout(10, reactor))
        await sub.when_connected().addTimeout(5, reactor)
        await sub.subscribe("chat.room")
        await self.interest_settled([a, b], "chat.room", [a])
        publisher = await self.client_of(b)
        await publisher.publish("chat.room", b"first")
        await self.wait_for(lambda: len(received) == 1, "the first event")
        stopping = a.app.stopService()
        for i in range(200):
            publisher.publish("chat.room", b"%d" % i, ack=False)
            if i % 50 == 0:
                await publisher.ping()
        await publisher.ping()
        await stopping
        await self.wait_for(lambda: sub.url == b.url and sub.state == "connected", "the move to b")
        await publisher.publish("chat.room", b"live")
        await self.wait_for(lambda: len(received) >= 202, "every event")
        await self.settle(publisher)
        self.assertEqual([e.payload for e in received], [b"first"] + [b"%d" % i for i in range(200)] + [b"live"])
        self.assertEqual([r.recovered for r in recoveries], [True])


# -- node processes ---------------------------------------------------------------------------------


def node_process(tmp_path: Path) -> NodeProcess:
    config = tmp_path / "meshd.toml"
    config.write_text(CONFIG)
    process = NodeProcess("--config", str(config), cwd=tmp_path)
    try:
        process.wait_listening()
    except BaseException:
        process.stop()
        raise
    return process


@pytest.mark.slow
def test_asyncio_recovers_a_thousand_events(tmp_path) -> None:
    """The asyncio client, cut (its TCP connection dropped) while 1,000 events are published on a node process,
    gets them all in order and once, then live ones."""
    node = node_process(tmp_path)

    async def main() -> None:
        recoveries: list[Recovery] = []
        async with aio_connect(node.url, retry_policy=lambda attempt: 0.05) as sub, aio_connect(node.url) as pub:
            sub.add_recovery_listener(recoveries.append)
            received: list = []
            sub.add_listener(received.append)
            stream = sub.events()
            await sub.subscribe("chat.room")
            for i in range(300):
                await pub.publish("chat.room", b"%d" % i, ack=False)
            await pub.ping()
            deadline = time.monotonic() + 10
            while len(received) < 100 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            first = sub.session_id
            sub._ws.transport.abort()  # the cut: no close frame (1006)
            for i in range(300, 1000):
                await pub.publish("chat.room", b"%d" % i, ack=False)
                if i % 100 == 0:
                    await pub.ping()
            await pub.ping()
            while (len(received) < 1000 or sub.state != "connected") and time.monotonic() < deadline + 20:
                await asyncio.sleep(0.01)
            assert sub.session_id != first
            await pub.publish("chat.room", b"live")
            got = [(await asyncio.wait_for(stream.__anext__(), 10)).payload for _ in range(1001)]
            assert got == [b"%d" % i for i in range(1000)] + [b"live"]
            await sub.ping()
            assert len(received) == 1001
            [recovery] = recoveries
            assert recovery.recovered and 0 < recovery.events <= 900, recovery
            latest = await sub.history("chat.room", limit=2)
            assert [e.payload for e in latest.events] == [b"999", b"live"]
            assert latest.positions == sub.positions("chat.room")
    try:
        asyncio.run(asyncio.wait_for(main(), 40))
    finally:
        node.stop()


@pytest.mark.slow
def test_meshctl_sub_recover(tmp_path) -> None:
    """meshctl sub --recover behind a proxy that is cut: it prints the events published during the cut, in
    order, says how many it recovered, and goes on with live ones."""
    from .proxy import Proxy

    node = node_process(tmp_path)
    proxy = Proxy(node.port)
    sub = Meshctl("sub", "chat.room", "--recover", "--count", "12", "--url", f"ws://127.0.0.1:{proxy.port}")
    try:
        sub.wait_status("subscribed to chat.room")
        publish(node.url, "chat.room", "before")
        proxy.cut()
        sub.wait_status("disconnected")
        for i in range(10):
            publish(node.url, "chat.room", f"missed {i}")
        proxy.restore()
        assert sub.wait_status("recovered") == "meshctl: recovered 10 events on chat.room\n"
        sub.wait_status("reconnected to")
        publish(node.url, "chat.room", "live")
        code, events = sub.finish()
        assert (code, [e["data"] for e in events]) == (0, ["before"] + [f"missed {i}" for i in range(10)] + ["live"])
    finally:
        sub.kill()
        proxy.close()
        node.stop()


@pytest.mark.slow
def test_docs_history_example_runs(tmp_path) -> None:
    """The example of docs/clients.md "Python: history and recovery" runs against a node with history."""
    from .test_aio import doc_examples, run_example

    [example] = doc_examples("## Python: history and recovery")
    node = node_process(tmp_path)
    try:
        assert run_example(example, node.url) == "[b'two', b'three']\nTrue\n"
    finally:
        node.stop()
