"""Mesh links without sockets: their lifecycle, in memory, on a fake clock."""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from uuid import UUID, uuid4

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connect, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from meshd._io import EndOfTurn
from meshd.config import MeshSettings
from meshd.mesh.certs import create_ca, issue_node
from meshd.mesh.framing import Deframer, frame
from meshd.mesh.link import AWAITING_HELLO, CLOSED, CLOSING, HELLO_SENT, OPEN, Link, LinkFactory
from meshd.mesh.service import Mesh
from meshd.mesh.tls import Credentials
from meshd.mesh.wire import (
    MESH_VERSION, Goodbye, GoodbyeCode, Heartbeat, LinkHello, RouteKind, Routed, decode, encode_heartbeat,
    encode_hello, routed_frame,
)
from meshd.metrics import Metrics
from meshd.registry import Registry

MAX_FRAME = 1 << 20


def frames_in(data: bytes) -> list:
    """The mesh frames in a stream of bytes, decoded."""
    return [decode(f) for f in Deframer(MAX_FRAME).feed(data)]


class Node:
    """One mesh service on a memory reactor, with what it delivered to its (absent) sessions."""

    def __init__(self, mesh: Mesh, delivered: list) -> None:
        self.mesh = mesh
        self.delivered = delivered

    @property
    def id(self) -> UUID:
        return self.mesh.node_id

    @property
    def refusals(self) -> int:
        return self.mesh.metrics.mesh_refusals

    def live_links(self) -> list[Link]:
        return [link for link in self.mesh.links if not link.closing]


class LinkTestCase(SynchronousTestCase):
    #: Whether the nodes refuse peers whose certificates name no node id: links
    #: paired in memory without TLS (:meth:`pair`, :meth:`accepted`) have no certificate.
    require_ids = False

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()

    def certs(self) -> Path:
        """A CA and certificates n0, n1, n2, n3 for the nodes ``UUID(int=1)``, ``UUID(int=2)``...; n3 is nobody's."""
        if not hasattr(self, "_certs"):
            directory = Path(self.mktemp()).resolve()
            create_ca(directory, "test")
            for i in range(4):
                issue_node(directory, f"n{i}", ["127.0.0.1"], node_id=UUID(int=i + 1))
            self._certs = directory
        return self._certs

    def node(self, index: int, node_id: Optional[UUID] = None, answer=None, **settings) -> Node:
        """A started mesh service (its id the one its certificate names); nothing it does reaches a socket."""
        d = self.certs()
        port = 7100 + index
        values = dict(
            cluster="test", listen=f"tcp:{port}:interface=127.0.0.1", advertise=f"127.0.0.1:{port}",
            ca=d / "ca.pem", cert=d / f"n{index}.pem", key=d / f"n{index}.key",
            heartbeat_interval=1.0, heartbeat_timeout=5.0, reconnect_max_delay=2.0,
            require_node_id_in_cert=self.require_ids,
        )
        values.update(settings)
        config = MeshSettings(**values)
        delivered: list[Routed] = []
        mesh = Mesh(
            config, Credentials.load(config.ca, config.cert, config.key), node_id=node_id or UUID(int=index + 1),
            clock=self.clock, metrics=Metrics(), turn=EndOfTurn(self.clock), registry=Registry(),
            deliver=lambda routed: delivered.append(routed) or 1, answer=answer,
        )
        mesh.startService()
        self.addCleanup(mesh.stopService)
        return Node(mesh, delivered)

    def pair(self, dialer: Node, listener: Node, greet: bool = True):
        """A dialed link and an accepted one, connected in memory (without TLS): (dialed, accepted, pump)."""
        address = listener.mesh.settings.advertise
        dialed, accepted, pump = connectedServerAndClient(
            lambda: LinkFactory(listener.mesh, dialed=False).buildProtocol(None),
            lambda: LinkFactory(dialer.mesh, dialed=True, address=address).buildProtocol(None),
            greet=greet, clock=self.clock,
        )
        return dialed, accepted, pump

    def accepted(self, node: Node) -> tuple[Link, StringTransport]:
        """A link the node accepted, on a transport that records what it is sent."""
        link = LinkFactory(node.mesh, dialed=False).buildProtocol(None)
        transport = StringTransport()
        link.makeConnection(transport)
        return link, transport

    def hello_from(self, node_id: UUID, cluster: str = "test", **fields) -> bytes:
        return frame(encode_hello(LinkHello(node=node_id, cluster=cluster, version=MESH_VERSION,
                                            address="127.0.0.1:7999", incarnation=7, **fields)), MAX_FRAME)

    def end_turn(self) -> None:
        self.clock.advance(0)


