"""History channels: positions on events, the History opcode, and recovery on Subscribe."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from twisted.internet.task import Clock
from twisted.trial import unittest

from meshd.channels import ChannelOptions, ChannelTable
from meshd.client import MeshError
from meshd.codec import ErrorCode, Opcode, Position, unpack_batch
from meshd.config import Config
from meshd.history import History
from meshd.permissions import Rule

from .meshsupport import MeshTestCase
from .support import NodeTestCase

CHANNELS = (ChannelOptions("chat.*", history_size=100, history_ttl=60.0, recover=True),
            ChannelOptions("log.*", history_size=5),
            ChannelOptions("room.*", history_size=2000, recover=True),
            ChannelOptions("small.*", history_size=3, recover=True))
ME, PEER = UUID(int=1), UUID(int=2)


def events_of(client) -> list:
    """The events a test client received, Batch frames unpacked."""
    return [e for m in client.received for e in (unpack_batch(m) if m.opcode == Opcode.Batch else [m])]


class HistoryStoreTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.history = History(ChannelTable(CHANNELS), self.clock, ME, epoch=7, subscribed=lambda channel: True)

    def record(self, origin: UUID, seq: int, channel: str = "chat.a", epoch: int = 7) -> None:
        self.history.record(channel, origin, epoch, seq, b"frame %d" % seq)

    def test_only_history_channels(self) -> None:
        self.assertIsNone(self.history.options("other"))
        self.record(ME, 1, channel="other")
        self.assertEqual(self.history.channels, {})
        self.assertEqual(self.history.options("chat.x").history_size, 100)

    def test_own_events_are_covered_from_the_start(self) -> None:
        for seq in (3, 5, 9):
            self.record(ME, seq)
        entries, complete, cut = self.history.read("chat.a", positions=[Position(ME, 7, 3)])
        self.assertEqual(([e.seq for e in entries], complete), ([5, 9], True))
        self.assertEqual(cut, [Position(ME, 7, 9)])
        entries, complete, _ = self.history.read("chat.a", positions=[])
        self.assertEqual(([e.seq for e in entries], complete), ([3, 5, 9], True))

    def test_peer_events_need_its_start(self) -> None:
        """A peer's events are covered from its Start marker on; before it, or without it, nothing can be told."""
        self.record(PEER, 4)
        self.assertEqual(self.history.read("chat.a", positions=[Position(PEER, 1, 2)])[1], False)
        self.history.begin("chat.a", PEER, 1, 10)
        for seq in (11, 15):
            self.record(PEER, seq, epoch=1)
        entries, complete, cut = self.history.read("chat.a", positions=[Position(PEER, 1, 10)])
        self.assertEqual(([e.seq for e in entries], complete), ([11, 15], True))
        self.assertIn(Position(PEER, 1, 15), cut)
        self.assertEqual(self.history.read("chat.a", positions=[Position(PEER, 1, 9)])[1], False)
        self.history.end("chat.a")  # no more subscribers here: the peer stops sending
        self.assertEqual(self.history.read("chat.a", positions=[Position(PEER, 1, 15)])[1], False)
        self.assertEqual(self.history.read("chat.a", positions=[])[1], True)  # this node's own: still all

    def test_absent_origin_sends_all_held(self) -> None:
        """An origin the client has no position of is one it saw nothing of: all that is held of it comes."""
        self.history.begin("chat.a", PEER, 1, 10)
        self.record(PEER, 12, epoch=1)
        self.record(ME, 3)
        entries, complete, _ = self.history.read("chat.a", positions=[Position(ME, 7, 3)])
        self.assertEqual(([(e.origin, e.seq) for e in entries], complete), ([(PEER, 12)], True))

    def test_bounds_move_the_coverage(self) -> None:
        """Past the count, the bytes or the age, the oldest go, and positions before them are not recovered."""
        for seq in range(1, 8):
            self.record(ME, seq, channel="log.a")
        entries, _, _ = self.history.read("log.a")
        self.assertEqual([e.seq for e in entries], [3, 4, 5, 6, 7])
        self.assertEqual(self.history.read("log.a", positions=[Position(ME, 7, 1)])[1], False)
        self.assertEqual([e.seq for e in self.history.read("log.a", positions=[Position(ME, 7, 2)])[0]],
                         [3, 4, 5, 6, 7])
        self.clock.advance(301)  # history_ttl defaults to 300 s
        self.assertEqual(self.history.read("log.a")[0], [])
        self.assertEqual(self.history.read("log.a", positions=[Position(ME, 7, 7)])[1], True)
        self.assertEqual(self.history.read("log.a", positions=[Position(ME, 7, 6)])[1], False)

    def test_sweep_forgets_empty_channels(self) -> None:
        """A channel with nothing kept and no subscriber here is forgotten; coming back, this node vouches
        for its own events from then on only."""
        self.history = History(ChannelTable(CHANNELS), self.clock, ME, 7,
                               subscribed=lambda channel: channel == "chat.kept")
        self.record(ME, 41, channel="chat.gone")
        self.record(ME, 42, channel="chat.kept")
        self.clock.advance(61)  # chat.* keeps events 60 s
        self.history.sweep()
        self.assertEqual(sorted(self.history.channels), ["chat.kept"])
        self.assertEqual(self.history.floor, 41)
        self.assertEqual(self.history.covering("chat.gone", [Position(ME, 7, 40), Position(ME, 7, 41)]),
                         ([], [Position(ME, 7, 41)]))
        self.assertEqual(self.history.read("chat.gone", positions=[Position(ME, 7, 40)])[1], False)
        self.assertEqual(self.history.read("chat.gone", positions=[Position(ME, 7, 41)])[1], True)

    def test_node_wide_bytes(self) -> None:
        """Past limits.history_bytes, all channels together, the oldest events go, whichever channel they are
        in, and the coverage moves past them; the totals follow what is kept."""
        self.history = History(ChannelTable(CHANNELS), self.clock, ME, 7, max_bytes=40)
        for seq in range(1, 9):  # frames of 7 bytes, alternating between two channels
            self.record(ME, seq, channel="chat.a" if seq % 2 else "chat.b")
            self.clock.advance(1)
        kept = {c: [e.seq for e in h.entries] for c, h in self.history.channels.items()}
        self.assertEqual(kept, {"chat.a": [5, 7], "chat.b": [4, 6, 8]})  # the newest 5 of 7 bytes each
        self.assertEqual((self.history.size, self.history.count), (35, 5))
        self.assertEqual(self.history.read("chat.a", positions=[Position(ME, 7, 2)])[1], False)
        self.assertEqual(self.history.read("chat.a", positions=[Position(ME, 7, 3)])[1], True)

    def test_limit_keeps_the_latest(self) -> None:
        for seq in range(1, 11):
            self.record(ME, seq)
        entries, complete, _ = self.history.read("chat.a", limit=3)
        self.assertEqual([e.seq for e in entries], [8, 9, 10])
        entries, complete, _ = self.history.read("chat.a", limit=3, positions=[Position(ME, 7, 2)])
        self.assertEqual(([e.seq for e in entries], complete), ([8, 9, 10], False))


