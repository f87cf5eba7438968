# -*- test-case-name: tests.test_workers tests.test_worker_processes -*-
"""``[node] workers = N``: one ``twistd meshd`` serving a host's clients from N processes.

A node is one CPython process, so one core.  With ``workers`` above 1 the
process twistd runs is a *supervisor* (:class:`Supervisor`): it serves no
client itself, but starts N worker processes, each a whole node with its
own node id (:func:`~meshd.mesh.local.worker_node_id`), restarts one that
dies, and stops them all on SIGTERM, each draining its sessions as a node
does.  What the workers share:

- **the listeners**: every worker listens on the WebSocket (and web and API)
  ports with ``SO_REUSEPORT``, and the kernel spreads new connections over
  the workers listening (:func:`meshd.listening.listen_shared`).  The
  supervisor holds each port bound, not listening, so that a port 0 becomes
  one port for all, and the port stays the host's while workers restart;
- **the mesh**: workers link with each other over Unix sockets in a
  directory only the node's user may enter (:mod:`meshd.mesh.local`), and
  each joins the rest of the cluster as a node of its own, on the mesh port
  plus its index;
- **the metrics**: each worker serves its metrics on a Unix socket, and the
  supervisor serves them all on ``metrics.listen``, each sample labelled
  with its ``worker`` (:mod:`meshd.hostmetrics`).

The supervisor tells its workers where everything is in a plan
(:class:`Plan`), a JSON file in that directory; a worker's command line is
the supervisor's with ``--worker DIRECTORY:INDEX`` added.  Each worker's
log events come to the supervisor as JSON lines, and it logs them as its
own, with a ``worker`` field.

A worker's lifecycle is a state machine (Automat), owned by
:class:`WorkerProcess`::

    state     input     next      what happens
    --------  --------  --------  ---------------------------------------------------
    idle      start     running   spawn the process
    running   exited    waiting   log how it ended; restart at once if it ran
                                  RESTART_THRESHOLD seconds or more, else after a
                                  delay doubling from RESTART_DELAY to RESTART_MAX_DELAY
    waiting   due       running   spawn the process again
    running   stop      stopping  SIGTERM (it drains); SIGKILL kill_after seconds later
    stopping  exited    stopped   stopped() fires
    waiting,  stop      stopped   the restart is cancelled; stopped() fires
      idle
    stopping  stop      stopping  nothing (one stop is under way; it fires stopped() for both)
    stopped   stop      stopped   stopped() fires
    stopped   start     running   spawn the process
    stopping  start     stopping  nothing: the stop goes on
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Protocol as TypingProtocol
from uuid import UUID

from automat import TypeMachineBuilder
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from meshd.config import Config, split_endpoint
from meshd.listening import shared_socket, tcp_address
from meshd.mesh.local import Siblings

#: A worker that ran this long before it died is restarted at once.
RESTART_THRESHOLD = 5.0
#: A worker that dies sooner is restarted after a delay that doubles from this...
RESTART_DELAY = 0.5
#: ...up to this.
RESTART_MAX_DELAY = 30.0
#: Seconds a worker is given past its drain before it is killed.
KILL_MARGIN = 15.0
#: The name of the plan in the workers' directory.
PLAN = "plan.json"


# -- the plan: what the supervisor tells its workers ----------------------------------


@dataclass(frozen=True)
class Plan:
    """Where the workers of a host listen and link; written by the supervisor, read by each worker.

    ``listen``, ``web_listen`` and ``api_listen`` are the configured
    endpoints with the ports the supervisor holds (a port 0 resolved).
    """

    host: str
    count: int
    listen: tuple[str, ...]
    web_listen: Optional[str] = None
    api_listen: Optional[str] = None

    def write(self, directory: Path) -> None:
        path = directory / PLAN
        path.write_text(json.dumps(asdict(self)), encoding="utf-8")

    @classmethod
    def read(cls, directory: Path) -> "Plan":
        data = json.loads((directory / PLAN).read_text(encoding="utf-8"))
        data["listen"] = tuple(data["listen"])
        return cls(**data)

    def siblings(self, directory: Path, index: int) -> Siblings:
        return Siblings(UUID(self.host), index, self.count, directory)

    def adapt(self, config: Config, directory: Path, index: int) -> Config:
        """Worker ``index``'s configuration: ``config`` with the plan's ports, its own mesh port and name,
        and its metrics on a Unix socket for the supervisor (see the module)."""
        mesh = config.mesh
        if mesh is not None:
            mesh = replace(mesh, listen=offset_port(mesh.listen, index), advertise=offset_port(mesh.advertise, index))
        api = config.api
        if api is not None and self.api_listen is not None:
            api = replace(api, listen=self.api_listen)
        return replace(
            config,
            listen=self.listen,
            web_listen=self.web_listen if self.web_listen is not None else config.web_listen,
            api=api,
            mesh=mesh,
            metrics_listen=f"unix:{metrics_path(directory, index)}:mode=600" if config.metrics_listen else None,
            node_name=f"{config.node_name or 'worker'}/{index}",
            workers=1,
        )


def metrics_path(directory: Path, index: int) -> Path:
    """Where worker ``index`` serves its metrics, for the supervisor."""
    return directory / f"metrics-{index}.sock"


def offset_port(address: str, offset: int) -> str:
    """``address`` (an endpoint description or ``HOST:PORT``) with its port plus ``offset``; a port 0 stays 0."""
    parts = split_endpoint(address)
    if parts[0].lower() in ("tcp", "tcp6", "ssl"):
        for i, part in enumerate(parts[1:], 1):
            key, named, value = part.partition("=")
            if named and key != "port":
                continue
            port = value if named else key
            if port.isdigit() and int(port) and offset:
                parts[i] = f"{'port=' if named else ''}{int(port) + offset}"
            break
        return ":".join([parts[0], *(p.replace(":", "\\:") for p in parts[1:])])
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + offset}" if port.isdigit() and int(port) else address


def with_port(description: str, port: int) -> str:
    """A ``tcp:``/``ssl:`` description with its port replaced by ``port``."""
    parts = split_endpoint(description)
    options = [p for p in parts[1:] if "=" in p and not p.startswith("port=")]
    return ":".join([parts[0], str(port), *(p.replace(":", "\\:") for p in options)])


# -- one worker process --------------------------------------------------------------


class _Inputs(TypingProtocol):
    def start(self) -> None:
        "The supervisor starts."

    def exited(self, reason: Failure) -> None:
        "The process ended."

    def due(self) -> None:
        "Its restart is due."

    def stop(self) -> None:
        "The supervisor stops."


class WorkerProcess:
    """One worker: its process, restarted when it dies, and stopped with the supervisor (see the module)."""

    log = Logger(namespace="meshd.workers")

    def __init__(self, index: int, argv: list[str], env: dict[str, str], reactor: Any,
                 kill_after: float) -> None:
        self.index = index
        self.argv = argv
        self.env = env
        self.reactor = reactor
        self.kill_after = kill_after
        self.state = "idle"
        #: The process running now, if any.
        self.process: Any = None
        #: How many times it was started.
        self.starts = 0
        self._started_at = 0.0
        self._delay = RESTART_DELAY
        self._restart: Any = None
        self._kill: Any = None
        self._waiters: list[Deferred] = []
        self._machine = _WorkerMachine(self)

    # The inputs, for the supervisor.

    def start(self) -> None:
        self._machine.start()

    def stop(self) -> Deferred:
        """Stop the worker; the Deferred fires once its process has ended."""
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        self._machine.stop()
        return waiter

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    # What the machine does.

    def _spawn(self) -> None:
        self.starts += 1
        self._started_at = self.reactor.seconds()
        protocol = _WorkerOutput(self)
        try:
            self.process = self.reactor.spawnProcess(protocol, self.argv[0], self.argv, env=self.env)
        except OSError:  # it never started: as if it ended at once (Automat runs this input next)
            self._machine.exited(Failure())
            return
        self.log.info("Started worker {worker} (pid {pid})", worker=self.index, pid=self.process.pid)

    def _ended(self, reason: Failure) -> None:
        self.process = None
        lived = self.reactor.seconds() - self._started_at
        if lived >= RESTART_THRESHOLD:
            delay, self._delay = 0.0, RESTART_DELAY
        else:
            delay, self._delay = self._delay, min(self._delay * 2, RESTART_MAX_DELAY)
        self.log.warn("Worker {worker} ended ({how}) after {lived:.1f}s; restarting it in {delay:.1f}s",
                      worker=self.index, how=_how(reason), lived=lived, delay=delay)
        self._restart = self.reactor.callLater(delay, self._machine.due)

    def _terminate(self) -> None:
        self.send_signal("TERM")
        self._kill = self.reactor.callLater(self.kill_after, self._killed)

    def _killed(self) -> None:
        self._kill = None
        self.log.warn("Worker {worker} did not stop within {seconds:.0f}s: killing it", worker=self.index,
                      seconds=self.kill_after)
        self.send_signal("KILL")

    def send_signal(self, name: str) -> None:
        """Send the worker's process signal ``name`` (``"HUP"``...), if it runs."""
        if self.process is not None:
            try:
                self.process.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def _stopped(self, reason: Optional[Failure]) -> None:
        self.process = None
        for call in (self._restart, self._kill):
            if call is not None and call.active():
                call.cancel()
        self._restart = self._kill = None
        if reason is not None:
            self.log.info("Worker {worker} stopped ({how})", worker=self.index, how=_how(reason))
        self._fire_stopped()

    def _fire_stopped(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)


