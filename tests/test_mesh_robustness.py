"""The mesh under awkward timing, bad gossip, slow or vanished peers, and restarts."""

from __future__ import annotations

import uuid

from meshd.codec import EventType
from meshd.mesh.framing import Deframer, frame
from meshd.mesh.wire import (
    Goodbye, GoodbyeCode, LinkHello, Peer, RouteKind, Routed, decode, encode_hello, encode_interest,
    encode_peers, encode_routed,
)

from .meshsupport import MeshTestCase, Recorder
from .support import payloads, sleep


def frames(proto: Recorder) -> list:
    return [decode(f) for f in Deframer(1 << 20).feed(proto.received)]


class InterestTests(MeshTestCase):
    async def test_interest_during_the_handshake(self) -> None:
        """A subscription made after a node sent its LinkHello, before the link opened, still propagates."""
        a = await self.start_mesh_node(self.settings(0), name="a")
        b = await self.start_mesh_node(self.settings(1), name="b")
        sub = await self.client_of(b)
        session = b.app.registry.sessions[sub.session_id]
        original = b.mesh.hello

        def hello():
            try:
                return original()
            finally:
                b.mesh.hello = original
                b.app.registry.subscribe(session, "late")  # right after the hello is built and sent

        b.mesh.hello = hello
        b.mesh.dial(a.address)
        await self.interest_settled([a, b], "late", [b])
        pub = await self.client_of(a)
        await pub.publish("late", b"hello")
        await self.wait_for(lambda: payloads(sub.received) == [b"hello"], "delivery")

    async def test_interest_larger_than_a_frame(self) -> None:
        """A node whose channels do not fit one frame sends them in several, and links again after a cut."""
        a, b = await self.cluster_of(2, max_frame_size=8192)
        sub = await self.client_of(b)
        session = b.app.registry.sessions[sub.session_id]
        names = [f"channel-number-{i:05d}" for i in range(2000)]  # ~60 KB of names
        for name in names:
            b.app.registry.subscribe(session, name)
        await self.wait_for(lambda: len(a.mesh.peers[b.app.node_id].interests) == 2000, "all interest")
        a.mesh.peers[b.app.node_id].link.transport.abortConnection()
        await self.wait_for(lambda: a.links() == 1 and b.links() == 1, "relink")
        await self.wait_for(lambda: a.mesh.peers[b.app.node_id].interests == set(names), "interest again")

    async def test_event_over_the_frame_limit(self) -> None:
        """An event too large for the link's frames stays local; the link and later events carry on."""
        a, b = await self.cluster_of(2, max_frame_size=8192)
        far, near = await self.client_of(b), await self.client_of(a)
        await far.subscribe("big")
        await near.subscribe("big")
        await self.interest_settled([a, b], "big", [a, b])
        pub = await self.client_of(a)
        await pub.publish("big", b"x" * 9000)
        await pub.publish("big", b"small")
        await self.wait_for(lambda: payloads(near.received) == [b"x" * 9000, b"small"], "local delivery")
        await self.wait_for(lambda: payloads(far.received) == [b"small"], "the small one across")
        self.assertEqual((a.links(), b.links()), (1, 1))

    async def test_interest_follows_disconnects_during_an_outage(self) -> None:
        """Subscriptions that come and go while a link is down are right once it is back."""
        a, b = await self.cluster_of(2)
        keep, leave = await self.client_of(b), await self.client_of(b)
        await leave.subscribe("gone")
        await self.interest_settled([a, b], "gone", [b])
        await b.app.mesh.stopService()
        await self.wait_for(lambda: a.links() == 0, "link down")
        await leave.close()
        await keep.subscribe("new")
        b.app.mesh.startService()
        await self.wait_for(lambda: a.links() == 1, "link back")
        await self.interest_settled([a, b], "new", [b])
        await self.interest_settled([a, b], "gone", [])