def history_config() -> Config:
    everyone = Rule("*", anonymous=frozenset({"subscribe", "publish", "watch"}))
    return Config(source=Path("test.toml"), channels=CHANNELS, rules=(everyone,))


class NodeHistoryTests(NodeTestCase):
    async def test_events_carry_positions(self) -> None:
        """Events of a history channel carry this node as origin, its epoch and growing numbers; others none."""
        app = await self.start_node(history_config())
        sub, pub = await self.client(), await self.client()
        await sub.subscribe("chat.a")
        await sub.subscribe("plain")
        for channel in ("chat.a", "plain", "chat.a"):
            await pub.publish(channel, b"x")
        await self.settle(sub)
        events = events_of(sub)
        history = [(e.node, e.epoch) for e in events if e.channel == "chat.a"]
        self.assertEqual(history, [(app.node_id, app.incarnation)] * 2)
        seqs = [e.seq for e in events if e.channel == "chat.a"]
        self.assertTrue(0 < seqs[0] < seqs[1], seqs)
        self.assertEqual([(e.epoch, e.seq) for e in events if e.channel == "plain"], [(0, 0)])

    async def test_history_opcode(self) -> None:
        """History answers with the latest events (at most limit) and the channel's positions."""
        app = await self.start_node(history_config())
        client = await self.client()
        for i in range(6):
            await client.publish("chat.a", b"m%d" % i)
        answer = await client.request(Opcode.History, channel="chat.a", limit=4)
        self.assertEqual([e.payload for e in unpack_batch(answer._replace(opcode=Opcode.Batch))],
                         [b"m2", b"m3", b"m4", b"m5"])
        [position] = answer.positions
        self.assertEqual((position.node, position.epoch), (app.node_id, app.incarnation))
        since = await client.request(Opcode.History, channel="chat.a",
                                     positions=[position._replace(seq=position.seq - 2)])
        self.assertEqual([e.payload for e in unpack_batch(since._replace(opcode=Opcode.Batch))], [b"m4", b"m5"])
        self.assertTrue(since.recovered)
        with self.assertRaises(MeshError) as caught:
            await client.request(Opcode.History, channel="plain")
        self.assertEqual(caught.exception.code, ErrorCode.InvalidArgument)

    async def test_recover_what_is_held_already_or_twice(self) -> None:
        """A recovering Subscribe of a channel the session holds replays nothing; positions given twice
        for one origin count once, as the highest."""
        await self.start_node(history_config())
        client, publisher = await self.client(), await self.client()
        await client.request(Opcode.Subscribe, channel="chat.d")
        for i in range(3):
            await publisher.publish("chat.d", b"m%d" % i)
        await self.settle(client)
        first = events_of(client)[0]
        again = await client.request(Opcode.Subscribe, channel="chat.d", recover=True,
                                     positions=[Position(first.node, first.epoch, 0)])
        self.assertFalse(again.recovered)
        await self.settle(client)
        self.assertEqual(len(events_of(client)), 3)
        other = await self.client()
        doubled = [Position(first.node, first.epoch, first.seq), Position(first.node, first.epoch, 0)]
        answer = await other.request(Opcode.Subscribe, channel="chat.d", recover=True, positions=doubled)
        self.assertTrue(answer.recovered)
        await self.settle(other)
        self.assertEqual([e.payload for e in events_of(other)], [b"m1", b"m2"])

    async def test_recover_on_subscribe(self) -> None:
        """A Subscribe with recover and positions gets what it missed, in order and once, before its Ack;
        a position older than the history is not recovered and gets nothing."""
        await self.start_node(history_config())
        first = await self.client()
        ack = await first.request(Opcode.Subscribe, channel="chat.a")
        positions = ack.positions
        publisher = await self.client()
        await publisher.publish("chat.a", b"seen")
        await self.settle(first)
        [seen] = first.received
        positions = [p._replace(seq=seen.seq) if p.node == seen.node else p for p in positions] or [
            Position(seen.node, seen.epoch, seen.seq)]
        await first.close()
        for i in range(20):
            await publisher.publish("chat.a", b"missed %d" % i)
        again = await self.client()
        answer = await again.request(Opcode.Subscribe, channel="chat.a", recover=True, positions=positions)
        self.assertTrue(answer.recovered)
        await publisher.publish("chat.a", b"live")
        await self.settle(again)
        self.assertEqual([e.payload for e in events_of(again)], [b"missed %d" % i for i in range(20)] + [b"live"])
        stale = await self.client()
        old = [Position(seen.node, seen.epoch, 0)]
        for i in range(100):  # history_size 100: the first events go
            await publisher.publish("chat.a", b"more")
        answer = await stale.request(Opcode.Subscribe, channel="chat.a", recover=True, positions=old)
        self.assertFalse(answer.recovered)
        await self.settle(stale)
        self.assertEqual(stale.received, [])


