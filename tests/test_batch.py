"""Batch frames: a channel's events of one reactor turn in one message, for clients that ask."""

from __future__ import annotations

from twisted.trial import unittest

from meshd.codec import EventType, Opcode, ProtocolError, Watchable, decode, encode, encode_batch, encode_event, unpack_batch

from .support import NodeTestCase, raw_client, sleep


class BatchDeliveryTests(NodeTestCase):
    async def subscriber(self, batch: bool, channel: str = "room"):
        raw = await raw_client(self, self.url)
        raw.send(encode(Opcode.Hello, request_id=1, version=1, batch=batch))
        raw.send(encode(Opcode.Subscribe, request_id=2, channel=channel))
        frames = await raw.wait_frames(2)
        self.assertEqual(frames[0].batch, batch, "Welcome says whether batches will come")
        return raw

    def events_of(self, raw) -> list:
        out = []
        for frame in raw.frames[2:]:
            out += unpack_batch(frame) if frame.opcode == Opcode.Batch else [frame]
        return out

    async def test_one_turn_one_batch(self) -> None:
        """Five events of a channel in one turn reach a batch client as one Batch, in order; others get five frames."""
        app = await self.start_node()
        batched, plain = await self.subscriber(True), await self.subscriber(False)
        for i in range(5):
            app.state.clients.broadcast_to_channel(None, "room", b"%d" % i)
        await batched.wait_frames(3)
        await plain.wait_frames(7)
        self.assertEqual([f.opcode for f in batched.frames[2:]], [Opcode.Batch])
        self.assertEqual([e.payload for e in self.events_of(batched)], [b"0", b"1", b"2", b"3", b"4"])
        self.assertEqual([f.opcode for f in plain.frames[2:]], [Opcode.Event] * 5)
        self.assertEqual([e.payload for e in self.events_of(plain)], [b"0", b"1", b"2", b"3", b"4"])

    async def test_lone_event_is_a_plain_frame(self) -> None:
        """A single event in a turn goes to a batch client as an ordinary Event frame."""
        app = await self.start_node()
        batched = await self.subscriber(True)
        app.state.clients.broadcast_to_channel(None, "room", b"alone")
        await batched.wait_frames(3)
        self.assertEqual((batched.frames[2].opcode, batched.frames[2].payload), (Opcode.Event, b"alone"))

    async def test_channels_together_and_exclusion(self) -> None:
        """A session's Batch holds the turn's events of all its channels in order; an excluded session's lacks that one."""
        app = await self.start_node()
        a, b = await self.subscriber(True), await self.subscriber(True)
        other = await self.subscriber(True, channel="other")
        session_a, session_b = [s for s in app.registry.sessions.values() if s.batch][:2]
        app.registry.subscribe(session_a, "other")
        clients = app.state.clients
        clients.broadcast_to_channel(None, "room", b"1")
        clients.broadcast_to_channel(None, "room", b"2", exclude=session_b.id)
        clients.broadcast_to_channel(None, "other", b"x")
        clients.broadcast_to_channel(None, "room", b"3")
        await a.wait_frames(3)
        await b.wait_frames(3)
        await other.wait_frames(3)
        self.assertEqual([f.opcode for f in a.frames[2:]], [Opcode.Batch])
        self.assertEqual([e.payload for e in self.events_of(a)], [b"1", b"2", b"x", b"3"])
        self.assertEqual([e.payload for e in self.events_of(other)], [b"x"])
        self.assertEqual([f.opcode for f in b.frames[2:]], [Opcode.Batch])
        self.assertEqual([e.payload for e in self.events_of(b)], [b"1", b"3"])

    async def test_same_order_as_plain_sessions_across_scopes(self) -> None:
        """A Batch session and a plain one get channel events, broadcasts, notifications and Acks of one turn in one order."""
        app = await self.start_node()
        watched = ("doc", "1")
        raws = []
        for batch in (True, False):
            raw = await self.subscriber(batch)
            raw.send(encode(Opcode.Watch, request_id=3, watchable=Watchable(*watched)))
            await raw.wait_frames(3)
            raws.append(raw)
        sessions = {s.batch: s for s in app.registry.sessions.values()}
        state = app.state
        marks = []

        def emit() -> None:
            # Everything in one reactor turn.
            state.clients.broadcast_to_channel(None, "room", b"c1")
            state.clients.broadcast_to_channel(None, "room", b"c2")
            state.broadcast_event(EventType.NodeEvent, None, None, b"b1")
            state.clients.broadcast_to_channel(None, "room", b"c3")
            state.notify_event(EventType.ResourceEvent, watched, None, b"n1")
            for session in sessions.values():
                session.send_frame(encode(Opcode.Ack, request_id=77))
            state.clients.broadcast_to_channel(None, "room", b"c4")
            state.clients.broadcast_to_channel(None, "room", b"c5")
            state.distribute_event(state.event(EventType.NodeEvent, payload=b"d1"))
            for session in sessions.values():
                session.send_frame(encode(Opcode.Ack, request_id=99))
            marks.append(True)

        app.clock.callLater(0, emit)
        expected = [b"c1", b"c2", b"b1", b"c3", b"n1", ("ack", 77), b"c4", b"c5", b"d1", ("ack", 99)]
        for raw in raws:
            while self.flattened(raw)[-1:] != [("ack", 99)]:
                await raw.wait_frames(len(raw.frames) + 1)
        batched, plain = (self.flattened(raw) for raw in raws)
        self.assertEqual(marks, [True])
        self.assertEqual(plain, expected)
        self.assertEqual(batched, expected)
        self.assertIn(Opcode.Batch, [f.opcode for f in raws[0].frames[3:]], "the batch session got batches")

    def flattened(self, raw) -> list:
        out = []
        for frame in raw.frames[3:]:
            for m in unpack_batch(frame) if frame.opcode == Opcode.Batch else [frame]:
                out.append(("ack", m.request_id) if m.opcode == Opcode.Ack else m.payload)
        return out

    async def test_client_library_unpacks(self) -> None:
        """meshd.client asks for batches and hands each event to listeners, in order."""
        await self.start_node()
        sub, pub = await self.client(), await self.client()
        await sub.subscribe("room")
        for i in range(20):
            pub.publish("room", b"%d" % i, ack=False)
        await pub.ping()
        await self.settle(sub)
        self.assertEqual([e.payload for e in sub.received], [b"%d" % i for i in range(20)])
        self.assertTrue(self.app.registry.sessions[sub.session_id].batch)


