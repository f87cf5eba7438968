"""What a certified peer can make a node believe, hold or do: node ids bound to certificates,
sequence numbers that cannot jump, bounded interest and gossip, and a deadline for the LinkHello.

Most tests pair links in memory on a fake clock (TLS pumped in memory where the
certificate matters); the last ones run real nodes over loopback.
"""

from __future__ import annotations

import datetime
import io
import uuid
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from uuid import UUID

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.test.iosim import FakeTransport, connect

from meshd import ctl
from meshd._io import LinkTLSFactory
from meshd.codec import EventType
from meshd.config import ConfigError, parse
from meshd.events import Event
from meshd.mesh.certs import create_ca, issue_node
from meshd.mesh.framing import frame
from meshd.mesh.link import AWAITING_HELLO, CLOSED, CLOSING, HELLO_SENT, OPEN, LinkFactory
from meshd.mesh.service import MAX_UNKNOWN_DIALS, MAX_UNKNOWN_NODES
from meshd.mesh.tls import Credentials, CredentialsError, IdentityError, node_id_of
from meshd.mesh.wire import (
    MESH_VERSION, Goodbye, GoodbyeCode, LinkHello, Peer, Peers, RouteKind, encode_hello, encode_interest,
    encode_peers, routed_frame,
)

from .meshsupport import MeshTestCase, certified_id
from .support import payloads
from .test_link import MAX_FRAME, LinkTestCase, Node, frames_in

FORGED = b"\0\0\0\0MSH1forged"


class Raw(Protocol):
    """The far end of a connection, speaking raw bytes: what it receives, and whether it was lost."""

    def connectionMade(self) -> None:
        self.received = b""
        self.lost = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost = reason


def event(payload: bytes) -> Event:
    return Event(EventType.NodeEvent, payload=payload)


def delivered(node: Node) -> list[bytes]:
    """The client frames a node delivered, sequence markers left out."""
    return [r.frame for r in node.delivered if not (r.kind == RouteKind.ChannelMessage and r.channel is None)]


def routed(origin: UUID, seq: int, payload: bytes = FORGED) -> bytes:
    return routed_frame(origin, seq, RouteKind.Event, payload, length_prefix=True)


class TrustTestCase(LinkTestCase):
    """Nodes whose certificates name their ids (n0 is UUID(int=1), n1 UUID(int=2)...), linked over TLS in memory."""

    require_ids = True

    def credentials(self, name: str) -> Credentials:
        d = self.certs()
        return Credentials.load(d / "ca.pem", d / f"{name}.pem", d / f"{name}.key")

    def listener(self, node: Node) -> LinkTLSFactory:
        return LinkTLSFactory(node.mesh.credentials.server_options(), False, LinkFactory(node.mesh, dialed=False))

    def dialer(self, node: Node, address: str = "127.0.0.1:7199") -> LinkTLSFactory:
        return LinkTLSFactory(node.mesh.credentials.client_options("127.0.0.1"), True,
                              LinkFactory(node.mesh, dialed=True, address=address))

    # Raw ends speak TLS through LinkTLSFactory too: Twisted's own TLS factory
    # holds small writes for an iteration of the global reactor.

    def raw_client(self, cert: str) -> LinkTLSFactory:
        return LinkTLSFactory(self.credentials(cert).client_options("127.0.0.1"), True, Factory.forProtocol(Raw))

    def raw_server(self, cert: str) -> LinkTLSFactory:
        return LinkTLSFactory(self.credentials(cert).server_options(), False, Factory.forProtocol(Raw))

    def tls(self, client_factory, server_factory):
        """Connect a TLS client and server in memory: (client's inner protocol, server's inner protocol, pump)."""
        client, server = client_factory.buildProtocol(None), server_factory.buildProtocol(None)
        pump = connect(server, FakeTransport(server, isServer=True), client, FakeTransport(client, isServer=False),
                       greet=False, clock=self.clock)
        pump.flush()
        return client.wrappedProtocol, server.wrappedProtocol, pump

    def hello(self, node: UUID, incarnation: int = 7, address: str = "127.0.0.1:7999", **fields) -> bytes:
        return frame(encode_hello(LinkHello(node=node, cluster="test", version=MESH_VERSION,
                                            address=address, incarnation=incarnation, **fields)), MAX_FRAME)