class MeshHistoryTests(MeshTestCase):
    async def history_cluster(self, count: int):
        nodes = []
        for i in range(count):
            seeds = [nodes[-1].address] if nodes else []
            nodes.append(await self.start_mesh_node(self.settings(i, seeds), channels=CHANNELS))
        await self.wait_for(lambda: all(n.links() == count - 1 for n in nodes), "full mesh")
        return nodes

    async def test_recover_anywhere(self) -> None:
        """A subscriber away while a peer publishes recovers every event, in order and once: on its node
        (which kept the channel: another subscriber stayed), on the publisher's, and on the publisher's
        after its own node is gone."""
        a, b = await self.history_cluster(2)
        sub, stays = await self.client_of(a), await self.client_of(a)
        ack = await sub.request(Opcode.Subscribe, channel="chat.room")
        await stays.subscribe("chat.room")
        await self.interest_settled([a, b], "chat.room", [a])
        await self.wait_for(lambda: a.app.history.channels.get("chat.room") is not None and (
            b.app.node_id, b.app.incarnation) in a.app.history.channels["chat.room"].covered, "b's Start marker")
        publisher = await self.client_of(b)
        await publisher.publish("chat.room", b"first")
        await self.wait_for(lambda: len(sub.received) == 1, "the first event")
        [first] = sub.received
        positions = [Position(first.node, first.epoch, first.seq)] + [
            p for p in ack.positions if p.node != first.node]
        await sub.close()
        for i in range(50):
            await publisher.publish("chat.room", b"m%d" % i)
        expected = [b"m%d" % i for i in range(50)]
        await self.wait_for(lambda: len(a.app.history.channels["chat.room"].entries) == 51, "a holds them")
        for label, node in (("a", a), ("b", b)):
            again = await self.client_of(node)
            answer = await again.request(Opcode.Subscribe, channel="chat.room", recover=True, positions=positions)
            self.assertTrue(answer.recovered, label)
            live = b"live on " + label.encode()
            await publisher.publish("chat.room", live)
            await self.wait_for(lambda: any(e.payload == live for e in events_of(again)), "the live event")
            expected.append(live)
            self.assertEqual([e.payload for e in events_of(again)], expected, label)
        await a.app.stopService()
        late = await self.client_of(b)
        answer = await late.request(Opcode.Subscribe, channel="chat.room", recover=True, positions=positions)
        self.assertTrue(answer.recovered)
        await self.settle(late)
        self.assertEqual([e.payload for e in events_of(late)], expected)

    async def test_recover_over_the_mesh(self) -> None:
        """A subscriber away while 1,000 events are published recovers them, in order and once, from a node
        that did not follow the channel, which gets them from their origin over the mesh:
        on the node the client left (which lost interest with it), on a third node, and after the
        node it left is killed; live events follow, none twice."""
        a, b, c = await self.history_cluster(3)
        sub = await self.client_of(a)
        ack = await sub.request(Opcode.Subscribe, channel="room.x")
        await self.interest_settled([a, b, c], "room.x", [a])
        await self.wait_for(lambda: a.app.history.channels.get("room.x") is not None and (
            b.app.node_id, b.app.incarnation) in a.app.history.channels["room.x"].covered, "b's Start marker")
        publisher = await self.client_of(b)
        await publisher.publish("room.x", b"first")
        await self.wait_for(lambda: len(sub.received) == 1, "the first event")
        [first] = sub.received
        positions = [Position(first.node, first.epoch, first.seq)] + [
            p for p in ack.positions if p.node != first.node]
        await sub.close()
        await self.interest_settled([a, b, c], "room.x", [])  # nobody follows the channel now
        expected = [b"m%d" % i for i in range(1000)]
        for data in expected:
            await publisher.publish("room.x", data)
        for label, node in (("a", a), ("c", c)):
            again = await self.client_of(node)
            answer = await again.request(Opcode.Subscribe, channel="room.x", recover=True, positions=positions)
            self.assertTrue(answer.recovered, label)
            live = b"live on " + label.encode()
            await publisher.publish("room.x", live)
            await self.wait_for(lambda: any(e.payload == live for e in events_of(again)), "the live event")
            expected.append(live)
            self.assertEqual([e.payload for e in events_of(again)], expected, label)
        await a.app.stopService()
        for node in (c, b):
            late = await self.client_of(node)
            answer = await late.request(Opcode.Subscribe, channel="room.x", recover=True, positions=positions)
            self.assertTrue(answer.recovered)
            await self.settle(late)
            self.assertEqual([e.payload for e in events_of(late)], expected)

    async def test_not_recovered_when_nobody_vouches(self) -> None:
        """Positions older than what their origin still keeps are not recovered: nothing is replayed, the
        Ack says so, and the session is subscribed all the same."""
        a, b = await self.history_cluster(2)
        publisher = await self.client_of(b)
        for i in range(5):  # small.* keeps 3
            await publisher.publish("small.x", b"old %d" % i)
        first = Position(b.app.node_id, b.app.incarnation, 1)
        client = await self.client_of(a)
        answer = await client.request(Opcode.Subscribe, channel="small.x", recover=True, positions=[first])
        self.assertFalse(answer.recovered)
        await self.interest_settled([a, b], "small.x", [a])
        await publisher.publish("small.x", b"after")
        await self.wait_for(lambda: len(events_of(client)) == 1, "the live event")
        self.assertEqual([e.payload for e in events_of(client)], [b"after"])
        self.assertEqual(a.app.registry.pins, {})

    async def test_the_subscription_node_publishes_later(self) -> None:
        """A node absent from the positions (it had published nothing on the channel) is asked for all its
        events there: its later ones are recovered elsewhere, from it."""
        a, b, c = await self.history_cluster(3)
        sub = await self.client_of(a)
        ack = await sub.request(Opcode.Subscribe, channel="room.y")
        self.assertNotIn(a.app.node_id, {p.node for p in ack.positions})  # it has published nothing there
        await sub.close()
        publisher = await self.client_of(a)
        for i in range(5):
            await publisher.publish("room.y", b"from a %d" % i)
        again = await self.client_of(c)
        answer = await again.request(Opcode.Subscribe, channel="room.y", recover=True, positions=ack.positions)
        self.assertTrue(answer.recovered)
        await self.settle(again)
        self.assertEqual([e.payload for e in events_of(again)], [b"from a %d" % i for i in range(5)])

    async def test_unsubscribe_cancels_a_recovery(self) -> None:
        """An Unsubscribe sent while a recovering Subscribe waits for the peers leaves the session
        unsubscribed: the Subscribe is answered not recovered, and nothing is replayed."""
        a, b = await self.history_cluster(2)
        publisher = await self.client_of(b)
        await publisher.publish("room.c", b"before")
        client = await self.client_of(a)
        position = Position(b.app.node_id, b.app.incarnation, 0)  # a does not follow room.c: it asks b
        subscribing = client.request(Opcode.Subscribe, channel="room.c", recover=True, positions=[position])
        unsubscribing = client.request(Opcode.Unsubscribe, channel="room.c")
        answer, _ = await subscribing, await unsubscribing
        self.assertFalse(answer.recovered)
        await self.settle(client)
        self.assertEqual(events_of(client), [])
        self.assertNotIn("room.c", a.app.registry.channels)
        self.assertEqual((a.app.registry.pins, a.app.history.recovering), ({}, {}))

    async def test_markers_need_the_feature(self) -> None:
        """A node older than history (no "history" feature) is sent no Start marker."""
        a, b = await self.history_cluster(2)
        peer = a.mesh.peers[b.app.node_id]
        self.assertIn("history", peer.features)
        peer.features = frozenset({"query"})  # as an older node says
        sub = await self.client_of(b)
        await sub.subscribe("chat.x")
        await self.interest_settled([a, b], "chat.x", [b])
        await self.settle(await self.client_of(a), sub)  # what a sent b has arrived
        held = b.app.history.channels.get("chat.x")
        self.assertTrue(held is None or (a.app.node_id, a.app.incarnation) not in held.covered)


class DocumentedChannelsTests(unittest.SynchronousTestCase):
    def test_examples_parse(self) -> None:
        """The [[channels]] examples of README.md and docs/configuration.md are valid configurations."""
        import re

        from meshd.config import parse, tomllib

        from .support import ROOT

        for doc in ("README.md", "docs/configuration.md"):
            blocks = [b for b in re.findall(r"```toml\n(.*?)```", (ROOT / doc).read_text(), re.S) if "[[channels]]" in b]
            self.assertEqual(len(blocks), 1, doc)
            config = parse(tomllib.loads(blocks[0]), Path("meshd.toml"))
            [options] = config.channels
            self.assertTrue(options.recover and options.presence and options.join_leave, doc)