class BatchCodecTests(unittest.SynchronousTestCase):
    def test_round_trip_and_bad_entries(self) -> None:
        """unpack_batch returns the frames in order and refuses truncated or bad entries."""
        frames = [encode_event(EventType.ChannelEvent, channel="c", payload=b"%d" % i) for i in range(3)]
        batch = decode(encode_batch(frames))
        self.assertEqual([m.payload for m in unpack_batch(batch)], [b"0", b"1", b"2"])
        for payload in (b"\x05\x00\x00", b"\xff\x00\x00\x00abc", b"\x03\x00\x00\x00abc"):
            with self.assertRaises(ProtocolError):
                unpack_batch(decode(encode(Opcode.Batch, payload=payload)))

    def test_clients_may_not_send_batches(self) -> None:
        """Batch is a node-to-client opcode."""
        from meshd.handlers import SERVER_OPCODES

        self.assertIn(Opcode.Batch, SERVER_OPCODES)


class BatchEdgeTests(NodeTestCase):
    async def batch_subscriber(self, channel: str = "room"):
        raw = await raw_client(self, self.url)
        raw.send(encode(Opcode.Hello, request_id=1, version=1, batch=True))
        raw.send(encode(Opcode.Subscribe, request_id=2, channel=channel))
        await raw.wait_frames(2)
        return raw

    def events(self, raw) -> list:
        out = []
        for frame in raw.frames:
            if frame.opcode == Opcode.Batch:
                out += [e.payload for e in unpack_batch(frame)]
            elif frame.opcode == Opcode.Event:
                out.append(frame.payload)
        return out

    async def test_big_turns_are_split(self) -> None:
        """A turn's events larger than a batch's budget go in several Batch frames, all delivered."""
        app = await self.start_node()
        client = await self.client()
        await client.subscribe("big")
        for i in range(40):
            app.state.clients.broadcast_to_channel(None, "big", bytes([i]) * 60_000)
        for _ in range(200):
            if len(client.received) == 40:
                break
            await sleep(0.02)
        self.assertEqual([e.payload[0] for e in client.received], list(range(40)))

    async def test_membership_is_decided_when_the_event_is_sent(self) -> None:
        """A publish then an unsubscribe keeps the event; a publish then a subscribe does not get it."""
        await self.start_node()
        leaving = await self.batch_subscriber()
        joining = await raw_client(self, self.url)
        joining.send(encode(Opcode.Hello, request_id=1, version=1, batch=True))
        await joining.wait_frames(1)
        # Back to back on each connection: the node reads each pair in order.
        leaving.send(encode(Opcode.Publish, request_id=3, channel="room", payload=b"mine"))
        leaving.send(encode(Opcode.Unsubscribe, request_id=4, channel="room"))
        await leaving.wait_frames(5)
        joining.send(encode(Opcode.Publish, request_id=2, channel="room", payload=b"before joining"))
        joining.send(encode(Opcode.Subscribe, request_id=3, channel="room"))
        await joining.wait_frames(3)
        # A Ping on each connection: whatever the node sent them before its Pong has arrived with it.
        leaving.send(encode(Opcode.Ping, request_id=5))
        joining.send(encode(Opcode.Ping, request_id=4))
        self.assertEqual((await leaving.wait_frames(6))[-1].opcode, Opcode.Pong)
        self.assertEqual((await joining.wait_frames(4))[-1].opcode, Opcode.Pong)
        self.assertEqual(self.events(leaving), [b"mine"])
        self.assertEqual(self.events(joining), [])

    async def test_distribute_keeps_the_channel_order(self) -> None:
        """An event distributed on a channel comes after the channel's earlier, batched events."""
        app = await self.start_node()
        raw = await self.batch_subscriber()
        state = app.state
        state.clients.broadcast_to_channel(None, "room", b"1")
        state.clients.broadcast_to_channel(None, "room", b"2")
        state.distribute_event(state.event(EventType.NodeEvent, channel="room", payload=b"3"))
        state.clients.broadcast_to_channel(None, "room", b"4")
        for _ in range(100):
            if len(self.events(raw)) == 4:
                break
            await sleep(0.02)
        self.assertEqual(self.events(raw), [b"1", b"2", b"3", b"4"])
