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
        self.assertIn(worker_node_id(host, 0), places[1].dialed())
        self.assertNotIn(worker_node_id(host, 1), places[0].dialed())
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

    async def test_a_worker_is_ready_once_linked_with_every_other_worker(self) -> None:
        from meshd.metrics import Health

        host, directory = uuid4(), self.socket_dir()
        first = await self.start_worker(Siblings(host, 0, 3, directory))
        self.assertEqual(Health(first.app).not_ready().get("workers"), "not linked yet with workers 1, 2")
        second = await self.start_worker(Siblings(host, 1, 3, directory))
        await self.wait_for(lambda: first.links() == 1, "linked")
        self.assertEqual(Health(first.app).not_ready().get("workers"), "not linked yet with workers 2")
        third = await self.start_worker(Siblings(host, 2, 3, directory))
        await self.wait_for(lambda: third.links() == 2, "linked")
        for node in (first, second, third):
            self.assertNotIn("workers", Health(node.app).not_ready())

    async def test_a_local_link_must_claim_a_workers_id(self) -> None:
        """A process of this user that reaches the socket but claims another node id is refused."""
        host, directory = uuid4(), self.socket_dir()
        await self.start_worker(Siblings(host, 0, 1, directory))
        stranger = await self.start_worker(Siblings(uuid4(), 1, 2, directory))  # another host's worker 1
        await self.wait_for(lambda: stranger.app.metrics.mesh_refusals > 0, "the refusal")
        self.assertEqual(stranger.links(), 0)


# -- the supervisor's parts, without processes ------------------------------------------

from twisted.internet.error import ProcessDone, ProcessTerminated  # noqa: E402
from twisted.internet.testing import MemoryReactorClock  # noqa: E402
from twisted.logger import LogLevel, globalLogPublisher  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from meshd.config import MeshSettings, ApiSettings  # noqa: E402
from meshd.workers import (  # noqa: E402
    RESTART_DELAY,
    RESTART_MAX_DELAY,
    RESTART_THRESHOLD,
    Plan,
    WorkerProcess,
    offset_port,
    relay,
    with_port,
    without_option,
)


class _Process:
    """What spawnProcess returns: a pid, and the signals sent to it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class ProcessReactor(MemoryReactorClock):
    """A memory reactor that records the processes it is asked to spawn."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[object, list[str], _Process]] = []

    def spawnProcess(self, protocol, executable, args, env=None, path=None, uid=None, gid=None,
                     usePTY=False, childFDs=None):
        process = _Process(1000 + len(self.spawned))
        self.spawned.append((protocol, args, process))
        return process


def _died(signal_name: str = "KILL") -> Failure:
    return Failure(ProcessTerminated(signal={"KILL": 9, "TERM": 15}[signal_name]))