class CertifiedIdentityTests(TrustTestCase):
    def test_impostor_claiming_another_node_is_refused(self) -> None:
        """A peer with node X's certificate whose LinkHello claims node B is refused; B's frames keep flowing."""
        a, b = self.node(0), self.node(1)
        _dialed, accepted, pump = self.tls(self.dialer(b), self.listener(a))
        self.assertEqual(accepted.state, OPEN)
        b.mesh.route(RouteKind.Event, event(b"before"))
        pump.flush()
        impostor, _server, impostor_pump = self.tls(self.raw_client("n3"), self.listener(a))
        cursor = a.mesh.hello().cursors  # what a tells every peer: b's incarnation and how far it read
        impostor.transport.write(self.hello(b.id, incarnation=b.mesh.incarnation, cursors=cursor, nonce=1)
                                 + routed(b.id, (1 << 64) - 1))
        impostor_pump.flush()
        goodbye = frames_in(impostor.received)[-1]
        self.assertEqual(goodbye.code, GoodbyeCode.ProtocolViolation)
        self.assertIn(f"LinkHello from node {b.id}, but the peer's certificate is node {UUID(int=4)}'s",
                      goodbye.reason)
        self.assertIsNotNone(impostor.lost)
        self.assertEqual(a.refusals, 1)
        self.assertIs(a.mesh.peers[b.id].link, accepted)
        self.assertEqual(a.mesh.peers[b.id].received_seq, 1)
        b.mesh.route(RouteKind.Event, event(b"after"))
        pump.flush()
        self.assertEqual(delivered(a), [event(b"before").frame, event(b"after").frame])

    def test_dialer_refuses_a_listener_claiming_another_node(self) -> None:
        """A dialer refuses a listener whose LinkHello claims another node than its certificate names."""
        a = self.node(0)
        link, impostor, pump = self.tls(self.dialer(a), self.raw_server("n3"))
        self.assertIsInstance(frames_in(impostor.received)[0], LinkHello, "a spoke first")
        impostor.transport.write(self.hello(UUID(int=2)))
        pump.flush()
        self.assertEqual(link.state, CLOSED)
        goodbye = frames_in(impostor.received)[-1]
        self.assertEqual(goodbye.code, GoodbyeCode.ProtocolViolation)
        self.assertIn("certificate is node", goodbye.reason)
        self.assertNotIn(UUID(int=2), a.mesh.peers)
        self.assertEqual(a.refusals, 1)

    def test_certificate_without_an_id_refused(self) -> None:
        """A certificate that names no node id is refused by default, whatever id the LinkHello claims."""
        a = self.node(0)
        issue_node(self.certs(), "legacy", ["127.0.0.1"])
        peer, _server, pump = self.tls(self.raw_client("legacy"), self.listener(a))
        peer.transport.write(self.hello(UUID(int=9)))
        pump.flush()
        goodbye = frames_in(peer.received)[-1]
        self.assertIn("names no node id", goodbye.reason)
        self.assertEqual(a.mesh.peers, {})

    def test_certificates_without_ids_allowed_when_configured(self) -> None:
        """With require_node_id_in_cert off, a certificate without an id links; one naming another id still does not."""
        a = self.node(0, require_node_id_in_cert=False)
        issue_node(self.certs(), "legacy", ["127.0.0.1"])
        legacy, _server, pump = self.tls(self.raw_client("legacy"), self.listener(a))
        legacy.transport.write(self.hello(UUID(int=9)))
        pump.flush()
        self.assertIsInstance(frames_in(legacy.received)[0], LinkHello, "a answered: the link is open")
        self.assertIsNotNone(a.mesh.peers[UUID(int=9)].link)
        impostor, _server, pump = self.tls(self.raw_client("n3"), self.listener(a))
        impostor.transport.write(self.hello(UUID(int=2)))
        pump.flush()
        self.assertIn("certificate is node", frames_in(impostor.received)[-1].reason)
        self.assertNotIn(UUID(int=2), a.mesh.peers)

    def test_both_ends_link_when_ids_match(self) -> None:
        """Two nodes whose certificates name their ids link over TLS, each checking the other."""
        a, b = self.node(0), self.node(1)
        dialed, accepted, _pump = self.tls(self.dialer(b), self.listener(a))
        self.assertEqual((dialed.state, accepted.state), (OPEN, OPEN))
        self.assertEqual((a.refusals, b.refusals), (0, 0))

    def test_own_certificate_of_another_node(self) -> None:
        """A node whose certificate names another id does not start its mesh, and says which id to set."""
        with self.assertRaises(CredentialsError) as raised:
            self.node(0, node_id=UUID(int=9))
        self.assertIn(f'set [node] id = "{UUID(int=1)}"', str(raised.exception))

    def test_own_certificate_without_an_id(self) -> None:
        """A node whose certificate names no id does not start while peers require one."""
        issue_node(self.certs(), "legacy", ["127.0.0.1"])
        d = self.certs()
        with self.assertRaises(CredentialsError) as raised:
            self.node(0, cert=d / "legacy.pem", key=d / "legacy.key")
        self.assertIn("require_node_id_in_cert", str(raised.exception))
        self.node(0, cert=d / "legacy.pem", key=d / "legacy.key", require_node_id_in_cert=False)