def _how(reason: Failure) -> str:
    value = reason.value
    status = getattr(value, "status", None)
    code = getattr(value, "exitCode", None)
    sig = getattr(value, "signal", None)
    if sig:
        return f"signal {signal.Signals(sig).name}"
    if code is not None:
        return f"exit status {code}"
    return str(value) if status is None else f"status {status}"


_builder = TypeMachineBuilder(_Inputs, WorkerProcess)
_idle = _builder.state("idle")
_running = _builder.state("running")
_waiting = _builder.state("waiting")
_stopping = _builder.state("stopping")
_stopped = _builder.state("stopped")


def _to(name: str, output: Callable[..., None]) -> Callable[..., None]:
    def enter(inputs: _Inputs, worker: WorkerProcess, *args: object) -> None:
        worker.state = name
        output(worker, *args)

    return enter


for _source in (_idle, _stopped):
    _source.upon(_Inputs.start).to(_running)(_to("running", WorkerProcess._spawn))
_running.upon(_Inputs.exited).to(_waiting)(_to("waiting", WorkerProcess._ended))
_waiting.upon(_Inputs.due).to(_running)(_to("running", WorkerProcess._spawn))
_running.upon(_Inputs.stop).to(_stopping)(_to("stopping", WorkerProcess._terminate))
_stopping.upon(_Inputs.exited).to(_stopped)(_to("stopped", WorkerProcess._stopped))
_stopping.upon(_Inputs.stop).loop()(lambda inputs, worker: None)
_stopping.upon(_Inputs.start).loop()(lambda inputs, worker: None)
for _source in (_waiting, _idle):
    _source.upon(_Inputs.stop).to(_stopped)(_to("stopped", lambda worker: WorkerProcess._stopped(worker, None)))
