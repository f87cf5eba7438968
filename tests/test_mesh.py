"""The mesh, with in-process nodes linked over real mutual TLS on loopback."""

from __future__ import annotations


from meshd.codec import EventType, Watchable

from .meshsupport import MeshTestCase
from .support import payloads, sleep


class FormationTests(MeshTestCase):
    async def test_full_mesh_from_one_seed_each(self) -> None:
        """Three nodes, each seeded with only the previous one, end fully linked, one link per pair."""
        nodes = await self.cluster_of(3)
        # Duplicate links close as both ends learn of them: wait until no connection is open but the kept ones.
        await self.wait_for(lambda: all(len(n.mesh.links) == 2 and not n.mesh.dialers.keys() - {
            l.address for l in n.mesh.links if l.dialed} for n in nodes), "duplicate links to close")
        for n in nodes:
            self.assertEqual(n.links(), 2)
            self.assertEqual(len([l for l in n.mesh.links if not l.closing]), 2)
            self.assertEqual(set(n.mesh.peers), {o.app.node_id for o in nodes if o is not n})

    async def test_links_do_not_wait_for_nagle(self) -> None:
        """Both ends of a link send small frames at once (TCP_NODELAY on the socket)."""
        import socket

        a, b = await self.cluster_of(2)
        for node in (a, b):
            [link] = [l for l in node.mesh.links if not l.closing]
            tcp = link.transport.transport  # under the TLS layer
            self.assertEqual(tcp.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1, node.name)

    async def test_a_turns_frames_reach_the_kernel_in_that_turn(self) -> None:
        """A link's flush hands its frames through TLS to the socket at once, not at a later poll."""
        import socket

        from meshd.mesh.wire import encode_heartbeat

        a, b = await self.cluster_of(2)
        for sender, receiver in ((a, b), (b, a)):
            [link] = [l for l in sender.mesh.links if not l.closing]
            [other] = [l for l in receiver.mesh.links if not l.closing]
            peer_socket = other.transport.transport.getHandle()
            await sleep(0.1)  # the receiver has read whatever was in flight
            self.assertRaises(BlockingIOError, peer_socket.recv, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            link.send(encode_heartbeat(0))
            sender.app.turn.run()  # the end of the sender's turn; no poll in between
            self.assertTrue(peer_socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT), sender.name)

    async def test_a_large_flush_is_one_send(self) -> None:
        """A turn's frames that make several TLS records (16 KiB of data each) still leave in one send()."""
        from meshd.mesh.wire import encode_heartbeat

        a, b = await self.cluster_of(2)
        [link] = [l for l in a.mesh.links if not l.closing]
        tcp = link.transport.transport
        sends: list[int] = []
        tcp.socket = _CountingSocket(tcp.socket, sends)
        self.addCleanup(setattr, tcp, "socket", tcp.socket._socket)
        beat = encode_heartbeat(0)
        for _ in range(50_000 // len(beat)):
            link.send(beat)
        a.app.turn.run()
        self.assertEqual(len(sends), 1, sends)
        self.assertGreater(sends[0], 3 * 16384)

    async def test_simultaneous_dials_keep_one_link(self) -> None:
        """Two nodes that dial each other at once keep exactly one link, the same on both sides."""
        a = await self.start_mesh_node(self.settings(0))
        b = await self.start_mesh_node(self.settings(1))
        a.mesh.dial(b.address)  # in the same turn: both dials cross
        b.mesh.dial(a.address)
        await self.wait_for(lambda: a.links() == 1 and b.links() == 1, "link")
        # Until the end that keeps the other's link has stopped dialing, a second link could come.
        await self.wait_for(lambda: len(a.mesh.dialers) + len(b.mesh.dialers) <= 1, "one end to stop dialing")
        self.assertEqual([l for l in a.mesh.links if not l.closing].__len__(), 1)
        self.assertEqual([l for l in b.mesh.links if not l.closing].__len__(), 1)
        link_a = a.mesh.peers[b.app.node_id].link
        link_b = b.mesh.peers[a.app.node_id].link
        self.assertNotEqual(link_a.dialed, link_b.dialed, "the two ends of one link")
        lower = min(a.app.node_id, b.app.node_id, key=lambda u: u.int)
        dialer = a if link_a.dialed else b
        self.assertEqual(dialer.app.node_id, lower)


class _CountingSocket:
    """A socket that records the size of each send() before making it."""

    def __init__(self, socket, sends: list[int]) -> None:
        self._socket = socket
        self._sends = sends

    def send(self, data) -> int:
        self._sends.append(len(data))
        return self._socket.send(data)

    def __getattr__(self, name: str):
        return getattr(self._socket, name)


class RoutingTests(MeshTestCase):
    async def test_publish_reaches_every_node_once(self) -> None:
        """A publish on any node reaches the subscribers on every node once, in order."""
        nodes = await self.cluster_of(3)
        subs = [await self.client_of(n) for n in nodes]
        for s in subs:
            await s.subscribe("room")
        await self.interest_settled(nodes, "room", nodes)
        pubs = [await self.client_of(n) for n in nodes]
        for i, pub in enumerate(pubs):
            for j in range(20):
                await pub.publish("room", b"%d-%d" % (i, j))
        # Each node's events reach another over one link, in order: a duplicate would come before its "end".
        for pub in pubs:
            await pub.publish("room", b"end")
        await self.wait_for(lambda: all(payloads(s.received).count(b"end") == 3 for s in subs), "the ends")
        for s in subs:
            got = [p for p in payloads(s.received) if p != b"end"]
            self.assertEqual(len(got), 60)
            for i in range(3):
                self.assertEqual([p for p in got if p.startswith(b"%d-" % i)], [b"%d-%d" % (i, j) for j in range(20)])
        self.assertEqual(sum(n.app.metrics.mesh_duplicates for n in nodes), 0)

    async def test_a_routed_event_is_delivered_by_its_bytes(self) -> None:
        """The receiving node sends the event frame that crossed the link as it came, not re-encoded."""
        from meshd.codec import Opcode, encode, encode_event
        from meshd.events import received

        from .support import raw_client

        a, b = await self.cluster_of(2)
        client = await raw_client(self, b.url)
        raw: list[bytes] = []
        on_message = client.protocol.onMessage
        client.protocol.onMessage = lambda payload, is_binary: (raw.append(payload), on_message(payload, is_binary))
        client.send(encode(Opcode.Hello, request_id=1, version=1))
        client.send(encode(Opcode.Subscribe, request_id=2, channel="c"))
        await client.wait_frames(2)
        await self.interest_settled([a, b], "c", [b])
        # Built by the generic FlatBuffers builder: a node that decoded and
        # re-encoded it would send encode_event's different layout.
        frame = encode(Opcode.Event, event_type=EventType.ChannelEvent, channel="c", payload=b"as built")
        self.assertNotEqual(frame, encode_event(EventType.ChannelEvent, channel="c", payload=b"as built"))
        a.app.state.clients.broadcast_to_channel(None, "c", received(frame, "c", None))
        await client.wait_frames(3)
        self.assertEqual(raw[-1], frame)

    async def test_channel_messages_follow_interest(self) -> None:
        """Channel messages go only to nodes with subscribers, and stop when they leave."""
        a, b, c = await self.cluster_of(3)
        sub_b = await self.client_of(b)
        await sub_b.subscribe("news")
        await self.interest_settled([a, b, c], "news", [b])
        pub = await self.client_of(a)
        await pub.publish("news", b"1")
        await self.wait_for(lambda: len(sub_b.received) == 1, "delivery")
        self.assertEqual(a.app.metrics.mesh_routed_sent, 1, "only to b, not to c")
        self.assertEqual(c.app.metrics.mesh_routed_received, 0)
        await sub_b.close()
        await self.interest_settled([a, b, c], "news", [])
        await pub.publish("news", b"2")
        self.assertEqual(a.app.metrics.mesh_routed_sent, 1)

    async def test_local_only(self) -> None:
        """broadcast_to_channel with local_only=True stays on its node; False reaches all."""
        a, b = await self.cluster_of(2)
        sa, sb = await self.client_of(a), await self.client_of(b)
        for s in (sa, sb):
            await s.subscribe("c")
        await self.interest_settled([a, b], "c", [a, b])
        a.app.state.clients.broadcast_to_channel(None, "c", b"local", local_only=True)
        a.app.state.clients.broadcast_to_channel(None, "c", b"everywhere", local_only=False)
        await self.wait_for(lambda: len(sb.received) == 1, "delivery")
        await self.settle(sa, sb)
        self.assertEqual(payloads(sa.received), [b"local", b"everywhere"])
        self.assertEqual(payloads(sb.received), [b"everywhere"])
        self.assertEqual(sb.received[0].node, a.app.node_id, "origin node travels with the event")

    async def test_distribute_exclude(self) -> None:
        """distribute_event reaches every node but exclude_id."""
        a, b, c = await self.cluster_of(3)
        subs = {n.name: await self.client_of(n) for n in (a, b, c)}
        for s in subs.values():
            await s.subscribe("d")
        await self.interest_settled([a, b, c], "d", [a, b, c])
        state = a.app.state
        state.distribute_event(state.event(EventType.NodeEvent, channel="d", payload=b"not-b"), exclude_id=b.app.node_id)
        state.distribute_event(state.event(EventType.NodeEvent, payload=b"all"))
        state.distribute_event(state.event(EventType.NodeEvent, payload=b"not-a"), exclude_id=a.app.node_id)
        # Events from a reach each node in order: what is before this one has arrived, or never will.
        state.distribute_event(state.event(EventType.NodeEvent, payload=b"end"))
        await self.wait_for(lambda: all(b"end" in payloads(s.received) for s in subs.values()), "the end")
        self.assertEqual(payloads(subs["n0"].received), [b"not-b", b"all", b"end"])
        self.assertEqual(payloads(subs["n1"].received), [b"all", b"not-a", b"end"])
        self.assertEqual(payloads(subs["n2"].received), [b"not-b", b"all", b"not-a", b"end"])

    async def test_watchers_not_forwarded_by_default(self) -> None:
        """notify_event stays local unless forward_watchers is on."""
        a, b = await self.cluster_of(2)
        wa, wb = await self.client_of(a), await self.client_of(b)
        for w in (wa, wb):
            await w.watch("doc", "1")
        await wb.subscribe("after")
        await self.interest_settled([a, b], "after", [b])
        a.app.state.notify_event(EventType.ResourceEvent, ("doc", "1"), None, b"v1")
        # A forwarded notification would reach b over the link before this channel event does.
        a.app.state.clients.broadcast_to_channel(None, "after", b"after")
        await self.settle(wa)
        await self.wait_for(lambda: len(wb.received) > 0, "the channel event on b")
        self.assertEqual(payloads(wa.received), [b"v1"])
        self.assertEqual(payloads(wb.received), [b"after"])

    async def test_watchers_forwarded_when_configured(self) -> None:
        """With forward_watchers, notify_event reaches the watchers on every node, except exclude_id."""
        a, b = await self.cluster_of(2, forward_watchers=True)
        wa, wb, wb2 = await self.client_of(a), await self.client_of(b), await self.client_of(b)
        for w in (wa, wb, wb2):
            await w.watch("doc", "1")
        await wb2.subscribe("after")
        await self.interest_settled([a, b], "after", [b])
        a.app.state.notify_event(EventType.ResourceEvent, Watchable("doc", "1"), None, b"v1", exclude_id=wb2.session_id)
        # Had wb2 not been excluded, the notification would reach it before this channel event.
        a.app.state.clients.broadcast_to_channel(None, "after", b"after")
        await self.wait_for(lambda: len(wb.received) == 1 and len(wb2.received) == 1, "forwarded notification")
        self.assertEqual((payloads(wa.received), payloads(wb.received), payloads(wb2.received)),
                         ([b"v1"], [b"v1"], [b"after"]))


class OutageTests(MeshTestCase):
    async def test_cut_link_loses_and_duplicates_nothing(self) -> None:
        """Frames sent around a broken link arrive once and in order after it comes back."""
        a, b = await self.cluster_of(2)
        sub = await self.client_of(b)
        await sub.subscribe("c")
        await self.interest_settled([a, b], "c", [b])
        pub = await self.client_of(a)
        sent = 0
        for round_ in range(5):
            for _ in range(50):
                sent += 1
                pub.publish("c", b"%d" % sent, ack=False)
            await pub.ping()
            link = a.mesh.peers[b.app.node_id].link
            if link is not None:
                link.transport.abortConnection()  # cut in mid-stream
            for _ in range(50):
                sent += 1
                pub.publish("c", b"%d" % sent, ack=False)
            await pub.ping()
            await self.wait_for(lambda: a.links() == 1 and b.links() == 1, "relink")
        # A duplicate of an earlier frame would come before this one, on the same link.
        await pub.publish("c", b"end")
        await self.wait_for(lambda: b"end" in payloads(sub.received), f"{sent} deliveries and the end")
        self.assertEqual(payloads(sub.received), [b"%d" % i for i in range(1, sent + 1)] + [b"end"])
        self.assertEqual(a.app.metrics.mesh_queue_dropped, 0)

    async def test_past_the_bound_the_queue_is_dropped(self) -> None:
        """A queue past queue_max_bytes is dropped and counted; later frames flow again."""
        a, b = await self.cluster_of(2, queue_max_bytes=20_000)
        sub = await self.client_of(b)
        await sub.subscribe("c")
        await self.interest_settled([a, b], "c", [b])
        pub = await self.client_of(a)
        await b.app.mesh.stopService()  # b's links go away; a queues for b
        await self.wait_for(lambda: a.links() == 0, "link down")
        for i in range(100):
            await pub.publish("c", b"x" * 500)
        dropped = a.app.metrics.mesh_queue_dropped
        self.assertGreater(dropped, 0)
        self.assertLessEqual(a.mesh.peers[b.app.node_id].outbox.size, 20_000)
        await pub.publish("c", b"kept")
        b.app.mesh.startService()
        await self.wait_for(lambda: a.links() == 1, "link back")
        kept = 100 - dropped + 1
        await self.wait_for(lambda: len(sub.received) == kept, f"the {kept} frames kept")
        # Anything more from a would come before this.
        await pub.publish("c", b"end")
        await self.wait_for(lambda: b"end" in payloads(sub.received), "the end")
        self.assertEqual(len(sub.received), kept + 1)
        self.assertEqual(payloads(sub.received)[-2], b"kept")

    async def test_queue_expires(self) -> None:
        """Frames waiting longer than queue_max_seconds are dropped and counted."""
        a, b = await self.cluster_of(2, queue_max_seconds=0.5)
        sub = await self.client_of(b)
        await sub.subscribe("c")
        await self.interest_settled([a, b], "c", [b])
        await b.app.mesh.stopService()
        await self.wait_for(lambda: a.links() == 0, "link down")
        pub = await self.client_of(a)
        await pub.publish("c", b"stale")
        await self.wait_for(lambda: a.app.metrics.mesh_queue_dropped == 1, "expiry", timeout=5)
        b.app.mesh.startService()
        await self.wait_for(lambda: a.links() == 1, "link back")
        await pub.publish("c", b"fresh")
        await self.wait_for(lambda: payloads(sub.received) == [b"fresh"], "only the fresh frame")


class StoppingLogTests(MeshTestCase):
    async def test_a_stopping_node_warns_of_nothing(self) -> None:
        """Stopping a node closes its links without a warning on either side: it says why at info level,
        its peers log that it is shutting down."""
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import LogLevel, formatEvent, globalLogPublisher

        a, b = await self.cluster_of(2)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        await a.app.stopService()
        await self.wait_for(lambda: b.links() == 0, "b to see the link go")
        warnings = [formatEvent(e) for e in logged if e.get("log_level", LogLevel.info) >= LogLevel.warn]
        self.assertEqual(warnings, [])
        lines = [formatEvent(e) for e in logged]
        self.assertTrue(any("this node is stopping" in line for line in lines), lines)
        self.assertTrue(any("is shutting down" in line for line in lines), lines)