class CertificateCommandTests(TrustTestCase):
    def run_certs(self, *args: str) -> tuple[int, str]:
        out = io.StringIO()
        with redirect_stdout(out), redirect_stderr(io.StringIO()):
            code = ctl.certs(ctl.parser().parse_args(["certs", *args]))
        return code, out.getvalue().strip()

    def test_node_id_given(self) -> None:
        """meshctl certs node --node-id writes that id into the certificate and prints it."""
        d = Path(self.mktemp())
        create_ca(d, "test")
        code, printed = self.run_certs("node", "a", "--dir", str(d), "--node-id", str(UUID(int=5)))
        self.assertEqual((code, printed), (0, str(UUID(int=5))))
        self.assertEqual(certified_id(d / "a.pem"), UUID(int=5))

    def test_node_id_made(self) -> None:
        """Without --node-id, meshctl certs node makes a new id, writes it and prints it."""
        d = Path(self.mktemp())
        create_ca(d, "test")
        code, printed = self.run_certs("node", "a", "--dir", str(d), "--san", "127.0.0.1")
        self.assertEqual(code, 0)
        self.assertEqual(certified_id(d / "a.pem"), UUID(printed))


class CertificateIdTests(TrustTestCase):
    def certificate(self, *uris: str) -> x509.Certificate:
        """A self-signed certificate with these URI SANs."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("x")] + [x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
            .sign(key, hashes.SHA256())
        )

    def test_reading_the_id(self) -> None:
        """A certificate names one node id, none, or an unreadable one, which refuses it."""
        self.assertEqual(node_id_of(self.certificate(f"meshd://node/{UUID(int=3)}", "https://x")), UUID(int=3))
        self.assertIsNone(node_id_of(self.certificate("https://x")))
        with self.assertRaises(IdentityError):
            node_id_of(self.certificate(f"meshd://node/{UUID(int=3)}", f"meshd://node/{UUID(int=4)}"))
        with self.assertRaises(IdentityError):
            node_id_of(self.certificate("meshd://node/not-a-uuid"))


class SequenceTests(TrustTestCase):
    require_ids = False  # links paired without TLS: the numbers are what is tested

    def assert_violation(self, link, transport, words: str) -> None:
        self.end_turn()
        goodbye = frames_in(transport.value())[-1]
        self.assertEqual(goodbye.code, GoodbyeCode.ProtocolViolation)
        self.assertIn(words, goodbye.reason)
        self.assertEqual(link.state, CLOSING)

    def test_jump_past_the_gap_is_a_violation(self) -> None:
        """A routed frame numbered 2^64-1 after frame 1 is a protocol violation, not a blackhole for what follows."""
        a = self.node(0)
        link, transport = self.accepted(a)
        other = UUID(int=9)
        link.dataReceived(self.hello(other) + routed(other, 1, b"\0\0\0\0MSH1one") + routed(other, (1 << 64) - 1))
        self.assert_violation(link, transport, f"jumps {(1 << 64) - 2} past 1")
        self.assertEqual(a.mesh.peers[other].received_seq, 1)
        self.assertEqual(delivered(a), [b"\0\0\0\0MSH1one"])
        link.connectionLost(None)
        again, _transport = self.accepted(a)
        again.dataReceived(self.hello(other) + routed(other, 2, b"\0\0\0\0MSH1two"))
        self.assertEqual(delivered(a), [b"\0\0\0\0MSH1one", b"\0\0\0\0MSH1two"])

    def test_gap_bound_is_configured(self) -> None:
        """A jump of max_sequence_gap is accepted, one more is a violation."""
        a = self.node(0, max_sequence_gap=100)
        link, transport = self.accepted(a)
        other = UUID(int=9)
        link.dataReceived(self.hello(other) + routed(other, 1) + routed(other, 101) + routed(other, 202))
        self.assert_violation(link, transport, "jumps 101 past 101")
        self.assertEqual(a.mesh.peers[other].received_seq, 101)

    def test_new_incarnation_starts_over(self) -> None:
        """A node's new incarnation starts its numbers anew; its first frame may start anywhere."""
        a = self.node(0, max_sequence_gap=100)
        other = UUID(int=9)
        link, _transport = self.accepted(a)
        link.dataReceived(self.hello(other, incarnation=7) + routed(other, 10**12, b"\0\0\0\0MSH1old"))
        link.connectionLost(None)
        again, _transport = self.accepted(a)
        again.dataReceived(self.hello(other, incarnation=8) + routed(other, 1, b"\0\0\0\0MSH1new"))
        self.assertEqual(again.state, OPEN)
        self.assertEqual(delivered(a), [b"\0\0\0\0MSH1old", b"\0\0\0\0MSH1new"])

    def linked(self, *nodes: Node):
        """Every later node dials the first one; the pumps."""
        pumps = []
        for node in nodes[1:]:
            _dialed, _accepted, pump = self.pair(node, nodes[0])
            pump.flush()
            pumps.append(pump)
        return pumps

    def flush(self, pumps) -> None:
        for pump in pumps:
            pump.flush()

    def gaps(self, node: Node) -> list[int]:
        seqs = [r.seq for r in node.delivered]
        return [b - a for a, b in zip(seqs, seqs[1:])]

    def test_quiet_peer_stays_within_the_gap(self) -> None:
        """A peer sent nothing while its origin routes many events elsewhere gets markers, and no jump past the gap."""
        a, b, c = (self.node(i, max_sequence_gap=16) for i in range(3))
        pumps = self.linked(a, b, c)
        a.mesh.route(RouteKind.Event, event(b"first"))
        for i in range(100):
            a.mesh.route(RouteKind.Event, event(b"%d" % i), exclude_node=b.id)  # to c only
            self.flush(pumps)
        a.mesh.route(RouteKind.Event, event(b"last"))
        self.flush(pumps)
        self.assertEqual(delivered(b), [event(b"first").frame, event(b"last").frame])
        self.assertLessEqual(max(self.gaps(b)), 16)
        self.assertEqual(b.refusals, 0)
        self.assertTrue(b.mesh.peers[a.id].link.is_open)

    def test_resumed_link_stays_within_the_gap(self) -> None:
        """Frames kept for a peer through an outage, or dropped past the bounds, leave no jump past the gap."""
        a, b, c = (self.node(i, max_sequence_gap=16, queue_max_bytes=4096) for i in range(3))
        pumps = self.linked(a, b, c)
        a.mesh.route(RouteKind.Event, event(b"first"))
        self.flush(pumps)
        b.mesh.peers[a.id].link.transport.loseConnection()
        self.flush(pumps)
        self.assertIsNone(a.mesh.peers[b.id].link)
        for i in range(100):
            a.mesh.route(RouteKind.Event, event(b"%d" % i), exclude_node=b.id)
        a.mesh.route(RouteKind.Event, event(b"kept"))  # waits for b
        for i in range(100):
            a.mesh.route(RouteKind.Event, event(b"x" * 100))  # past queue_max_bytes: dropped, all of them
        self.assertGreater(a.mesh.metrics.mesh_queue_dropped, 0)
        for i in range(100):
            a.mesh.route(RouteKind.Event, event(b"%d" % i), exclude_node=b.id)
        pumps.append(self.pair(b, a)[2])
        self.flush(pumps)
        a.mesh.route(RouteKind.Event, event(b"back"))
        self.flush(pumps)
        self.assertEqual(delivered(b)[0], event(b"first").frame)
        self.assertEqual(delivered(b)[-1], event(b"back").frame)
        self.assertLessEqual(max(self.gaps(b)), 16)
        self.assertEqual(b.refusals, 0)