_stopped.upon(_Inputs.stop).loop()(lambda inputs, worker: worker._fire_stopped())
_WorkerMachine = _builder.build()


class _WorkerOutput(ProcessProtocol):
    """A worker's standard output and error: its log events as JSON lines, logged as the supervisor's own."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self._pending = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._pending.get(childFD, b"") + data).split(b"\n")
        self._pending[childFD] = lines.pop()
        for line in lines:
            relay(line, self.worker.index)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._pending.items():
            if rest:
                relay(rest, self.worker.index)
        self._pending = {}
        self.worker._machine.exited(reason)


_relay_log = Logger(namespace="meshd.workers")
_LEVELS = frozenset(LogLevel.iterconstants())


def relay(line: bytes, worker: int) -> None:
    """Log one line of a worker's output: its event, when it is one of its JSON log lines; else the text."""
    text = line.decode("utf-8", "replace").rstrip("\r")
    if not text.strip():
        return
    try:
        event = eventFromJSON(text)
    except (ValueError, TypeError):
        event = None
    if not isinstance(event, dict) or "log_text" not in event:
        _relay_log.info("[worker {worker}] {line}", worker=worker, line=text)
        return
    if str(event.get("log_namespace", "")).startswith("twisted.scripts."):
        return  # twistd's own lines (its version, its reactor): the supervisor's say the same
    event.pop("log_failure", None)  # its traceback is in log_text already
    event.pop("log_flattened", None)  # the fields of the worker's format, which is not this one
    if event.get("log_level") not in _LEVELS:
        event["log_level"] = LogLevel.info
    event["log_format"] = "{log_text}"
    event.setdefault("log_time", time.time())  # observers count on it
    event["worker"] = worker
    globalLogPublisher(event)


