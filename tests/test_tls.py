"""TLS: WebSocket clients over wss://, and mesh links that do not meet the TLS rules."""

from __future__ import annotations

import ssl
import uuid
import warnings
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.ssl import (
    AcceptableCiphers, Certificate, CertificateOptions, TLSVersion, optionsForClientTLS, trustRootFromCertificates,
)
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from meshd._io import LinkTLSFactory
from meshd.client import connect
from meshd.config import Config
from meshd.mesh.certs import create_ca, issue_node
from meshd.mesh.tls import Credentials

from .meshsupport import MeshTestCase, Recorder
from .support import NodeTestCase, payloads


class SecureWebSocketTests(NodeTestCase):
    async def test_wss(self) -> None:
        """A node listening on an ssl: endpoint serves wss:// clients, and closes them promptly."""
        certs = Path(self.mktemp()).resolve()
        create_ca(certs, "web")
        issue_node(certs, "web", ["127.0.0.1"])
        app = await self.start_node(Config(hello_timeout=0.5))
        endpoint = serverFromString(
            reactor, f"ssl:0:interface=127.0.0.1:privateKey={certs / 'web.key'}:certKey={certs / 'web.pem'}"
        )
        port = await endpoint.listen(app.factory)
        self.addCleanup(port.stopListening)
        ca = Certificate.loadPEM((certs / "ca.pem").read_bytes())
        tls = optionsForClientTLS("127.0.0.1", trustRoot=ca)
        url = f"wss://127.0.0.1:{port.getHost().port}"
        sub = await connect(url, reactor=reactor, tls_options=tls)
        sub.received = []
        sub.add_listener(sub.received.append)
        pub = await connect(url, reactor=reactor, tls_options=tls)
        await sub.subscribe("secure")
        await pub.publish("secure", b"over tls")
        await sub.ping()
        self.assertEqual(payloads(sub.received), [b"over tls"])
        # The node closes a session (hello timeout) and the TLS connection ends within the timeout.
        idle = await connect(url, reactor=reactor, tls_options=tls, hello=False)
        closed = await idle.when_closed().addTimeout(3, reactor)
        self.assertEqual(closed.code, 4001)
        for c in (sub, pub):
            await c.close()


class ClientTLSSuitesTests(NodeTestCase):
    async def test_ssl_listener_offers_aead_suites_only(self) -> None:
        """A node's ssl: listener refuses a TLS 1.2 client that offers only CBC suites, and serves an AEAD one."""
        import socket

        from twisted.internet.threads import deferToThread

        from meshd.tls import listener

        certs = Path(self.mktemp()).resolve()
        create_ca(certs, "web")
        issue_node(certs, "web", ["127.0.0.1"])
        app = await self.start_node()
        description, factory, _tls = listener(
            f"ssl:0:interface=127.0.0.1:privateKey={certs / 'web.key'}:certKey={certs / 'web.pem'}", app.factory)
        self.assertTrue(description.startswith("tcp:0:"), description)
        port = await serverFromString(reactor, description).listen(factory)
        self.addCleanup(port.stopListening)

        def handshake(ciphers: str):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(certs / "ca.pem")
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers(ciphers)
            raw = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
            try:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    return tls.cipher()[0]
            except (ssl.SSLError, ConnectionError, OSError) as e:
                return e

        refused = await deferToThread(handshake, "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")
        self.assertIsInstance(refused, Exception)
        accepted = await deferToThread(handshake, "ECDHE-ECDSA-AES128-GCM-SHA256")
        self.assertEqual(accepted, "ECDHE-ECDSA-AES128-GCM-SHA256")