class InterestBoundTests(TrustTestCase):
    require_ids = False

    def test_too_many_channels(self) -> None:
        """Interest in more than max_peer_channels channels is a violation, and what the peer held is freed."""
        a = self.node(0, max_peer_channels=10)
        link, transport = self.accepted(a)
        other = UUID(int=9)
        link.dataReceived(self.hello(other) + frame(encode_interest([f"c{i}" for i in range(6)], []), MAX_FRAME))
        self.assertEqual(len(a.mesh.peers[other].interests), 6)
        link.dataReceived(frame(encode_interest([f"d{i}" for i in range(5)], []), MAX_FRAME))
        self.end_turn()
        self.assertIn("interest in over 10 channels", frames_in(transport.value())[-1].reason)
        self.assertEqual(a.mesh.peers[other].interests, set())

    def test_too_many_bytes(self) -> None:
        """Interest in more than max_peer_interest_bytes of channel names is a violation."""
        a = self.node(0, max_peer_interest_bytes=4096)
        link, transport = self.accepted(a)
        link.dataReceived(self.hello(UUID(int=9))
                          + frame(encode_interest([c * 1000 for c in "abcde"], []), MAX_FRAME))
        self.end_turn()
        self.assertIn("over 4096 bytes of channel names", frames_in(transport.value())[-1].reason)

    def test_removals_count(self) -> None:
        """Channels a peer stops being interested in no longer count against its bounds."""
        a = self.node(0, max_peer_channels=10)
        link, transport = self.accepted(a)
        other = UUID(int=9)
        link.dataReceived(self.hello(other))
        for round_ in range(5):
            names = [f"{round_}-{i}" for i in range(10)]
            link.dataReceived(frame(encode_interest(names, []), MAX_FRAME))
            link.dataReceived(frame(encode_interest([], names), MAX_FRAME))
        self.assertEqual(link.state, OPEN)
        self.assertEqual(a.mesh.peers[other].interest_bytes, 0)

    def test_interest_in_the_hello(self) -> None:
        """A LinkHello carrying interest past the bounds is refused."""
        a = self.node(0, max_peer_channels=10)
        link, transport = self.accepted(a)
        link.dataReceived(self.hello(UUID(int=9), interests=tuple(f"c{i}" for i in range(11))))
        self.end_turn()
        goodbye = frames_in(transport.value())[-1]
        self.assertEqual(goodbye.code, GoodbyeCode.ProtocolViolation)
        self.assertIn("LinkHello: interest in over 10 channels", goodbye.reason)
        self.assertEqual(a.mesh.peers, {})

    def test_long_name_in_the_hello(self) -> None:
        """A LinkHello declaring interest in an over-long channel name is refused, not taken."""
        a = self.node(0)
        link, transport = self.accepted(a)
        link.dataReceived(self.hello(UUID(int=9), interests=("x" * 5000,)))
        self.end_turn()
        self.assertIn("LinkHello: a channel name over 4096 bytes", frames_in(transport.value())[-1].reason)
        self.assertEqual(a.mesh.peers, {})

    def test_freed_after_the_outage_bound(self) -> None:
        """A gone peer's interest is kept for queue_max_seconds (its channel messages wait), then freed."""
        a = self.node(0, queue_max_seconds=30.0)
        link, _transport = self.accepted(a)
        other = UUID(int=9)
        link.dataReceived(self.hello(other) + frame(encode_interest(["news"], []), MAX_FRAME))
        link.connectionLost(None)
        news = Event(EventType.ChannelEvent, channel="news", payload=b"1")
        self.clock.advance(29.0)
        self.assertEqual(a.mesh.route(RouteKind.ChannelMessage, news, channel="news"), 1, "queued for it")
        self.clock.pump([1.0] * 3)
        self.assertEqual(a.mesh.peers[other].interests, set())
        self.assertEqual(a.mesh.route(RouteKind.ChannelMessage, news, channel="news"), 0)