class HandshakeTests(LinkTestCase):
    def test_dialer_speaks_first(self) -> None:
        """The accepting side writes nothing until the dialer's LinkHello; then both links open."""
        a, b = self.node(0), self.node(1)
        dialed, accepted, pump = self.pair(b, a, greet=False)
        self.end_turn()
        self.assertEqual((dialed.state, accepted.state), (HELLO_SENT, AWAITING_HELLO))
        self.assertEqual((dialed.hello_sent, accepted.hello_sent), (True, False))
        self.assertIsNone(pump.serverIO.getOutBuffer(), "nothing written")
        sent = frames_in(pump.clientIO.getOutBuffer())
        self.assertIsInstance(sent[0], LinkHello)
        self.assertEqual(sent[0].nonce, dialed.nonce)

    def test_hellos_open_both_ends(self) -> None:
        """Once the LinkHellos are exchanged, each node has the other as a peer over that link."""
        a, b = self.node(0), self.node(1)
        dialed, accepted, pump = self.pair(b, a)
        pump.flush()
        self.assertEqual((dialed.state, accepted.state), (OPEN, OPEN))
        self.assertTrue(dialed.is_open and accepted.is_open)
        self.assertIs(b.mesh.peers[a.id].link, dialed)
        self.assertIs(a.mesh.peers[b.id].link, accepted)
        self.assertEqual(accepted.dial_nonce, dialed.nonce)

    def test_when_opened(self) -> None:
        """when_opened() fires with the link once it opens."""
        a, b = self.node(0), self.node(1)
        dialed, accepted, pump = self.pair(b, a, greet=False)
        opened = dialed.when_opened()
        self.assertNoResult(opened)
        pump.flush()
        self.assertIs(self.successResultOf(opened), dialed)

    def test_wrong_cluster(self) -> None:
        """A LinkHello from another cluster is refused with a Goodbye the dialer keeps, counted at both ends."""
        a, b = self.node(0), self.node(1, cluster="other")
        dialed, accepted, pump = self.pair(b, a, greet=False)
        opened = dialed.when_opened()
        pump.flush()
        self.assertEqual(dialed.farewell.code, GoodbyeCode.WrongCluster)
        self.assertIn("cluster 'other' is not 'test'", dialed.farewell.reason)
        self.assertEqual((dialed.state, accepted.state), (CLOSED, CLOSED))
        self.assertEqual((a.refusals, b.refusals), (1, 1))
        self.assertEqual((a.mesh.peers, b.mesh.peers), ({}, {}))
        self.failureResultOf(opened, ConnectionDone)

    def test_hello_and_frames_in_one_read(self) -> None:
        """Frames that arrive in the same read as the LinkHello are handled once the link is open."""
        a = self.node(0)
        link, transport = self.accepted(a)
        other = uuid4()
        event = b"\0\0\0\0MSH1event"
        link.dataReceived(self.hello_from(other) + routed_frame(other, 1, RouteKind.Event, event, length_prefix=True))
        self.assertEqual(link.state, OPEN)
        self.assertEqual([r.frame for r in a.delivered], [event])