# -- the supervisor ---------------------------------------------------------------------


class Supervisor(MultiService):
    """Runs a host's workers (see the module): holds the shared ports, writes the plan, starts and
    stops the workers, and serves their metrics together."""

    log = Logger(namespace="meshd.workers")

    def __init__(self, config: Config, argv: list[str], host: UUID, reactor: Any = None,
                 python: str = sys.executable) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.host = host
        self.reactor = reactor
        self.argv = argv
        self.python = python
        self.count = config.workers
        self.directory: Optional[Path] = None
        self.workers: list[WorkerProcess] = []
        #: The sockets that hold the shared ports while the supervisor runs.
        self._held: list = []
        self._stopping: Optional[Deferred] = None
        self._on_stop: list[Callable[[], Any]] = []

    def on_stop(self, call: Callable[[], Any]) -> None:
        """Call ``call`` once every worker has stopped (it may return a Deferred)."""
        self._on_stop.append(call)

    def startService(self) -> None:
        self.directory = _make_directory()
        try:
            plan = self._hold_ports()
        except Exception:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        plan.write(self.directory)
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        kill_after = self.config.drain_seconds + KILL_MARGIN
        self.workers = [
            WorkerProcess(i, self._command(i), env, self.reactor, kill_after) for i in range(self.count)
        ]
        if self.config.metrics_listen:
            from meshd.hostmetrics import serve_host_metrics

            serve_host_metrics(self, self.config.metrics_listen)
        super().startService()
        shared = [f"WebSocket {e}" for e in plan.listen]
        shared += [f"{what} {e}" for what, e in (("web", plan.web_listen), ("API", plan.api_listen)) if e]
        self.log.info("meshd host {host}: {count} workers sharing {shared}", host=self.host, count=self.count,
                      shared=", ".join(shared))
        for worker in self.workers:
            worker.start()

    def _command(self, index: int) -> list[str]:
        """Worker ``index``'s command line: twistd, with this one's meshd options, logging JSON lines."""
        twistd = "from twisted.scripts.twistd import run; run()"
        argv = without_option(without_option(self.argv, "--log-format"), "--worker")
        return [self.python, "-c", twistd, "--nodaemon", "--pidfile=", "--logfile=-", "meshd", *argv,
                "--log-format", "json", "--worker", f"{self.directory}:{index}"]

    def _hold_ports(self) -> Plan:
        """Bind each shared listener's port, so that a port 0 becomes one port for every worker."""
        config = self.config
        listen = tuple(self._hold(e) for e in config.listen)
        web = self._hold(config.web_endpoint) if config.web_endpoint else None
        api = self._hold(config.api.listen) if config.api is not None else None
        return Plan(host=str(self.host), count=self.count, listen=listen, web_listen=web, api_listen=api)

    def _hold(self, description: str) -> str:
        tcp = description
        if split_endpoint(description)[0].lower() == "ssl":
            from meshd.tls import listener

            tcp = listener(description, None)[0]
        address = tcp_address(tcp)
        if address is None:  # a unix: listener cannot be shared: the workers would take turns
            return description
        interface, port, _ = address
        sock = shared_socket(interface, port)
        self._held.append(sock)
        bound = sock.getsockname()[1]
        return with_port(description, bound) if port == 0 else description

    def reload(self) -> None:
        """Have every worker read its configuration again (each as a node does on SIGHUP)."""
        for worker in self.workers:
            worker.send_signal("HUP")

    def stopService(self) -> Deferred:
        """Stop every worker (each drains), then let the ports go; fires when all have ended."""
        if self._stopping is not None:
            return self._stopping
        self.log.info("meshd host {host} stopping its {count} workers", host=self.host, count=self.count)
        stopping = gatherResults([worker.stop() for worker in self.workers])

        def stopped(_: object) -> Deferred:
            for call in self._on_stop:
                call()
            for sock in self._held:
                sock.close()
            self._held = []
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
            self._stopping = None
            return MultiService.stopService(self) or succeed(None)

        self._stopping = stopping.addBoth(stopped)
        return self._stopping


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without the option ``name`` and its value (``--name VALUE`` or ``--name=VALUE``)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def _make_directory() -> Path:
    """A new directory for the workers' sockets and plan, that only this user may enter.

    In ``$RUNTIME_DIRECTORY`` when systemd gives one, else in the temporary directory.
    """
    parent = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    path = Path(tempfile.mkdtemp(prefix="meshd-workers-", dir=parent))
    os.chmod(path, 0o700)
    return path


