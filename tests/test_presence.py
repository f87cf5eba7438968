"""Presence: who is subscribed, cluster-wide, and Join / Leave events."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from twisted.internet import reactor

from meshd.channels import ChannelOptions
from meshd.client import MeshError, connect
from meshd.codec import PROTOCOL_VERSION, ErrorCode, EventType, Opcode, unpack_batch
from meshd.config import Config, ConfigError, parse
from meshd.permissions import Rule

from .meshsupport import MeshTestCase
from .support import NodeTestCase, close_quietly

CHANNELS = (ChannelOptions("room.*", presence=True, join_leave=True), ChannelOptions("quiet.*", presence=True))
EVERYONE = (Rule("*", anonymous=frozenset({"subscribe", "publish", "watch"}),
                 authenticated=frozenset({"subscribe", "publish", "watch"})),)


def events_of(client) -> list:
    return [e for m in client.received for e in (unpack_batch(m) if m.opcode == Opcode.Batch else [m])]


def joins_and_leaves(client) -> list[tuple[str, object]]:
    names = {EventType.Join: "join", EventType.Leave: "leave"}
    return [(names[e.event_type], e.session) for e in events_of(client) if e.event_type in names]


async def hello(testcase, url: str, info: Optional[str] = None, token: Optional[str] = None):
    """A client that said Hello with ``info``; its events collect in ``received``."""
    client = await connect(url, reactor=reactor, hello=False)
    client.received = []
    client.add_listener(client.received.append)
    testcase.addCleanup(close_quietly, client)
    welcome = await client.request(Opcode.Hello, version=PROTOCOL_VERSION, token=token, info=info)
    client.session = welcome.session
    return client


class ConfigTests(NodeTestCase):
    def test_join_leave_needs_presence(self) -> None:
        with self.assertRaisesRegex(ConfigError, r"channels\[0\]\.join_leave: needs presence"):
            parse({"channels": [{"match": "x", "join_leave": True}]}, Path("meshd.toml"))


class NodePresenceTests(NodeTestCase):
    async def test_presence_and_stats(self) -> None:
        """Presence lists the subscribed sessions with principal and info; stats count them."""
        app = await self.start_node(Config(source=Path("t.toml"), channels=CHANNELS, rules=EVERYONE,
                                           tokens={"alice": "a-token"}))
        a = await hello(self, self.url, info="web 1.0", token="a-token")
        b = await hello(self, self.url)
        c = await hello(self, self.url, token="a-token")
        for client in (a, b, c):
            await client.subscribe("room.1")
        answer = await b.request(Opcode.Presence, channel="room.1")
        self.assertEqual({(e.session, e.principal, e.info, e.node) for e in answer.presence},
                         {(a.session, "alice", "web 1.0", app.node_id), (b.session, None, None, app.node_id),
                          (c.session, "alice", None, app.node_id)})
        stats = await b.request(Opcode.PresenceStats, channel="room.1")
        self.assertEqual((stats.sessions, stats.principals), (3, 1))
        with self.assertRaises(MeshError) as caught:
            await b.request(Opcode.Presence, channel="plain")
        self.assertEqual(caught.exception.code, ErrorCode.InvalidArgument)
        with self.assertRaises(MeshError) as caught:
            await hello(self, self.url, info="x" * 257)
        self.assertEqual(caught.exception.code, ErrorCode.InvalidArgument)

    async def test_join_and_leave_events(self) -> None:
        """Subscribers get Join and Leave of the others (not their own), on unsubscribe and disconnect;
        a presence channel without join_leave sends none."""
        await self.start_node(Config(source=Path("t.toml"), channels=CHANNELS, rules=EVERYONE))
        watcher = await hello(self, self.url)
        await watcher.subscribe("room.1")
        await watcher.subscribe("quiet.1")
        other = await hello(self, self.url, info="phone")
        await other.subscribe("room.1")
        await other.subscribe("quiet.1")
        await other.unsubscribe("room.1")
        await other.subscribe("room.1")
        await other.close()
        await self.settle(watcher)
        self.assertEqual(joins_and_leaves(watcher), [("join", other.session), ("leave", other.session),
                                                     ("join", other.session), ("leave", other.session)])
        join = next(e for e in events_of(watcher) if e.event_type == EventType.Join)
        self.assertEqual((join.channel, join.payload), ("room.1", b"phone"))
        self.assertEqual(joins_and_leaves(other), [])


class ClusterPresenceTests(MeshTestCase):
    async def node(self, index: int, seeds=(), node_id=None):
        return await self.start_mesh_node(self.settings(index, seeds, queue_max_seconds=1.0), node_id=node_id,
                                          channels=CHANNELS)

    async def test_three_nodes_agree(self) -> None:
        """Presence from any node and the Join/Leave events a subscriber sees agree, through joins, leaves,
        a node killed (its sessions leave once its link is given up) and a node restarted."""
        a = await self.node(0)
        b = await self.node(1, [a.address])
        c = await self.node(2, [b.address])
        await self.wait_for(lambda: all(n.links() == 2 for n in (a, b, c)), "full mesh")
        watcher = await hello(self, a.url)
        await watcher.subscribe("room.x")
        await self.interest_settled([a, b, c], "room.x", [a])
        on_b, on_c = await hello(self, b.url, info="b"), await hello(self, c.url, info="c")
        await on_b.subscribe("room.x")
        await on_c.subscribe("room.x")

        async def present(node) -> set:
            client = await hello(self, node.url)
            answer = await client.request(Opcode.Presence, channel="room.x")
            return {e.session for e in answer.presence}

        expected = {watcher.session, on_b.session, on_c.session}
        await self.wait_for(lambda: len(joins_and_leaves(watcher)) == 2, "two joins")
        for node in (a, b, c):
            self.assertEqual(await present(node), expected)
        self.assertEqual(sorted(joins_and_leaves(watcher)), sorted([("join", on_b.session), ("join", on_c.session)]))
        await on_b.unsubscribe("room.x")
        await self.wait_for(lambda: len(joins_and_leaves(watcher)) == 3, "b's leave")
        self.assertEqual(joins_and_leaves(watcher)[-1], ("leave", on_b.session))
        self.assertEqual(await present(a), {watcher.session, on_c.session})
        # c is killed: its sessions leave presence at once (it answers no more), and a's subscriber
        # gets their Leave once the link is given up (queue_max_seconds).
        c_id = c.app.node_id
        await c.app.stopService()
        self.assertEqual(await present(a), {watcher.session})
        await self.wait_for(lambda: len(joins_and_leaves(watcher)) == 4, "c's sessions leave", timeout=10)
        self.assertEqual(joins_and_leaves(watcher)[-1], ("leave", on_c.session))
        # c comes back (a new incarnation), and a new session there joins.
        c = await self.node(2, [a.address], node_id=c_id)
        await self.wait_for(lambda: c.links() == 2, "c linked again")
        again = await hello(self, c.url)
        await again.subscribe("room.x")
        await self.wait_for(lambda: len(joins_and_leaves(watcher)) == 5, "the new join")
        self.assertEqual(joins_and_leaves(watcher)[-1], ("join", again.session))
        for node in (a, b, c):
            self.assertEqual(await present(node), {watcher.session, again.session})
