"""Clusters of in-process nodes linked over real TLS on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence
from uuid import UUID, uuid4

from cryptography import x509

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from meshd.app import Application
from meshd.client import MeshClient, connect
from meshd.config import Config, MeshSettings
from meshd.mesh.certs import create_ca, issue_node, node_id_of
from meshd.mesh.tls import Credentials

from .support import NodeTestCase, close_quietly, sleep


def make_certs(directory: Path, names: Sequence[str], cluster: str = "test") -> Path:
    """A cluster CA and a certificate for each name, each naming a node id of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    create_ca(directory, cluster)
    for name in names:
        issue_node(directory, name, ["127.0.0.1", "localhost"], node_id=uuid4())
    return directory


def certified_id(cert: Path) -> Optional[UUID]:
    """The node id a certificate file names (None if none)."""
    return node_id_of(x509.load_pem_x509_certificate(cert.read_bytes()))


class Node:
    def __init__(self, app: Application, url: str, name: str) -> None:
        self.app, self.url, self.name = app, url, name

    @property
    def mesh(self):
        return self.app.mesh

    @property
    def address(self) -> str:
        return self.app.mesh.advertise

    def links(self) -> int:
        return sum(1 for p in self.mesh.peers.values() if p.link is not None)


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """Records what a raw connection receives, whether its TLS handshake is done, and when it is lost."""

    def connectionMade(self) -> None:
        self.received = b""
        self.handshaken = False
        self.lost = None

    def handshakeCompleted(self) -> None:
        self.handshaken = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost = reason


class MeshTestCase(NodeTestCase):
    """Start several nodes that link with each other."""

    cluster = "test"

    def certs(self) -> Path:
        if not hasattr(self, "_certs"):
            self._certs = make_certs(Path(self.mktemp()).resolve(), [f"n{i}" for i in range(6)], self.cluster)
        return self._certs

    def settings(self, index: int, seeds: Sequence[str] = (), port: int = 0, **kw) -> MeshSettings:
        """A node's mesh settings; port 0: the node listens on a free port, and advertises it."""
        d = self.certs()
        values = dict(
            cluster=self.cluster, listen=f"tcp:{port}:interface=127.0.0.1", advertise=f"127.0.0.1:{port}",
            ca=d / "ca.pem", cert=d / f"n{index}.pem", key=d / f"n{index}.key", seeds=tuple(seeds),
            heartbeat_interval=0.2, heartbeat_timeout=2.0, reconnect_max_delay=0.5,
        )
        values.update(kw)
        return MeshSettings(**values)

    async def start_mesh_node(self, settings: MeshSettings, node_id: Optional[UUID] = None,
                              name: str = "", **config) -> Node:
        """A node with these mesh settings; its id is the one its certificate names, unless given."""
        node_id = node_id or certified_id(settings.cert)
        config.setdefault("node_name", name)
        app = Application(Config(source=Path("test.toml"), rules=_ALLOW_ALL, node_id=node_id, mesh=settings, **config))
        app.startService()
        self.addCleanup(app.stopService)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(app.factory)
        self.addCleanup(port.stopListening)
        return Node(app, f"ws://127.0.0.1:{port.getHost().port}", name)

    async def cluster_of(self, count: int, **kw) -> list[Node]:
        """``count`` nodes; each one's only seed is the node before it."""
        nodes: list[Node] = []
        for i in range(count):
            seeds = [nodes[-1].address] if nodes else []
            nodes.append(await self.start_mesh_node(self.settings(i, seeds, **kw), name=f"n{i}"))
        await self.wait_for(lambda: all(n.links() == count - 1 for n in nodes), "full mesh")
        return nodes

    async def wait_for(self, condition, what: str, timeout: float = 15.0) -> None:
        steps = int(timeout / 0.02)
        for _ in range(steps):
            if condition():
                return
            await sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    async def client_of(self, node: Node, token: Optional[str] = None) -> MeshClient:
        client = await connect(node.url, token, reactor=reactor)
        client.received = []  # type: ignore[attr-defined]
        client.add_listener(client.received.append)
        self.addCleanup(close_quietly, client)
        return client

    def certified(self, name: str = "n5") -> UUID:
        """The node id the certificate ``name`` names: what a raw link with it must say it is."""
        return certified_id(self.certs() / f"{name}.pem")

    async def tls_link(self, node: Node, name: str = "n5") -> Recorder:
        """A TLS connection with a valid cluster certificate (``name``'s) that speaks raw frames."""
        d = self.certs()
        creds = Credentials.load(d / "ca.pem", d / f"{name}.pem", d / f"{name}.key")
        host, port = node.address.split(":")
        endpoint = wrapClientTLS(creds.client_options(host), TCP4ClientEndpoint(reactor, host, int(port)))
        return await endpoint.connect(Factory.forProtocol(Recorder))

    async def interest_settled(self, nodes: Sequence[Node], channel: str, holders: Sequence[Node]) -> None:
        """Wait until every node knows which others have subscribers on ``channel``."""
        def settled() -> bool:
            for n in nodes:
                for other in nodes:
                    if other is n:
                        continue
                    peer = n.mesh.peers.get(other.app.node_id)
                    if peer is None or (channel in peer.interests) != (other in holders):
                        return False
            return True

        await self.wait_for(settled, f"interest in {channel!r}")


from meshd.permissions import Rule  # noqa: E402

_ALLOW_ALL = (Rule("*", anonymous=frozenset({"subscribe", "publish", "watch"})),)
