"""The event scopes of one node, through real WebSocket clients on a loopback port."""

from __future__ import annotations

from uuid import uuid4

from meshd import events as events_module
from meshd.codec import EventType, Opcode, Watchable
from meshd.events import Event

from .support import NodeTestCase, payloads


class BroadcastEventTests(NodeTestCase):
    async def test_reaches_every_welcomed_session(self) -> None:
        """broadcast_event reaches every session that said Hello, subscribed or not."""
        await self.start_node()
        a, b, c = await self.client(), await self.client(), await self.client()
        await a.subscribe("x")
        n = self.app.state.broadcast_event(EventType.NodeEvent, None, None, b"hi")
        await self.settle(a, b, c)
        self.assertEqual(n, 3)
        for client in (a, b, c):
            self.assertEqual(payloads(client.received), [b"hi"])
            event = client.received[0]
            self.assertEqual(event.opcode, Opcode.Event)
            self.assertEqual(event.event_type, EventType.NodeEvent)
            self.assertEqual(event.node, self.app.node_id)
            self.assertIsNone(event.channel)

    async def test_exclude_id_skips_one_session(self) -> None:
        """exclude_id names the one session that does not receive the broadcast."""
        await self.start_node()
        a, b = await self.client(), await self.client()
        origin = uuid4()
        n = self.app.state.broadcast_event(
            EventType.ClientEvent, Watchable("user", "7"), origin, b"left", exclude_id=a.session_id
        )
        await self.settle(a, b)
        self.assertEqual(n, 1)
        self.assertEqual(a.received, [])
        self.assertEqual(payloads(b.received), [b"left"])
        self.assertEqual(b.received[0].session, origin)
        self.assertEqual(b.received[0].watchable, Watchable("user", "7"))

    async def test_not_before_hello(self) -> None:
        """A connection that has not said Hello gets no broadcast."""
        await self.start_node()
        quiet = await self.client(hello=False)
        welcomed = await self.client()
        n = self.app.state.broadcast_event(EventType.NodeEvent, None, None, b"x")
        await self.settle(quiet, welcomed)
        self.assertEqual(n, 1)
        self.assertEqual(quiet.received, [])


class NotifyEventTests(NodeTestCase):
    async def test_only_watchers(self) -> None:
        """notify_event reaches the watchers of that watchable and nobody else."""
        await self.start_node()
        w1, w2, other, idle = [await self.client() for _ in range(4)]
        await w1.watch("document", "42")
        await w2.watch("document", "42")
        await other.watch("document", "43")
        n = self.app.state.notify_event(EventType.ResourceEvent, ("document", "42"), None, b"v2")
        await self.settle(w1, w2, other, idle)
        self.assertEqual(n, 2)
        self.assertEqual(payloads(w1.received), [b"v2"])
        self.assertEqual(payloads(w2.received), [b"v2"])
        self.assertEqual(other.received, [])
        self.assertEqual(idle.received, [])
        self.assertEqual(w1.received[0].watchable, Watchable("document", "42"))
        self.assertEqual(w1.received[0].event_type, EventType.ResourceEvent)

    async def test_exclude_and_unwatch(self) -> None:
        """exclude_id skips one watcher; an unwatched session stops receiving."""
        await self.start_node()
        w1, w2, w3 = [await self.client() for _ in range(3)]
        for w in (w1, w2, w3):
            await w.watch("doc", "1")
        await w3.unwatch("doc", "1")
        self.app.state.notify_event(
            EventType.CacheEvent, Watchable("doc", "1"), w1.session_id, b"c", exclude_id=w1.session_id
        )
        await self.settle(w1, w2, w3)
        self.assertEqual((w1.received, payloads(w2.received), w3.received), ([], [b"c"], []))
        self.assertEqual(w2.received[0].session, w1.session_id)


class ChannelTests(NodeTestCase):
    async def test_broadcast_to_channel(self) -> None:
        """broadcast_to_channel reaches the channel's subscribers, stamped with origin node and instance."""
        await self.start_node()
        s1, s2, other = [await self.client() for _ in range(3)]
        await s1.subscribe("chat")
        await s2.subscribe("chat")
        await other.subscribe("news")
        instance = uuid4()
        clients = self.app.state.of_clients()
        self.assertIs(clients, self.app.state.clients)
        n = clients.broadcast_to_channel(None, "chat", b"m1", instance=instance)
        n += clients.broadcast_to_channel(self.app.node_id, "chat", b"m2", exclude=s2.session_id)
        n += clients.broadcast_to_channel(None, "chat", b"m3", local_only=True)
        await self.settle(s1, s2, other)
        self.assertEqual(n, 5)
        self.assertEqual(payloads(s1.received), [b"m1", b"m2", b"m3"])
        self.assertEqual(payloads(s2.received), [b"m1", b"m3"])
        self.assertEqual(other.received, [])
        first = s1.received[0]
        self.assertEqual(
            (first.event_type, first.channel, first.session, first.node),
            (EventType.ChannelEvent, "chat", instance, self.app.node_id),
        )

    async def test_prebuilt_event(self) -> None:
        """A ready Event is sent as it is, with its own type."""
        await self.start_node()
        s = await self.client()
        await s.subscribe("c")
        event = self.app.state.event(EventType.CacheEvent, channel="c", payload=b"k=v")
        self.app.state.clients.broadcast_to_channel(None, "c", event)
        await self.settle(s)
        self.assertEqual([(e.event_type, e.payload) for e in s.received], [(EventType.CacheEvent, b"k=v")])

    async def test_publish_reaches_subscribers_in_order(self) -> None:
        """A client's Publish reaches every subscriber once, in publish order, the publisher too."""
        await self.start_node()
        pub, s1, s2, bystander = [await self.client() for _ in range(4)]
        for c in (pub, s1, s2):
            await c.subscribe("room")
        await bystander.subscribe("elsewhere")
        for i in range(50):
            pub.publish("room", b"%d" % i, ack=False)
        await pub.publish("room", b"last")
        await self.settle(s1, s2, bystander)
        expected = [b"%d" % i for i in range(50)] + [b"last"]
        for c in (pub, s1, s2):
            self.assertEqual(payloads(c.received), expected)
        self.assertEqual(bystander.received, [])
        self.assertEqual({e.session for e in s1.received}, {pub.session_id})

    async def test_exclude_self(self) -> None:
        """Publish with exclude_self does not come back to the publisher."""
        await self.start_node()
        pub, sub = await self.client(), await self.client()
        await pub.subscribe("room")
        await sub.subscribe("room")
        await pub.publish("room", b"x", exclude_self=True)
        await self.settle(pub, sub)
        self.assertEqual((pub.received, payloads(sub.received)), ([], [b"x"]))

    async def test_unsubscribe(self) -> None:
        """After Unsubscribe a session gets nothing more from the channel."""
        await self.start_node()
        pub, sub = await self.client(), await self.client()
        await sub.subscribe("room")
        await pub.publish("room", b"1")
        await sub.unsubscribe("room")
        await pub.publish("room", b"2")
        await self.settle(sub)
        self.assertEqual(payloads(sub.received), [b"1"])