class GossipTests(MeshTestCase):
    async def test_bad_addresses_are_ignored(self) -> None:
        """A gossiped node with an address that cannot be dialed is ignored; others still link."""
        a, b = await self.cluster_of(2)
        proto = await self.tls_link(a)
        gossip = self.certified()
        proto.transport.write(frame(encode_hello(LinkHello(node=gossip, cluster="test", version=1,
                                                           address="127.0.0.1:1", incarnation=5)), 1 << 20))
        proto.transport.write(frame(encode_peers([Peer(uuid.uuid4(), "bogus")]), 1 << 20))
        # A link's frames are handled in order: once a knows of this interest, it has handled the Peers.
        proto.transport.write(frame(encode_interest(["after the peers"], []), 1 << 20))
        await self.wait_for(lambda: gossip in a.mesh.peers and "after the peers" in a.mesh.peers[gossip].interests,
                            "the frame after the Peers")
        self.assertNotIn("bogus", [p.address for p in a.mesh.peers.values()])
        c = await self.start_mesh_node(self.settings(2, [a.address]), name="c")
        await self.wait_for(lambda: c.links() == 2, "c links with a and b")
        proto.transport.abortConnection()

    async def test_bad_advertised_address_refused(self) -> None:
        """A LinkHello advertising an address that is not HOST:PORT is refused."""
        a = await self.start_mesh_node(self.settings(0))
        proto = await self.tls_link(a)
        proto.transport.write(frame(encode_hello(LinkHello(node=self.certified(), cluster="test", version=1,
                                                           address="nowhere")), 1 << 20))
        await self.wait_for(lambda: proto.lost is not None, "refusal")
        goodbye = frames(proto)[-1]
        self.assertEqual(goodbye.code, GoodbyeCode.ProtocolViolation)
        self.assertIn("advertised address", goodbye.reason)
        self.assertEqual(a.mesh.peers, {})

    async def test_oversize_channel_name_in_interest(self) -> None:
        """Interest in an absurdly long channel name is a protocol violation."""
        a = await self.start_mesh_node(self.settings(0))
        proto = await self.tls_link(a)
        proto.transport.write(frame(encode_hello(LinkHello(node=self.certified(), cluster="test", version=1,
                                                           address="127.0.0.1:1")), 1 << 20))
        proto.transport.write(frame(encode_interest(["x" * 5000], []), 1 << 20))
        await self.wait_for(lambda: proto.lost is not None, "the link closed")
        self.assertIn("channel name over", frames(proto)[-1].reason)

    async def test_routed_frame_before_hello_reaches_nobody(self) -> None:
        """A routed frame sent before the handshake is refused and delivered to no session."""
        a = await self.start_mesh_node(self.settings(0))
        sub = await self.client_of(a)
        await sub.subscribe("c")
        proto = await self.tls_link(a)
        event = a.app.state.event(EventType.ChannelEvent, channel="c", payload=b"forged")
        proto.transport.write(frame(encode_routed(Routed(origin=uuid.uuid4(), frame=event.frame, seq=1,
                                                         kind=RouteKind.ChannelMessage, channel="c")), 1 << 20))
        await self.wait_for(lambda: proto.lost is not None, "refusal")
        await self.settle(sub)
        self.assertEqual(sub.received, [])


class RefusalReasonTests(MeshTestCase):
    async def test_dialer_learns_why(self) -> None:
        """The refused dialer logs the Goodbye's reason, not a protocol violation."""
        from twisted.logger import formatEvent, globalLogPublisher

        logged: list[str] = []
        observer = lambda e: logged.append(formatEvent(e))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        a = await self.start_mesh_node(self.settings(0))
        await self.start_mesh_node(self.settings(1, [a.address], cluster="other"))
        await self.wait_for(lambda: any("refused the link" in l and "cluster 'other'" in l for l in logged),
                            "the dialer's log line")
        self.assertFalse(any("Goodbye before LinkHello" in l for l in logged))

    async def test_self_dial_under_another_name_stops(self) -> None:
        """A node whose seed is itself under another name stops dialing it."""
        a = await self.start_mesh_node(self.settings(0))
        a.mesh.dial(f"localhost:{a.address.split(':')[1]}")
        await self.wait_for(lambda: not a.mesh.dialers, "the dialer to be parked")
        refusals = a.app.metrics.mesh_refusals
        await sleep(1.0)
        self.assertEqual(a.app.metrics.mesh_refusals, refusals)

    async def test_two_addresses_for_one_node(self) -> None:
        """Dialing one node under two addresses settles on one link, the same at both ends."""
        a = await self.start_mesh_node(self.settings(0))
        port = a.address.split(":")[1]
        b = await self.start_mesh_node(self.settings(1, [a.address, f"localhost:{port}"]))
        await self.wait_for(lambda: a.links() == 1 and b.links() == 1, "a link")
        # Until b has linked under the other address as well and dropped that link, a second one could come.
        await self.wait_for(lambda: len(b.mesh.dialers) <= 1, "b to stop dialing one of the addresses")
        self.assertEqual((a.links(), b.links()), (1, 1))
        live = lambda n: [l for l in n.mesh.links if not l.closing]  # noqa: E731
        self.assertEqual((len(live(a)), len(live(b))), (1, 1))