class ViolationTests(LinkTestCase):
    def assert_violation(self, node: Node, link: Link, transport: StringTransport, words: str) -> None:
        self.end_turn()
        goodbye = frames_in(transport.value())[-1]
        self.assertEqual(goodbye.code, GoodbyeCode.ProtocolViolation)
        self.assertIn(words, goodbye.reason)
        self.assertEqual(link.state, CLOSING)
        self.assertTrue(transport.disconnecting, "closed")
        self.assertFalse(transport.disconnected, "closed after the Goodbye, not aborted")
        self.assertIsNone(transport.producer, "unregistered, so that TLS can shut down")
        self.assertEqual(node.refusals, 1)
        link.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(link.state, CLOSED)
        self.assertEqual(node.refusals, 1, "a link this node closed is not counted again")

    def test_frame_before_hello(self) -> None:
        """A frame other than LinkHello first is a violation: Goodbye, then close."""
        a = self.node(0)
        link, transport = self.accepted(a)
        link.dataReceived(frame(encode_heartbeat(0), MAX_FRAME))
        self.assert_violation(a, link, transport, "Heartbeat before LinkHello")

    def test_malformed_frame(self) -> None:
        """A frame that is not a mesh frame is a violation."""
        a = self.node(0)
        link, transport = self.accepted(a)
        link.dataReceived(frame(b"garbage!", MAX_FRAME))
        self.assert_violation(a, link, transport, "malformed frame")

    def test_oversize_frame(self) -> None:
        """A frame announced over max_frame_size is a violation before its body arrives."""
        a = self.node(0, max_frame_size=4096)
        link, transport = self.accepted(a)
        link.dataReceived(b"\0\1\0\0")
        self.assert_violation(a, link, transport, "peer announced a frame of 65536 bytes")

    def test_second_hello(self) -> None:
        """A LinkHello on an open link is a violation."""
        a = self.node(0)
        link, transport = self.accepted(a)
        hello = self.hello_from(uuid4())
        link.dataReceived(hello)
        self.assertEqual(link.state, OPEN)
        link.dataReceived(hello)
        self.assert_violation(a, link, transport, "a second LinkHello")

    def test_nothing_after_a_violation(self) -> None:
        """The frames that follow a violation in the same read reach nobody."""
        a = self.node(0)
        link, transport = self.accepted(a)
        other = uuid4()
        routed = routed_frame(other, 1, RouteKind.Event, b"\0\0\0\0MSH1x", length_prefix=True)
        link.dataReceived(self.hello_from(other) + frame(b"garbage!", MAX_FRAME) + routed)
        self.assert_violation(a, link, transport, "malformed frame")
        self.assertEqual(a.delivered, [])

    def test_routed_frame_from_another_node(self) -> None:
        """A routed frame whose origin is not the linked node is a violation, and is not delivered."""
        a = self.node(0)
        link, transport = self.accepted(a)
        link.dataReceived(self.hello_from(uuid4()))
        link.dataReceived(routed_frame(uuid4(), 1, RouteKind.Event, b"\0\0\0\0MSH1x", length_prefix=True))
        self.assert_violation(a, link, transport, "not from the linked node")
        self.assertEqual(a.delivered, [])


class GoodbyeTests(LinkTestCase):
    def test_peer_says_goodbye(self) -> None:
        """A Goodbye from the peer closes the link; the node keeps the reason and forgets the link."""
        a, b = self.node(0), self.node(1)
        dialed, accepted, pump = self.pair(b, a)
        pump.flush()
        accepted.goodbye(GoodbyeCode.Shutdown, "node shutting down")
        self.assertEqual(accepted.state, CLOSING)
        pump.flush()
        self.assertEqual(dialed.farewell, Goodbye(GoodbyeCode.Shutdown, "node shutting down"))
        self.assertEqual((dialed.state, accepted.state), (CLOSED, CLOSED))
        self.assertIsNone(b.mesh.peers[a.id].link)
        self.assertEqual(b.mesh.links, set())

    def test_goodbye_once(self) -> None:
        """A closing link ignores further goodbyes and writes nothing more."""
        a = self.node(0)
        link, transport = self.accepted(a)
        link.goodbye(GoodbyeCode.Shutdown, "first")
        written = transport.value()
        link.goodbye(GoodbyeCode.Shutdown, "second")
        link.send(encode_heartbeat(0))
        self.end_turn()
        self.assertEqual(transport.value(), written)
        self.assertEqual([g.reason for g in frames_in(written)], ["first"])