class GossipTests(TrustTestCase):
    require_ids = False

    def flood(self, a: Node, count: int = 1100, host: str = "127.0.0.1"):
        """A linked peer tells ``a`` of ``count`` invented nodes; its link and transport."""
        link, transport = self.accepted(a)
        link.dataReceived(self.hello(UUID(int=9)))
        invented = [Peer(uuid.uuid4(), f"{host}:{10000 + i}") for i in range(count)]
        for start in range(0, count, 100):
            link.dataReceived(frame(encode_peers(invented[start:start + 100]), MAX_FRAME))
        self.end_turn()
        return link, transport

    def unknown(self, node: Node) -> int:
        return sum(1 for p in node.mesh.peers.values() if not p.linked)

    def test_invented_nodes_are_capped(self) -> None:
        """Of 1,100 invented nodes a node keeps 64 and dials 8 at a time; linked nodes stay, new ones still link."""
        a = self.node(0)
        old, _transport = self.accepted(a)
        old.dataReceived(self.hello(UUID(int=8)))
        old.connectionLost(None)  # linked once, away now
        self.flood(a)
        self.assertEqual(self.unknown(a), MAX_UNKNOWN_NODES)
        self.assertIn(UUID(int=8), a.mesh.peers)
        self.assertEqual(len(a.mesh.dialers), MAX_UNKNOWN_DIALS + 1, "8 invented nodes, and the one linked before")
        newcomer, transport = self.accepted(a)
        newcomer.dataReceived(self.hello(UUID(int=7)))
        self.assertEqual(newcomer.state, OPEN)

    def test_invented_node_at_a_real_address(self) -> None:
        """A node told of under the address of a node that linked does not stop its redialing when its turn ends."""
        a = self.node(0)
        old, _transport = self.accepted(a)
        old.dataReceived(self.hello(UUID(int=8)))  # advertises 127.0.0.1:7999
        old.connectionLost(None)
        link, _transport = self.accepted(a)
        link.dataReceived(self.hello(UUID(int=9), address="127.0.0.1:7998"))
        invented = [Peer(UUID(int=30), "127.0.0.1:7999")] + [Peer(uuid.uuid4(), f"127.0.0.1:{10000 + i}")
                                                             for i in range(20)]
        link.dataReceived(frame(encode_peers(invented), MAX_FRAME))
        self.clock.pump([1.0] * 65)  # two turns
        self.assertIn("127.0.0.1:7999", a.mesh.dialers)
        self.assertGreater(a.mesh.peers[UUID(int=30)].last_tried, 0, "a turn of its ended")

    def test_node_found_elsewhere(self) -> None:
        """A node told of at one address that links from another is no longer dialed at the first."""
        a = self.node(0)
        link, _transport = self.accepted(a)
        link.dataReceived(self.hello(UUID(int=9), address="127.0.0.1:7998")
                          + frame(encode_peers([Peer(UUID(int=40), "127.0.0.1:7990")]), MAX_FRAME))
        self.assertIn("127.0.0.1:7990", a.mesh.dialers)
        found, _transport = self.accepted(a)
        found.dataReceived(self.hello(UUID(int=40), address="127.0.0.1:7991"))
        self.assertEqual(found.state, OPEN)
        self.assertNotIn("127.0.0.1:7990", a.mesh.dialers)
        self.assertEqual(a.mesh.peers[UUID(int=40)].address, "127.0.0.1:7991")

    def test_dial_attempts_are_bounded(self) -> None:
        """Invented nodes are dialed in turns: over two minutes, at most 8 attempts a second, not 1,024 at once."""
        a = self.node(0)
        self.flood(a)
        self.clock.pump([1.0] * 120)
        attempts = len(self.clock.tcpClients)
        self.assertGreater(attempts, MAX_UNKNOWN_DIALS, "the turns move on")
        self.assertLessEqual(attempts, MAX_UNKNOWN_DIALS * 120)
        self.assertLessEqual(len(a.mesh.dialers), MAX_UNKNOWN_DIALS)

    def test_invented_nodes_are_not_passed_on(self) -> None:
        """A node tells its peers only of nodes it has linked with."""
        a = self.node(0)
        self.flood(a, count=10)
        link, transport = self.accepted(a)
        link.dataReceived(self.hello(UUID(int=7)))
        self.end_turn()
        told = [p.node for f in frames_in(transport.value()) if isinstance(f, Peers) for p in f.peers]
        self.assertEqual(told, [UUID(int=9)])

    def test_addresses_that_cannot_be_nodes(self) -> None:
        """A node off loopback dials no gossiped loopback address, and none dials an unspecified or multicast one."""
        a = self.node(0, advertise="10.1.2.3:7100")
        link, _transport = self.accepted(a)
        link.dataReceived(self.hello(UUID(int=9)))
        told = [Peer(UUID(int=20), "127.0.0.1:22"), Peer(UUID(int=21), "localhost:22"),
                Peer(UUID(int=22), "0.0.0.0:7946"), Peer(UUID(int=23), "224.0.0.1:7946"),
                Peer(UUID(int=24), "10.1.2.4:7946")]
        link.dataReceived(frame(encode_peers(told), MAX_FRAME))
        self.assertEqual({p.node for p in a.mesh.peers.values() if not p.linked}, {UUID(int=24)})
        self.assertEqual(list(a.mesh.dialers), ["10.1.2.4:7946"])