class DistributeEventTests(NodeTestCase):
    async def test_local_targets(self) -> None:
        """distribute_event reaches channel subscribers and watchers, each once; no target means everyone."""
        await self.start_node()
        sub, watcher, both, idle = [await self.client() for _ in range(4)]
        await sub.subscribe("ch")
        await watcher.watch("k", "1")
        await both.subscribe("ch")
        await both.watch("k", "1")
        state = self.app.state
        self.assertEqual(state.distribute_event(state.event(EventType.ChannelEvent, channel="ch", payload=b"c")), 2)
        self.assertEqual(state.distribute_event(state.event(EventType.ResourceEvent, watchable=("k", "1"), payload=b"w")), 2)
        self.assertEqual(
            state.distribute_event(state.event(EventType.CacheEvent, channel="ch", watchable=("k", "1"), payload=b"cw")), 3
        )
        self.assertEqual(state.distribute_event(state.event(EventType.NodeEvent, payload=b"all")), 4)
        await self.settle(sub, watcher, both, idle)
        self.assertEqual(payloads(sub.received), [b"c", b"cw", b"all"])
        self.assertEqual(payloads(watcher.received), [b"w", b"cw", b"all"])
        self.assertEqual(payloads(both.received), [b"c", b"w", b"cw", b"all"])
        self.assertEqual(payloads(idle.received), [b"all"])

    async def test_exclude_id_names_a_node(self) -> None:
        """exclude_id is a node id: this node's own id skips local delivery, another's does not."""
        await self.start_node()
        sub = await self.client()
        await sub.subscribe("ch")
        state = self.app.state
        event = state.event(EventType.ChannelEvent, channel="ch", payload=b"x")
        self.assertEqual(state.distribute_event(event, exclude_id=self.app.node_id), 0)
        self.assertEqual(state.distribute_event(event, exclude_id=uuid4()), 1)
        await self.settle(sub)
        self.assertEqual(payloads(sub.received), [b"x"])


class EncodeOnceTests(NodeTestCase):
    async def test_one_encoding_for_all_recipients(self) -> None:
        """An event is encoded and framed once however many sessions receive it."""
        await self.start_node()
        clients = [await self.client() for _ in range(5)]
        for c in clients:
            await c.subscribe("fan")
        calls = {"encode": 0, "frame": 0}
        real_encode, real_frame = events_module.encode_event, events_module.frame_binary

        def counting_encode(*args, **kwargs):
            calls["encode"] += 1
            return real_encode(*args, **kwargs)

        def counting_frame(frame):
            calls["frame"] += 1
            return real_frame(frame)

        self.patch(events_module, "encode_event", counting_encode)
        self.patch(events_module, "frame_binary", counting_frame)
        sent = self.app.state.clients.broadcast_to_channel(None, "fan", b"once")
        await self.settle(*clients)
        self.assertEqual((sent, calls), (5, {"encode": 1, "frame": 1}))
        for c in clients:
            self.assertEqual(payloads(c.received), [b"once"])

    async def test_no_framing_without_local_recipients(self) -> None:
        """An event nobody here receives (a forwarding node's) is encoded, but never framed for WebSocket."""
        await self.start_node()
        framed = []
        real_frame = events_module.frame_binary
        self.patch(events_module, "frame_binary", lambda frame: framed.append(frame) or real_frame(frame))
        before = self.app.metrics.deliveries
        self.assertEqual(self.app.state.clients.broadcast_to_channel(None, "nobody", b"x"), 0)
        self.assertEqual((framed, self.app.metrics.deliveries), ([], before))

    def test_event_frame_is_decodable(self) -> None:
        """An Event's frame is a valid client Frame carrying what it was built with."""
        from meshd.codec import decode

        node, session = uuid4(), uuid4()
        e = Event(EventType.ChannelEvent, channel="c", payload=b"p", session_id=session, node_id=node)
        m = decode(e.frame)
        self.assertEqual(
            (m.opcode, m.event_type, m.channel, m.payload, m.session, m.node),
            (Opcode.Event, EventType.ChannelEvent, "c", b"p", session, node),
        )
        self.assertEqual(e.wire, b"\x82" + bytes([len(e.frame)]) + e.frame)  # one unmasked binary frame