# -- in a worker ------------------------------------------------------------------------


def worker_place(value: str) -> tuple[Path, int]:
    """``--worker DIRECTORY:INDEX``, as a path and an index; ValueError if it is not one."""
    directory, _, index = value.rpartition(":")
    if not directory or not index.isdigit():
        raise ValueError(f"expected DIRECTORY:INDEX, got {value!r}")
    return Path(directory), int(index)


class StopOnce:
    """How a host's processes take signals: a stop once, however many signals ask for it.

    A terminal's Ctrl-C reaches every process of its group, and a service
    manager (or ``timeout``) may signal every process of the service, or the
    same one twice: Twisted would try to stop a reactor that is stopping
    already, and log a traceback.  Here the first SIGTERM (or SIGINT) stops
    the reactor and later ones do nothing.  In a worker (``worker=True``),
    SIGINT is ignored, since its supervisor stops it; and a worker whose
    supervisor is gone (killed: nothing else would stop the worker) stops.
    """

    log = Logger(namespace="meshd.workers")

    def __init__(self, reactor: Any, worker: bool, interval: float = 1.0) -> None:
        self.reactor = reactor
        self.worker = worker
        self.parent = os.getppid()
        self._stopping = False
        self._loop = None
        if worker:
            from twisted.internet.task import LoopingCall

            self._loop = LoopingCall(self._check)
            self._loop.clock = reactor
            self._loop.start(interval, now=False)
        # After Twisted's own handlers, which it installs as the reactor starts.
        reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        stop = lambda *_: self.reactor.callFromThread(self.stop)  # noqa: E731
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN if self.worker else stop)

    def stop(self) -> None:
        if self._stopping or not self.reactor.running:
            return
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.log.info("Stopping: a signal asked for it")
        self.reactor.stop()

    def _check(self) -> None:
        if os.getppid() != self.parent:
            self.log.warn("The supervisor (pid {pid}) is gone: this worker stops", pid=self.parent)
            self.stop()