class WorkerLifecycleTests(unittest.TestCase):
    def worker(self, kill_after: float = 25.0) -> tuple[WorkerProcess, ProcessReactor]:
        reactor = ProcessReactor()
        return WorkerProcess(0, ["python", "-c", "pass"], {}, reactor, kill_after), reactor

    def end(self, reactor: ProcessReactor, reason: Failure) -> None:
        protocol = reactor.spawned[-1][0]
        protocol.processEnded(reason)

    def test_a_worker_that_ran_long_is_restarted_at_once(self) -> None:
        worker, reactor = self.worker()
        worker.start()
        self.assertEqual((worker.state, len(reactor.spawned)), ("running", 1))
        reactor.advance(RESTART_THRESHOLD + 1)
        self.end(reactor, _died())
        self.assertEqual(worker.state, "waiting")
        reactor.advance(0)
        self.assertEqual((worker.state, len(reactor.spawned), worker.starts), ("running", 2, 2))

    def test_a_worker_that_dies_young_is_restarted_later_and_later(self) -> None:
        worker, reactor = self.worker()
        worker.start()
        delays = []
        for _ in range(8):
            self.end(reactor, _died())
            before = len(reactor.spawned)
            waited = 0.0
            while len(reactor.spawned) == before:
                reactor.advance(0.25)
                waited += 0.25
            delays.append(waited)
        self.assertEqual(delays[:4], [RESTART_DELAY, RESTART_DELAY * 2, RESTART_DELAY * 4, RESTART_DELAY * 8])
        self.assertEqual(max(delays), RESTART_MAX_DELAY)
        # A run past the threshold resets the delay.
        reactor.advance(RESTART_THRESHOLD)
        self.end(reactor, _died())
        reactor.advance(0)
        self.assertEqual(worker.state, "running")

    def test_stop_sends_term_then_kill_and_fires_once_it_ended(self) -> None:
        worker, reactor = self.worker(kill_after=20)
        worker.start()
        process = reactor.spawned[-1][2]
        stopped = worker.stop()
        self.assertEqual((worker.state, process.signals), ("stopping", ["TERM"]))
        self.assertNoResult(stopped)
        reactor.advance(20)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.end(reactor, _died("KILL"))
        self.successResultOf(stopped)
        self.assertEqual(worker.state, "stopped")
        reactor.advance(100)
        self.assertEqual(len(reactor.spawned), 1, "a stopped worker is not restarted")

    def test_a_worker_that_stops_in_time_is_not_killed(self) -> None:
        worker, reactor = self.worker(kill_after=20)
        worker.start()
        process = reactor.spawned[-1][2]
        stopped = worker.stop()
        self.end(reactor, Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        reactor.advance(30)
        self.assertEqual(process.signals, ["TERM"])
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_stop_while_waiting_to_restart_cancels_the_restart(self) -> None:
        worker, reactor = self.worker()
        worker.start()
        self.end(reactor, _died())
        self.assertEqual(worker.state, "waiting")
        self.successResultOf(worker.stop())
        self.assertEqual(worker.state, "stopped")
        reactor.advance(100)
        self.assertEqual(len(reactor.spawned), 1)

    def test_a_second_stop_waits_for_the_first(self) -> None:
        worker, reactor = self.worker()
        worker.start()
        first, second = worker.stop(), worker.stop()
        self.assertEqual(reactor.spawned[-1][2].signals, ["TERM"])
        self.end(reactor, Failure(ProcessDone(0)))
        self.successResultOf(first)
        self.successResultOf(second)


    def test_a_worker_that_cannot_be_spawned_is_tried_again_later(self) -> None:
        worker, reactor = self.worker()
        attempts = []

        def refuse(*args, **kwargs):
            attempts.append(reactor.seconds())
            raise OSError(2, "No such file or directory")

        reactor.spawnProcess = refuse
        worker.start()
        self.assertEqual(worker.state, "waiting")
        reactor.advance(RESTART_DELAY)
        reactor.advance(RESTART_DELAY * 2)
        self.assertEqual(attempts, [0, RESTART_DELAY, RESTART_DELAY * 3])
        self.successResultOf(worker.stop())


class PlanTests(unittest.TestCase):
    def test_ports_and_endpoints(self) -> None:
        self.assertEqual(offset_port("tcp:7946:interface=127.0.0.1", 2), "tcp:7948:interface=127.0.0.1")
        self.assertEqual(offset_port("tcp:port=7946:interface=\\:\\:1", 1), "tcp:port=7947:interface=\\:\\:1")
        self.assertEqual(offset_port("tcp:0:interface=127.0.0.1", 3), "tcp:0:interface=127.0.0.1")
        self.assertEqual(offset_port("10.0.0.1:7946", 2), "10.0.0.1:7948")
        self.assertEqual(offset_port("[::1]:7946", 1), "[::1]:7947")
        self.assertEqual(offset_port("10.0.0.1:0", 1), "10.0.0.1:0")
        self.assertEqual(with_port("tcp:0:interface=127.0.0.1", 8765), "tcp:8765:interface=127.0.0.1")
        self.assertEqual(with_port("ssl:port=0:privateKey=/k\\:x.pem:interface=127.0.0.1", 443),
                         "ssl:443:privateKey=/k\\:x.pem:interface=127.0.0.1")

    def test_without_option(self) -> None:
        self.assertEqual(without_option(["--log-format", "json", "--x", "--log-format=text", "a"], "--log-format"),
                         ["--x", "a"])

    def test_a_workers_configuration(self) -> None:
        directory = Path("/run/meshd/w")
        mesh = MeshSettings(cluster="c", listen="tcp:7946:interface=10.0.0.1", advertise="10.0.0.1:7946",
                            ca=Path("ca"), cert=Path("c"), key=Path("k"), seeds=("10.0.0.2:7946",))
        config = Config(node_name="edge", listen=("tcp:0:interface=0.0.0.0",), metrics_listen="tcp:9100",
                        mesh=mesh, api=ApiSettings(listen="tcp:0", keys={"a": "b" * 32}), workers=4)
        plan = Plan(host=str(uuid4()), count=4, listen=("tcp:8765:interface=0.0.0.0",), api_listen="tcp:8780")
        adapted = plan.adapt(config, directory, 2)
        self.assertEqual(adapted.listen, ("tcp:8765:interface=0.0.0.0",))
        self.assertEqual(adapted.api.listen, "tcp:8780")
        self.assertEqual((adapted.mesh.listen, adapted.mesh.advertise), ("tcp:7948:interface=10.0.0.1", "10.0.0.1:7948"))
        self.assertEqual(adapted.mesh.seeds, ("10.0.0.2:7946",))
        self.assertEqual(adapted.metrics_listen, "unix:/run/meshd/w/metrics-2.sock:mode=600")
        self.assertEqual((adapted.node_name, adapted.workers), ("edge/2", 1))
        siblings = plan.siblings(directory, 2)
        self.assertEqual((siblings.index, siblings.count, str(siblings.host)), (2, 4, plan.host))

    def test_the_plan_is_read_back_as_written(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        plan = Plan(host=str(uuid4()), count=2, listen=("tcp:1:interface=127.0.0.1",), web_listen="tcp:2")
        plan.write(directory)
        self.assertEqual(Plan.read(directory), plan)


class RelayTests(unittest.TestCase):
    def relayed(self, line: bytes) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        relay(line, 3)
        return events

    def test_a_workers_event_is_logged_with_its_level_text_and_worker(self) -> None:
        from twisted.logger import formatEvent

        from meshd.logs import _json_line

        line = _json_line({"log_level": LogLevel.warn, "log_format": "odd {thing}", "thing": "x",
                           "log_namespace": "meshd.app", "node_id": "n1"}).encode()
        [event] = self.relayed(line.rstrip(b"\n"))
        self.assertEqual((event["log_level"], event["worker"], event["node_id"]), (LogLevel.warn, 3, "n1"))
        self.assertEqual(formatEvent(event), "odd x")

    def test_other_output_is_logged_as_text(self) -> None:
        [event] = self.relayed(b"Traceback (most recent call last):")
        self.assertEqual(event["worker"], 3)
        self.assertIn("Traceback", event["line"])

    def test_twistds_own_lines_are_left_out(self) -> None:
        from meshd.logs import _json_line

        line = _json_line({"log_level": LogLevel.info, "log_format": "twistd starting",
                           "log_namespace": "twisted.scripts._twistd_unix.UnixAppLogger"}).encode()
        self.assertEqual(self.relayed(line.rstrip(b"\n")), [])


class CheckTests(unittest.TestCase):
    def test_workers_cannot_share_a_unix_listener(self) -> None:
        from meshd.tap import check

        config = Config(listen=("unix:/tmp/meshd-x.sock", "tcp:0:interface=127.0.0.1"), workers=2)
        [problem] = check(config)
        self.assertIn("websocket.listen: 'unix:/tmp/meshd-x.sock' is a unix: socket", problem)
        self.assertEqual(check(Config(listen=("unix:/tmp/meshd-x.sock",), workers=1)), [])

    def test_workers_key_and_flag(self) -> None:
        from meshd.config import ConfigError, auto_workers, parse

        self.assertEqual(parse({"node": {"workers": 3}}, Path("m.toml")).workers, 3)
        self.assertEqual(parse({"node": {"workers": "auto"}}, Path("m.toml")).workers, auto_workers())
        for bad in (0, 257, "many", True, 1.5):
            with self.assertRaises(ConfigError) as caught:
                parse({"node": {"workers": bad}}, Path("m.toml"))
            self.assertIn("m.toml: node.workers: must be an integer from 1 to 256", str(caught.exception))
