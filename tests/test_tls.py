"""TLS: WebSocket clients over wss://, and mesh links that do not meet the TLS rules."""

from __future__ import annotations

import ssl
import warnings
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS

from meshd.client import connect
from meshd.config import Config
from meshd.mesh.certs import create_ca, issue_node

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
        issue_node(d, "elsewhere", ["10.9.8.7"])  # valid CA, wrong name
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