class HelloDeadlineTests(TrustTestCase):
    require_ids = False

    def test_trickling_listener_side(self) -> None:
        """A peer that trickles its LinkHello a byte a second is closed hello_timeout after it connected."""
        a = self.node(0, hello_timeout=10.0)
        link, transport = self.accepted(a)
        hello = self.hello(UUID(int=9))
        for i in range(9):
            self.clock.advance(1.0)
            link.dataReceived(hello[i:i + 1])
        self.assertEqual(link.state, AWAITING_HELLO)
        self.clock.advance(1.0)
        self.assertEqual(link.state, CLOSING)
        self.assertEqual(frames_in(transport.value()), [Goodbye(GoodbyeCode.HeartbeatTimeout,
                                                                "no LinkHello within 10.0s")])
        self.assertTrue(transport.disconnecting)

    def test_trickling_dialer_side(self) -> None:
        """A dialer whose peer trickles bytes and never answers its LinkHello closes at hello_timeout."""
        a = self.node(0, hello_timeout=4.0)
        link = LinkFactory(a.mesh, dialed=True, address="127.0.0.1:7999").buildProtocol(None)
        transport = _transport()
        link.makeConnection(transport)
        self.clock.advance(3.5)
        link.dataReceived(b"\0")
        self.assertEqual(link.state, HELLO_SENT)
        self.clock.advance(0.5)
        self.assertEqual(link.state, CLOSING)
        self.assertEqual(frames_in(transport.value())[-1].reason, "no LinkHello within 4.0s")

    def test_slow_tls_handshake(self) -> None:
        """The deadline counts from the connection: a TLS handshake trickled in does not outlast it."""
        a = self.node(0, hello_timeout=5.0)
        listener = self.listener(a).buildProtocol(None)
        transport = _transport()
        listener.makeConnection(transport)
        client = self.raw_client("n3").buildProtocol(None)
        client.makeConnection(_transport())
        client_hello = client.transport.value()
        for i in range(5):
            self.clock.advance(1.0)
            if listener.wrappedProtocol.state != AWAITING_HELLO:
                break
            listener.dataReceived(client_hello[i:i + 1])
        self.assertEqual(listener.wrappedProtocol.state, CLOSING)

    def test_opened_link_has_no_deadline(self) -> None:
        """A link that opened in time stays open past hello_timeout."""
        a = self.node(0, hello_timeout=2.0, heartbeat_timeout=50.0)
        link, _transport = self.accepted(a)
        link.dataReceived(self.hello(UUID(int=9)))
        self.clock.pump([1.0] * 5)
        self.assertEqual(link.state, OPEN)