class MeshTLSRulesTests(MeshTestCase):
    async def connect_tls(self, node, context: ssl.SSLContext):
        """Handshake with the standard library's TLS (in a thread: the node runs on this reactor)."""
        import socket

        from twisted.internet.threads import deferToThread

        host, port = node.address.split(":")

        def handshake():
            raw = socket.create_connection((host, int(port)), timeout=5)
            try:
                with context.wrap_socket(raw, server_hostname=host) as tls:
                    return tls.version()
            except (ssl.SSLError, ConnectionError, OSError) as e:
                return e

        return await deferToThread(handshake)

    async def test_tls_below_1_2_refused(self) -> None:
        """A client that offers only TLS 1.1 cannot link."""
        node = await self.start_mesh_node(self.settings(0))
        d = self.certs()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(d / "ca.pem")
        context.load_cert_chain(d / "n5.pem", d / "n5.key")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
                context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
        except ValueError:
            self.skipTest("this OpenSSL cannot even offer TLS 1.1")
        context.set_ciphers("ALL:@SECLEVEL=0")
        context.options &= ~getattr(ssl, "OP_NO_TLSv1_1", 0)
        result = await self.connect_tls(node, context)
        if isinstance(result, ssl.SSLError) and "NO_PROTOCOLS_AVAILABLE" in str(result).upper().replace(" ", "_"):
            self.skipTest("this OpenSSL cannot offer TLS 1.1 at all")
        self.assertIsInstance(result, ssl.SSLError, f"the handshake gave {result!r}")
        self.assertIn("PROTOCOL_VERSION", str(result).upper().replace(" ", "_"))
        await self.wait_for(lambda: node.app.metrics.mesh_refusals > 0 and not node.mesh.links,
                            "the node to close the connection unlinked")
        self.assertEqual(node.mesh.peers, {})

    async def test_certificate_without_the_dialed_name(self) -> None:
        """A dialer refuses a peer whose certificate does not name the host it dialed."""
        d = self.certs()
        issue_node(d, "elsewhere", ["10.9.8.7"], node_id=uuid.uuid4())  # valid CA, wrong name
        wrong = await self.start_mesh_node(self.settings(1, cert=d / "elsewhere.pem", key=d / "elsewhere.key"))
        node = await self.start_mesh_node(self.settings(0, [wrong.address]))
        # Each attempt ends unlinked at both ends; wait for a second one, after the dialer backed off.
        await self.wait_for(lambda: node.app.metrics.mesh_refusals >= 2 and wrong.app.metrics.mesh_refusals >= 2,
                            "two refusals at each end")
        self.assertEqual((node.links(), wrong.links()), (0, 0))

    async def test_no_client_certificate(self) -> None:
        """A TLS client that presents no certificate is refused."""
        node = await self.start_mesh_node(self.settings(0))
        d = self.certs()
        ca = Certificate.loadPEM((d / "ca.pem").read_bytes())
        host, port = node.address.split(":")
        endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=ca), TCP4ClientEndpoint(reactor, host, int(port)))
        proto = await endpoint.connect(Factory.forProtocol(Recorder))
        await self.wait_for(lambda: proto.lost is not None, "the refusal")
        self.assertEqual(node.mesh.peers, {})


class LinkCipherTests(SynchronousTestCase):
    """Mesh TLS 1.2 is AEAD only, both ways; handshakes pumped in memory."""

    def setUp(self) -> None:
        d = Path(self.mktemp()).resolve()
        create_ca(d, "test")
        for name in ("a", "b"):
            issue_node(d, name, ["127.0.0.1"], node_id=uuid.uuid4())
        self.creds = {name: Credentials.load(d / "ca.pem", d / f"{name}.pem", d / f"{name}.key") for name in "ab"}
        self.clock = Clock()

    def other_side(self, ciphers: str) -> CertificateOptions:
        """A TLS 1.2 peer with a valid certificate that offers only ``ciphers``."""
        creds = self.creds["b"]
        return CertificateOptions(
            privateKey=creds.own.privateKey.original, certificate=creds.own.original,
            trustRoot=trustRootFromCertificates([creds.ca]), lowerMaximumSecurityTo=TLSVersion.TLSv1_2,
            acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(ciphers),
        )

    def handshake(self, client_options, server_options) -> tuple[Recorder, Recorder]:
        client = LinkTLSFactory(client_options, True, Factory.forProtocol(Recorder)).buildProtocol(None)
        server = LinkTLSFactory(server_options, False, Factory.forProtocol(Recorder)).buildProtocol(None)
        pump = iosim.connect(server, iosim.FakeTransport(server, isServer=True),
                             client, iosim.FakeTransport(client, isServer=False), greet=False, clock=self.clock)
        inner = client.wrappedProtocol, server.wrappedProtocol  # a failed handshake forgets them
        pump.flush()
        return inner

    def test_listener_refuses_cbc(self) -> None:
        """A mesh listener refuses a TLS 1.2 client that offers only CBC suites (SHA-1 or SHA-256)."""
        for cbc in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"):
            client, server = self.handshake(self.other_side(cbc), self.creds["a"].server_options())
            self.assertFalse(client.handshaken or server.handshaken, cbc)

    def test_dialer_refuses_cbc(self) -> None:
        """A mesh dialer refuses a TLS 1.2 listener that offers only CBC suites."""
        client, server = self.handshake(self.creds["a"].client_options("127.0.0.1"),
                                        self.other_side("ECDHE-ECDSA-AES128-SHA"))
        self.assertFalse(client.handshaken or server.handshaken)

    def test_aead_suites_link(self) -> None:
        """TLS 1.2 with ECDHE and AES-GCM or ChaCha20-Poly1305 still links, both ways."""
        for aead in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
            client, server = self.handshake(self.other_side(aead), self.creds["a"].server_options())
            self.assertTrue(client.handshaken and server.handshaken, aead)
            client, server = self.handshake(self.creds["a"].client_options("127.0.0.1"), self.other_side(aead))
            self.assertTrue(client.handshaken and server.handshaken, aead)

    def test_tls_1_3_links(self) -> None:
        """A peer that speaks only TLS 1.3 links, both ways."""
        creds = self.creds["b"]
        only_1_3 = CertificateOptions(
            privateKey=creds.own.privateKey.original, certificate=creds.own.original,
            trustRoot=trustRootFromCertificates([creds.ca]), raiseMinimumTo=TLSVersion.TLSv1_3,
        )
        client, server = self.handshake(only_1_3, self.creds["a"].server_options())
        self.assertTrue(client.handshaken and server.handshaken)
        client, server = self.handshake(self.creds["a"].client_options("127.0.0.1"), only_1_3)
        self.assertTrue(client.handshaken and server.handshaken)
