"""Workers of one host: node ids, local links over Unix sockets, and shared listeners (in-process)."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from uuid import UUID, uuid4

from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from meshd.app import Application
from meshd.codec import EventType
from meshd.config import Config
from meshd.listening import listen_shared
from meshd.mesh.local import MAX_WORKERS, Siblings, certifies, worker_node_id

from .meshsupport import MeshTestCase, Node, _ALLOW_ALL
from .support import payloads


class NodeIdTests(unittest.TestCase):
    def test_each_worker_has_its_own_id_derived_from_the_hosts(self) -> None:
        host = uuid4()
        ids = {worker_node_id(host, i) for i in range(4)}
        self.assertEqual(len(ids), 4)
        self.assertNotIn(host, ids)
        self.assertEqual(worker_node_id(host, 2), worker_node_id(UUID(str(host)), 2))  # stable

    def test_a_hosts_certificate_vouches_for_its_workers_only(self) -> None:
        host, other = uuid4(), uuid4()
        self.assertTrue(certifies(host, host))
        self.assertTrue(certifies(host, worker_node_id(host, 0)))
        self.assertTrue(certifies(host, worker_node_id(host, MAX_WORKERS - 1)))
        self.assertFalse(certifies(host, worker_node_id(host, MAX_WORKERS)))
        self.assertFalse(certifies(host, worker_node_id(other, 0)))
        self.assertFalse(certifies(host, other))

    def test_the_higher_index_dials(self) -> None:
        host = uuid4()
        places = [Siblings(host, i, 3, Path("/run/x")) for i in range(3)]
        self.assertEqual(places[0].dialed(), {})
        self.assertEqual(set(places[2].dialed()), {worker_node_id(host, 0), worker_node_id(host, 1)})
        self.assertTrue(places[1].dials(worker_node_id(host, 0)))
        self.assertFalse(places[0].dials(worker_node_id(host, 1)))
        self.assertEqual(places[1].ids, {worker_node_id(host, i) for i in range(3)})


class SharedListenerTests(unittest.TestCase):
    def test_two_listeners_share_one_port_and_each_accepts(self) -> None:
        """Two ports listening with SO_REUSEPORT on one address both get connections from the kernel."""
        hold = socket.socket()
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        hold.bind(("127.0.0.1", 0))
        self.addCleanup(hold.close)
        port = hold.getsockname()[1]
        accepted = {"a": 0, "b": 0}

        def factory(name: str) -> Factory:
            class Count(Protocol):
                def connectionMade(self) -> None:
                    accepted[name] += 1

            return Factory.forProtocol(Count)

        ports = [listen_shared(reactor, f"tcp:{port}:interface=127.0.0.1", factory(n)) for n in "ab"]
        for p in ports:
            self.addCleanup(p.stopListening)
        self.assertEqual({p.getHost().port for p in ports}, {port})
        clients = []
        for _ in range(64):  # the kernel picks by a hash of each connection's addresses: both get some
            clients.append(socket.create_connection(("127.0.0.1", port)))
        for c in clients:
            self.addCleanup(c.close)

        def both_accepted():
            from twisted.internet.task import deferLater

            if sum(accepted.values()) == len(clients):
                return None
            return deferLater(reactor, 0.05, both_accepted)

        d = both_accepted()

        def check(_):
            self.assertGreater(accepted["a"], 0)
            self.assertGreater(accepted["b"], 0)

        return d.addCallback(check) if d is not None else check(None)

    def test_a_port_held_without_reuseport_is_refused_by_name(self) -> None:
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        with self.assertRaises(CannotListenError) as caught:
            listen_shared(reactor, f"tcp:{port}:interface=127.0.0.1", Factory.forProtocol(Protocol))
        self.assertEqual(caught.exception.port, port)


class LocalLinkTests(MeshTestCase):
    """Workers of one host, in one process: linked over Unix sockets, with or without [mesh]."""

    def socket_dir(self) -> Path:
        # Unix socket paths are short (108 bytes): not under the test's own directory.
        d = Path(tempfile.mkdtemp(prefix="meshd-w-"))
        os.chmod(d, 0o700)
        self.addCleanup(lambda: [p.unlink() for p in d.iterdir()] and None or d.rmdir())
        return d

    async def start_worker(self, siblings: Siblings, **config) -> Node:
        app = Application(Config(source=Path("test.toml"), rules=_ALLOW_ALL, **config), siblings=siblings)
        app.startService()
        self.addCleanup(app.stopService)
        from twisted.internet.endpoints import TCP4ServerEndpoint

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(app.factory)
        self.addCleanup(port.stopListening)
        return Node(app, f"ws://127.0.0.1:{port.getHost().port}", f"w{siblings.index}")

    async def workers(self, count: int, **config) -> list[Node]:
        host, directory = uuid4(), self.socket_dir()
        nodes = [await self.start_worker(Siblings(host, i, count, directory), **config) for i in range(count)]
        await self.wait_for(lambda: all(n.links() == count - 1 for n in nodes), "workers linked")
        return nodes

    async def test_workers_without_a_mesh_section_link_with_each_other(self) -> None:
        nodes = await self.workers(3)
        for n in nodes:
            self.assertTrue(all(link.local for link in n.mesh.links))
            self.assertEqual(set(n.mesh.peers), {o.app.node_id for o in nodes if o is not n})
        # One link per pair: the higher index dialed it.
        self.assertEqual(sorted(len(n.mesh.dialers) for n in nodes), [0, 1, 2])

    async def test_a_publish_on_one_worker_reaches_subscribers_on_every_worker(self) -> None:
        nodes = await self.workers(3)
        subscribers = [await self.client_of(n) for n in nodes]
        for s in subscribers:
            await s.subscribe("room")
        await self.interest_settled(nodes, "room", nodes)
        publisher = await self.client_of(nodes[1])
        for i in range(20):
            await publisher.publish("room", b"%d" % i)
        await self.wait_for(lambda: all(len(s.received) == 20 for s in subscribers), "every event everywhere")
        for s in subscribers:
            self.assertEqual(payloads(s.received), [b"%d" % i for i in range(20)])

    async def test_distribute_event_crosses_workers(self) -> None:
        nodes = await self.workers(2)
        subscriber = await self.client_of(nodes[0])
        await subscriber.subscribe("d")
        await self.interest_settled(nodes, "d", nodes[:1])
        state = nodes[1].app.state
        state.distribute_event(state.event(EventType.NodeEvent, channel="d", payload=b"hi"))
        await self.wait_for(lambda: payloads(subscriber.received) == [b"hi"], "the distributed event")
        self.assertEqual(subscriber.received[0].node, nodes[1].app.node_id)

    async def test_a_worker_that_restarts_is_linked_again(self) -> None:
        host, directory = uuid4(), self.socket_dir()
        first = await self.start_worker(Siblings(host, 0, 2, directory))
        second = await self.start_worker(Siblings(host, 1, 2, directory))
        await self.wait_for(lambda: first.links() == 1 and second.links() == 1, "linked")
        await first.app.stopService()
        again = await self.start_worker(Siblings(host, 0, 2, directory))
        await self.wait_for(lambda: again.links() == 1 and second.links() == 1, "linked again")

    async def test_a_local_link_must_claim_a_workers_id(self) -> None:
        """A process of this user that reaches the socket but claims another node id is refused."""
        host, directory = uuid4(), self.socket_dir()
        await self.start_worker(Siblings(host, 0, 1, directory))
        stranger = await self.start_worker(Siblings(uuid4(), 1, 2, directory))  # another host's worker 1
        await self.wait_for(lambda: stranger.app.metrics.mesh_refusals > 0, "the refusal")
        self.assertEqual(stranger.links(), 0)