class HeartbeatTests(LinkTestCase):
    def test_idle_link_beats(self) -> None:
        """An open link sends a Heartbeat every interval, carrying a ping stamped with its clock."""
        a, b = self.node(0), self.node(1)
        dialed, accepted, pump = self.pair(b, a)
        pump.flush()
        self.clock.advance(1.0)  # the interval in which the LinkHellos went out
        pump.flush()
        for _ in range(3):
            self.clock.advance(1.0)
            self.end_turn()
            stamp = int(self.clock.seconds() * 1_000_000)
            self.assertEqual(frames_in(pump.clientIO.getOutBuffer() or b""), [Heartbeat(0, ping=stamp)])
            pump.serverIO.getOutBuffer()

    def test_queries_between_links(self) -> None:
        """A Query crosses a link and its Answer comes back; a peer whose LinkHello does not list the
        feature (a node older than it) is not sent one and is reported missing."""
        from meshd.mesh.queries import Reply
        from meshd.mesh.wire import Query, QueryKind

        asked = []

        def answer(query):
            asked.append(query)
            return Reply(sessions=5, channels=[("room", 2)])

        a, b, old = self.node(0, answer=answer), self.node(1, answer=answer), self.node(2)
        pumps = [self.pair(a, other)[2] for other in (b, old)]
        for pump in pumps:
            pump.flush()
        results = []
        a.mesh.ask(Query(kind=QueryKind.Stats), 2.0).addCallback(results.append)
        for _ in range(2):
            self.end_turn()
            for pump in pumps:
                pump.flush()
        self.assertEqual([q.kind for q in asked], [QueryKind.Stats])
        [result] = results
        self.assertEqual(result.missing, [old.mesh.node_id])
        [[got]] = result.answers.values()
        self.assertEqual((got.sessions, [(c.channel, c.subscribers) for c in got.channels]), (5, [("room", 2)]))
        self.assertEqual(list(result.answers), [b.mesh.node_id])

    def test_round_trip_measured(self) -> None:
        """A ping is answered at once with its pong; the pinging side measures the round trip."""
        a, b = self.node(0), self.node(1)
        dialed, accepted, pump = self.pair(b, a)
        pump.flush()
        self.assertIsNone(dialed.rtt)
        self.clock.advance(1.0)  # both sides ping
        self.end_turn()
        self.clock.advance(0.25)  # the pings take a quarter second to cross and come back
        pump.flush()
        self.end_turn()
        pump.flush()
        self.assertAlmostEqual(dialed.rtt, 0.25, places=5)
        self.assertAlmostEqual(accepted.rtt, 0.25, places=5)
        self.assertEqual(a.mesh.metrics.mesh_rtt.count, 1)
        self.assertAlmostEqual(a.mesh.metrics.mesh_rtt.sum, 0.25, places=5)

    def test_silence_times_out(self) -> None:
        """A link that hears nothing for heartbeat_timeout says Goodbye and is aborted."""
        a = self.node(0)
        link, transport = self.accepted(a)
        self.clock.pump([1.0] * 6)
        self.assertEqual(link.state, CLOSING)
        self.assertEqual(frames_in(transport.value()), [Goodbye(GoodbyeCode.HeartbeatTimeout, "heartbeat timeout")])
        self.assertTrue(transport.disconnected, "aborted")

    def test_traffic_keeps_it_up(self) -> None:
        """A link that keeps hearing from its peer stays open past heartbeat_timeout."""
        a, b = self.node(0), self.node(1)
        dialed, accepted, pump = self.pair(b, a)
        pump.flush()
        for _ in range(10):
            self.clock.advance(1.0)
            pump.flush()
        self.assertEqual((dialed.state, accepted.state), (OPEN, OPEN))


class SlowPeerTests(LinkTestCase):
    def test_peer_that_does_not_read(self) -> None:
        """Past queue_max_bytes written while the transport stays full, the link is aborted without a Goodbye."""
        a = self.node(0, queue_max_bytes=10_000)
        link, transport = self.accepted(a)
        link.dataReceived(self.hello_from(uuid4()))
        self.end_turn()
        transport.clear()
        transport.producer.pauseProducing()  # what the transport says when its buffer is full
        self.end_turn()  # ...and stays full past the end of that turn
        for _ in range(20):
            link.send(encode_heartbeat(0) + b"\0" * 1000)
        self.assertEqual(link.state, CLOSING)
        self.assertTrue(transport.disconnected, "aborted")
        self.end_turn()
        self.assertEqual(transport.value(), b"", "no Goodbye, and nothing queued")


