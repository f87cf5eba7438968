"""Mesh refusals: each is logged with its reason and reaches neither the peers nor the registry."""

from __future__ import annotations

import datetime
import struct
import uuid
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import globalLogPublisher, formatEvent

from meshd.mesh.certs import create_ca, issue_node
from meshd.mesh.framing import frame
from meshd.mesh.wire import LinkHello, encode_hello

from .meshsupport import MeshTestCase, Recorder


class RefusalTests(MeshTestCase):
    def setUp(self) -> None:
        self.logged: list[str] = []

        def observe(event) -> None:
            if event.get("log_namespace", "").startswith("meshd.mesh"):
                self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    async def target(self):
        node = await self.start_mesh_node(self.settings(0))
        self.watcher = await self.client_of(node)
        await self.watcher.subscribe("watched")
        return node

    async def assert_refused(self, node, words: str) -> None:
        await self.wait_for(lambda: any(words in line for line in self.logged), f"a log line with {words!r}")
        # A connection can become a peer only while it is open; a dialer's next attempt comes after a pause.
        await self.wait_for(lambda: not node.mesh.links, "no connection open at the node")
        self.assertEqual(node.mesh.peers, {}, "a refused node never becomes a peer")
        self.assertEqual(node.links(), 0)
        self.assertGreater(node.app.metrics.mesh_refusals, 0)
        self.assertEqual(node.app.metrics.mesh_routed_received, 0)
        if hasattr(self, "watcher"):
            await self.settle(self.watcher)
            self.assertEqual(self.watcher.received, [], "nothing reached a session")

    async def test_certificate_from_another_ca(self) -> None:
        """A node whose certificate another CA signed is refused by the TLS handshake."""
        node = await self.target()
        other = Path(self.mktemp()).resolve()
        other.mkdir()
        create_ca(other, "impostors")
        issue_node(other, "x", ["127.0.0.1"], node_id=uuid.uuid4())
        settings = self.settings(1, [node.address], cert=other / "x.pem", key=other / "x.key")
        await self.start_mesh_node(settings)
        await self.assert_refused(node, "closed before linking: TLS: certificate verify failed")

    async def test_server_certificate_from_another_ca(self) -> None:
        """Dialing a node whose certificate another CA signed fails on the dialer's side."""
        other = Path(self.mktemp()).resolve()
        other.mkdir()
        create_ca(other, "impostors")
        issue_node(other, "x", ["127.0.0.1"], node_id=uuid.uuid4())
        impostor = await self.start_mesh_node(
            self.settings(1, ca=other / "ca.pem", cert=other / "x.pem", key=other / "x.key")
        )
        node = await self.start_mesh_node(self.settings(0, [impostor.address]))
        await self.assert_refused(node, "certificate verify failed")

    async def test_expired_certificate(self) -> None:
        """A certificate past its end date is refused."""
        node = await self.target()
        d = self.certs()
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)
        issue_node(d, "expired", ["127.0.0.1"], not_before=past - datetime.timedelta(days=30),
                   not_after=past, node_id=uuid.uuid4())
        await self.start_mesh_node(self.settings(1, [node.address], cert=d / "expired.pem", key=d / "expired.key"))
        await self.assert_refused(node, "closed before linking: TLS: certificate verify failed")
        # The node tells the dialer why, in a TLS alert.
        await self.wait_for(lambda: any("certificate expired" in line for line in self.logged), "the alert")

    async def test_plaintext(self) -> None:
        """A plaintext connection, even one speaking the mesh protocol, is refused."""
        node = await self.target()
        host, port = node.address.split(":")
        factory = Factory.forProtocol(Recorder)
        hello = LinkHello(node=node.app.node_id, cluster="test", version=1)
        proto = await TCP4ClientEndpoint(reactor, host, int(port)).connect(factory)
        proto.transport.write(frame(encode_hello(hello), 1 << 20))
        await self.wait_for(lambda: proto.lost is not None, "the node to close the connection")
        await self.assert_refused(node, "closed before linking: TLS:")

    async def test_wrong_cluster(self) -> None:
        """A node of another cluster is told why and refused."""
        node = await self.target()
        await self.start_mesh_node(self.settings(1, [node.address], cluster="other"))
        await self.assert_refused(node, "cluster 'other' is not 'test'")

    async def test_malformed_frame(self) -> None:
        """Garbage inside a valid TLS link is a protocol violation: Goodbye, then close."""
        node = await self.target()
        proto = await self.tls_link(node)
        proto.transport.write(struct.pack(">I", 8) + b"garbage!")
        await self.wait_for(lambda: proto.lost is not None, "the node to close the link")
        self.assertIn(b"malformed frame", proto.received, "the Goodbye says why")
        await self.assert_refused(node, "protocol violation: malformed frame")

    async def test_oversize_frame(self) -> None:
        """A frame announced over max_frame_size is refused before it is read."""
        node = await self.target()
        proto = await self.tls_link(node)
        proto.transport.write(struct.pack(">I", 50_000_000))
        await self.wait_for(lambda: proto.lost is not None, "the node to close the link")
        await self.assert_refused(node, "protocol violation: peer announced a frame")

    async def test_frame_before_hello(self) -> None:
        """A valid frame other than LinkHello first is a violation."""
        from meshd.mesh.wire import encode_heartbeat

        node = await self.target()
        proto = await self.tls_link(node)
        proto.transport.write(frame(encode_heartbeat(0), 1 << 20))
        await self.wait_for(lambda: proto.lost is not None, "the node to close the link")
        await self.assert_refused(node, "Heartbeat before LinkHello")