def _transport():
    from twisted.internet.testing import StringTransport

    return StringTransport()


class SettingsTests(TrustTestCase):
    def test_mesh_keys(self) -> None:
        """The [mesh] keys of these bounds parse, and bad values are refused naming the key."""
        base = {"cluster": "c", "listen": "tcp:7946:interface=127.0.0.1", "ca": "ca.pem", "cert": "n.pem",
                "key": "n.key"}
        mesh = parse({"mesh": {**base, "require_node_id_in_cert": False, "hello_timeout": 3, "max_sequence_gap": 0,
                               "max_peer_channels": 5, "max_peer_interest_bytes": 8192}}, Path("m.toml")).mesh
        self.assertEqual((mesh.require_node_id_in_cert, mesh.hello_timeout, mesh.max_sequence_gap,
                          mesh.max_peer_channels, mesh.max_peer_interest_bytes), (False, 3.0, 0, 5, 8192))
        defaults = parse({"mesh": base}, Path("m.toml")).mesh
        self.assertEqual((defaults.require_node_id_in_cert, defaults.hello_timeout, defaults.max_sequence_gap,
                          defaults.max_peer_channels, defaults.max_peer_interest_bytes),
                         (True, 10.0, 1 << 24, 100_000, 16 << 20))
        with self.assertRaises(ConfigError) as raised:
            parse({"mesh": {**base, "hello_timeout": 0}}, Path("m.toml"))
        self.assertIn("mesh.hello_timeout", str(raised.exception))