class DuplicateTests(LinkTestCase):
    def test_crossed_dials(self) -> None:
        """Two nodes that dial each other at once keep one link, the one the lower id dialed, at both ends."""
        low, high = self.node(0, node_id=UUID(int=1)), self.node(1, node_id=UUID(int=2))
        low_dialed, high_accepted, pump1 = self.pair(low, high, greet=False)
        high_dialed, low_accepted, pump2 = self.pair(high, low, greet=False)
        for _ in range(20):
            pump1.pump()
            pump2.pump()
        self.assertIs(low.mesh.peers[high.id].link, low_dialed)
        self.assertIs(high.mesh.peers[low.id].link, high_accepted)
        self.assertEqual(low.live_links(), [low_dialed])
        self.assertEqual(high.live_links(), [high_accepted])
        self.assertEqual((high_dialed.state, low_accepted.state), (CLOSED, CLOSED))

    def test_two_addresses_for_one_node(self) -> None:
        """Two links one node dialed to another are told apart by their nonces, the same way at both ends."""
        a, b = self.node(0), self.node(1)
        first, first_accepted, pump1 = self.pair(b, a, greet=False)
        second, second_accepted, pump2 = self.pair(b, a, greet=False)
        for _ in range(20):
            pump1.pump()
            pump2.pump()
        kept = min((first, first_accepted), (second, second_accepted), key=lambda pair: pair[0].nonce)
        self.assertEqual(b.live_links(), [kept[0]])
        self.assertEqual(a.live_links(), [kept[1]])


class DialTests(LinkTestCase):
    """Dialing through ClientService, over TLS pumped in memory."""

    require_ids = True

    def dial(self, dialer: Node, listener: Node):
        """Let ``dialer``'s pending dial reach ``listener``'s TLS listener: (dialing protocol, pump)."""
        self.end_turn()  # the dialer's endpoint starts its attempt
        _host, _port, factory, _timeout, _bind = self.clock.tcpClients[-1]
        listen_port = int(listener.mesh.settings.listen.split(":")[1])
        [listening] = [f for port, f, *_ in self.clock.tcpServers if port == listen_port]
        client, server = factory.buildProtocol(None), listening.buildProtocol(None)
        pump = connect(server, FakeTransport(server, isServer=True), client, FakeTransport(client, isServer=False),
                       greet=False, clock=self.clock)
        return client, pump

    def test_dial_over_tls(self) -> None:
        """A dialer's ClientService connects once the link opened over mutual TLS."""
        a = self.node(0)
        b = self.node(1)
        b.mesh.dial(a.mesh.settings.advertise)
        service = b.mesh.dialers[a.mesh.settings.advertise]
        connected = service.whenConnected()
        _client, pump = self.dial(b, a)
        self.assertNoResult(connected)
        pump.flush()
        link = self.successResultOf(connected)
        self.assertTrue(link.is_open)
        self.assertIs(b.mesh.peers[a.id].link, link)
        self.assertTrue(a.mesh.peers[b.id].link.is_open)

    def test_failed_handshake_is_a_failed_attempt(self) -> None:
        """A link refused in its handshake fails the ClientService's attempt, which tries again later."""
        a = self.node(0, cluster="other")
        b = self.node(1)
        b.mesh.dial(a.mesh.settings.advertise)
        service = b.mesh.dialers[a.mesh.settings.advertise]
        failed = service.whenConnected(failAfterFailures=1)
        _client, pump = self.dial(b, a)
        pump.flush()
        self.failureResultOf(failed)
        attempts = len(self.clock.tcpClients)
        self.end_turn()
        self.assertEqual(len(self.clock.tcpClients), attempts, "no new attempt at once")
        self.clock.advance(b.mesh.settings.reconnect_max_delay + 1.0)
        self.assertEqual(len(self.clock.tcpClients), attempts + 1, "a new attempt after the backoff")

    def test_park_while_handshaking(self) -> None:
        """Parking a dialer whose link is still in its handshake aborts the link and stops the service."""
        a, b = self.node(0), self.node(1)
        address = a.mesh.settings.advertise
        b.mesh.dial(address)
        client, pump = self.dial(b, a)
        [link] = [l for l in b.mesh.links if l.dialed]
        self.assertEqual(link.state, HELLO_SENT)
        stopped = b.mesh.park(address)
        self.assertEqual(link.state, CLOSING)
        pump.flush()
        self.assertEqual(link.state, CLOSED)
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(b.mesh.dialers, {})

    def test_park_an_open_link(self) -> None:
        """Parking a dialer whose link is open closes the link and stops the service once it is gone."""
        a, b = self.node(0), self.node(1)
        address = a.mesh.settings.advertise
        b.mesh.dial(address)
        _client, pump = self.dial(b, a)
        pump.flush()
        link = b.mesh.peers[a.id].link
        stopped = b.mesh.park(address)
        self.assertNoResult(stopped)
        pump.flush()
        self.assertEqual(link.state, CLOSED)
        self.assertIsNone(self.successResultOf(stopped))