class LifecycleTests(MeshTestCase):
    async def test_stop_closes_handshaking_links(self) -> None:
        """Stopping the mesh closes links still in their handshake, and refuses late hellos."""
        a = await self.start_mesh_node(self.settings(0))
        proto = await self.tls_link(a)
        await self.wait_for(lambda: proto.handshaken and len(a.mesh.links) == 1, "the TLS handshake")
        await a.app.mesh.stopService()
        await self.wait_for(lambda: proto.lost is not None, "the connection to close")
        self.assertIsInstance(frames(proto)[-1], Goodbye)
        self.assertEqual(a.mesh.links, set())

    async def test_heartbeat_timeout(self) -> None:
        """A peer that goes silent is dropped after heartbeat_timeout."""
        a, b = await self.cluster_of(2, heartbeat_timeout=1.0)
        silent = b.mesh.peers[a.app.node_id].link
        silent._ticker.stop()  # b stops sending anything on this link...
        silent.transport.pauseProducing()  # ...and reading from it
        seen_by_a = a.mesh.peers[b.app.node_id].link
        await self.wait_for(lambda: a.mesh.peers[b.app.node_id].link is not seen_by_a,
                            "a to drop the silent link", timeout=5)
        self.assertTrue(seen_by_a.closing)

    async def test_forgets_vanished_nodes(self) -> None:
        """A node unreachable past forget_after is forgotten: no queue, no dialing, no gossip."""
        a, b = await self.cluster_of(2, forget_after=1.0)
        await b.app.stopService()
        await self.wait_for(lambda: b.app.node_id not in a.mesh.peers, "a to forget b", timeout=10)
        self.assertEqual(a.mesh.dialers, {})

    async def test_restart_with_the_same_id(self) -> None:
        """A node restarted with the same id gets what was queued for it, and sequences start over."""
        a = await self.start_mesh_node(self.settings(0), name="a")
        settings_b = self.settings(1, [a.address])  # its certificate names its id: the same after a restart
        b = await self.start_mesh_node(settings_b)
        await self.wait_for(lambda: a.links() == 1 and b.links() == 1, "link")
        sub = await self.client_of(b)
        await sub.subscribe("c")
        await self.interest_settled([a, b], "c", [b])
        pub_b = await self.client_of(b)
        await pub_b.publish("c", b"b1")  # b's sequence reaches 1 on a
        await b.app.stopService()
        await self.wait_for(lambda: a.links() == 0, "b gone")
        b2 = await self.start_mesh_node(settings_b)
        self.assertEqual(b2.app.node_id, b.app.node_id)
        sub2 = await self.client_of(b2)
        await sub2.subscribe("c")
        await self.wait_for(lambda: a.links() == 1, "b back")
        await self.interest_settled([a, b2], "c", [b2])
        a_sub = await self.client_of(a)
        await a_sub.subscribe("c")
        await self.interest_settled([a, b2], "c", [a, b2])
        pub = await self.client_of(b2)
        await pub.publish("c", b"after restart")  # seq 1 again, new incarnation: not a duplicate
        await self.wait_for(lambda: payloads(a_sub.received) == [b"after restart"], "delivery on a")


class SlowPeerTests(MeshTestCase):
    async def test_peer_that_does_not_read(self) -> None:
        """A peer that stops reading but stays alive is closed once a queue's worth is waiting."""
        a, b = await self.cluster_of(2, queue_max_bytes=1 << 20)
        link = b.mesh.peers[a.app.node_id].link
        link.transport.transport.stopReading()  # b's TCP no longer reads; its heartbeats go on
        stalled = a.mesh.peers[b.app.node_id].link
        state = a.app.state
        for _ in range(40):
            for _ in range(200):
                state.distribute_event(state.event(EventType.NodeEvent, payload=b"x" * 10_000))
            await sleep(0.05)
            if stalled.closing:
                break
        self.assertTrue(stalled.closing, "the link to the stalled peer is closed")
        self.assertLessEqual(a.mesh.peers[b.app.node_id].outbox.size, 1 << 20)

    async def test_big_burst_on_a_healthy_link(self) -> None:
        """A burst larger than queue_max_bytes on a healthy link is delivered and counts nothing dropped."""
        a, b = await self.cluster_of(2, queue_max_bytes=1 << 20)
        sub = await self.client_of(b)
        await sub.subscribe("c")
        await self.interest_settled([a, b], "c", [b])
        for i in range(60):
            a.app.state.clients.broadcast_to_channel(None, "c", bytes([i]) * 50_000)
        await self.wait_for(lambda: len(sub.received) == 60, "the burst")
        self.assertEqual([e.payload[0] for e in sub.received], list(range(60)))
        self.assertEqual(a.app.metrics.mesh_queue_dropped, 0)