class LoopbackTrustTests(MeshTestCase):
    async def test_impostor_cannot_blackhole_a_node(self) -> None:
        """Over real TLS, a certified peer claiming another node's id and sending sequence 2^64-1 is refused,
        and that node's events keep arriving."""
        logged: list[str] = []
        observer = lambda e: logged.append(formatEvent(e))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        a, b = await self.cluster_of(2)
        sub = await self.client_of(a)
        await sub.subscribe("c")
        await self.interest_settled([a, b], "c", [a])
        pub = await self.client_of(b)
        await pub.publish("c", b"before")
        await self.wait_for(lambda: payloads(sub.received) == [b"before"], "the first event")
        impostor = await self.tls_link(a)  # n5's certificate
        cursors = a.mesh.hello().cursors
        b_id = b.app.node_id
        impostor.transport.write(frame(encode_hello(LinkHello(
            node=b_id, cluster="test", version=MESH_VERSION, address=b.address, incarnation=b.mesh.incarnation,
            cursors=cursors, nonce=1)), MAX_FRAME) + routed(b_id, (1 << 64) - 1))
        await self.wait_for(lambda: impostor.lost is not None, "the impostor's link to close")
        await pub.publish("c", b"after")
        await self.wait_for(lambda: payloads(sub.received) == [b"before", b"after"], "b's next event")
        self.assertEqual(a.app.metrics.mesh_duplicates, 0)
        self.assertTrue(any("but the peer's certificate is node" in line for line in logged), "logged")

    async def test_freed_interest_comes_back(self) -> None:
        """Interest a node freed after its peer stayed away past queue_max_seconds is sent again when it relinks."""
        a, b = await self.cluster_of(2, queue_max_seconds=0.5)
        sub = await self.client_of(b)
        await sub.subscribe("news")
        await self.interest_settled([a, b], "news", [b])
        await b.app.mesh.stopService()
        await self.wait_for(lambda: a.mesh.peers[b.app.node_id].interests == set(), "a to free b's interest")
        b.app.mesh.startService()
        await self.interest_settled([a, b], "news", [b])
        pub = await self.client_of(a)
        await pub.publish("news", b"again")
        await self.wait_for(lambda: payloads(sub.received) == [b"again"], "delivery")
