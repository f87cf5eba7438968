# -*- test-case-name: tests.test_config tests.test_checks -*-
"""``twistd meshd``: command-line options, the start-up checks, and the service they build.

A configuration the node would refuse is reported before anything starts,
one line per problem naming the file (or flag) and the key, without
Twisted's usage text: :meth:`Options.postOptions` raises :class:`Refused`, a
``SystemExit`` that twistd lets through.  ``--check-config`` and
``meshctl check-config FILE`` run the same checks (:func:`check_file`,
:func:`check`) and exit.  A listener that cannot be bound when the node
starts is logged as one line naming its key (:func:`_catch_startup_failures`).
"""

from __future__ import annotations

import datetime
import importlib
import re
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional
from uuid import UUID

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python import usage

from meshd.config import Config, ConfigError, check_endpoint, is_loopback, load, parse, split_address

if TYPE_CHECKING:
    from meshd.app import Application

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_log = Logger(namespace="meshd")


class Refused(SystemExit):
    """The node does not start: each problem printed as one line, exit status 1.

    A ``SystemExit`` and not a ``UsageError``, which twistd answers with its
    whole usage text.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"twistd meshd: {p}" for p in problems))


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT ...] [--check-config] [options]"
    longdesc = (
        "Run a meshd node. Without --config the node runs in development mode: "
        "WebSocket on 127.0.0.1:8765, loopback only, every operation allowed. "
        "Flags override the configuration file. --check-config checks the "
        "configuration (the file, the flags, certificates, extension modules) and exits."
    )
    optFlags = [
        ["check-config", None, "Check the configuration as start-up would, print the problems, and exit (0: none)."],
        ["demo", None, "Serve the demo page ([web] demo; on http://localhost:8766/ unless --web or [web] listen say where)."],
    ]
    optParameters = [
        ["config", "c", None, "TOML configuration file (see docs/configuration.md)."],
        ["node-id", None, None, "This node's UUID (default: [node] id, or a new one)."],
        ["node-name", None, None, "A name for this node in logs."],
        ["max-message-size", None, None, "Largest WebSocket message accepted, in bytes."],
        ["metrics", None, None, "Serve Prometheus metrics at /metrics on this endpoint."],
        ["web", None, None, "Serve the browser client (and the demo page with --demo) on this endpoint ([web] listen)."],
        ["mesh-listen", None, None, "Mesh listener endpoint (overrides [mesh] listen)."],
        ["advertise", None, None, "HOST:PORT other nodes dial (overrides [mesh] advertise)."],
        ["log-format", None, "text", "How twistd writes log events: text (Twisted's lines) or json (one object a line)."],
        ["log-level", None, "info", "Lowest level of log events written: debug, info, warn, error or critical."],
        ["workers", None, None, 'Worker processes sharing the listeners: a number, or "auto" for one per core ([node] workers).'],
        ["worker", None, None, "DIRECTORY:INDEX: run as that worker of a host (its supervisor gives it; not for use by hand)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["modules"] = []
        self["seeds"] = []

    def parseOptions(self, options: Optional[list[str]] = None) -> None:
        #: The arguments as given: a host's supervisor gives them to its workers (meshd.workers).
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_version(self) -> None:
        """Display meshd's version and exit."""
        print(version_line())
        sys.exit(0)

    def opt_listen(self, endpoint: str) -> None:
        """WebSocket server endpoint, e.g. tcp:8765:interface=127.0.0.1 (repeatable)."""
        self["listen"].append(endpoint)

    def opt_seed(self, address: str) -> None:
        """HOST:PORT of a node to link with (repeatable; replaces [mesh] seeds)."""
        self["seeds"].append(address)

    def opt_module(self, name: str) -> None:
        """Python module with a setup(app) function to load (repeatable)."""
        self["modules"].append(name)

    def postOptions(self) -> None:
        config, problems = self.configure()
        problems = self._log_problems() + problems
        if self["check-config"]:
            for problem in problems:
                print(problem, file=sys.stderr)
            if problems:
                raise SystemExit(1)
            print(f"{config.source or 'development mode (no --config)'}: OK")
            raise SystemExit(0)
        if problems:
            raise Refused(problems)
        self["config_object"] = config
        if self.parent is not None:  # run by twistd: choose the observer it logs with
            from meshd.logs import choose_twistd_observer

            problem = choose_twistd_observer(self.parent, self["log-format"], self["log-level"])
            if problem:
                raise Refused([problem])

    def _log_problems(self) -> list[str]:
        from meshd.logs import FORMATS, LEVELS

        problems = []
        if self["log-format"] not in FORMATS:
            problems.append(f"--log-format: must be one of {', '.join(FORMATS)}, got {self['log-format']!r}")
        if self["log-level"] not in LEVELS:
            problems.append(f"--log-level: must be one of {', '.join(LEVELS)}, got {self['log-level']!r}")
        return problems

    def configure(self) -> tuple[Config, list[str]]:
        """The configuration these options give, and every problem start-up would refuse it for."""
        problems: list[str] = []
        if self["config"]:
            config, problems = _load(self["config"])
            if config is None:
                return Config(source=Path(self["config"])), problems
        else:
            config = Config()
        node_id = None
        if self["node-id"] is not None:
            try:
                node_id = UUID(self["node-id"])
            except ValueError:
                problems.append(f"--node-id: not a UUID: {self['node-id']!r}")
        max_message_size = None
        if self["max-message-size"] is not None:
            try:
                max_message_size = int(self["max-message-size"])
            except ValueError:
                max_message_size = 0
            if max_message_size < 256:
                problems.append(f"--max-message-size: must be an integer >= 256, got {self['max-message-size']!r}")
        for flag, endpoints in (
            ("--listen", self["listen"]),
            ("--metrics", [self["metrics"]] if self["metrics"] else []),
            ("--web", [self["web"]] if self["web"] else []),
        ):
            for endpoint in endpoints:
                problems.extend(f"{flag}: {p}" for p in _endpoint_problems(endpoint))
        for address in self["seeds"]:
            try:
                split_address(address)
            except ValueError as e:
                problems.append(f"--seed: {e}")
        workers = None
        if self["workers"] is not None:
            from meshd.config import workers_value

            value = self["workers"]
            try:
                workers = workers_value(int(value) if value.isdigit() else value)
            except ValueError as e:
                problems.append(f"--workers: {e}")
        if self["worker"] is not None:
            from meshd.workers import worker_place

            try:
                worker_place(self["worker"])
            except ValueError as e:
                problems.append(f"--worker: {e}")
        if problems:
            return config, problems
        file_modules = config.modules
        config = config.override(
            node_id=node_id,
            node_name=self["node-name"],
            listen=tuple(self["listen"]) or None,
            max_message_size=max_message_size,
            modules=config.modules + tuple(self["modules"]),
            metrics_listen=self["metrics"],
            web_listen=self["web"],
            demo=True if self["demo"] else None,
            workers=workers,
        )
        mesh_flags = dict(listen=self["mesh-listen"], advertise=self["advertise"], seeds=tuple(self["seeds"]) or None)
        if any(v is not None for v in mesh_flags.values()):
            if config.mesh is None:
                return config, ["--mesh-listen, --advertise and --seed need a [mesh] section in the configuration file"]
            if self["mesh-listen"] is not None:
                problems.extend(f"--mesh-listen: {p}" for p in _endpoint_problems(self["mesh-listen"]))
            if self["advertise"] is not None:
                try:
                    split_address(self["advertise"])
                except ValueError as e:
                    problems.append(f"--advertise: {e}")
            if problems:
                return config, problems
            config = replace(config, mesh=replace(config.mesh, **{k: v for k, v in mesh_flags.items() if v is not None}))
        if config.development:
            endpoints = config.listen + tuple(e for e in (config.metrics_listen, config.web_endpoint) if e)
            public = [e for e in endpoints if not is_loopback(e)]
            if public:
                problems.append(
                    f"development mode (no --config) listens on loopback only; "
                    f"{', '.join(public)} is not loopback. Give a configuration file "
                    f"with [[rules]] to serve other hosts."
                )
        flag_modules = config.modules[len(file_modules):]
        problems.extend(check(config, flag_modules=flag_modules))
        return config, problems


# -- checks ---------------------------------------------------------------------


def check_file(path: "str | Path") -> list[str]:
    """Every problem found in the configuration file at ``path``, and in what start-up checks of it.

    One line each, naming the file and the key; an empty list means the node would start with it
    (ports that are in use when it starts aside).
    """
    config, problems = _load(path)
    if config is None:
        return problems
    return check(config)


def _listeners(config: Config) -> "list[tuple[str, str]]":
    """Every endpoint the node listens on, with the configuration key that names it."""
    listeners = [("websocket.listen", e) for e in config.listen]
    if config.metrics_listen:
        listeners.append(("metrics.listen", config.metrics_listen))
    if config.mesh is not None:
        listeners.append(("mesh.listen", config.mesh.listen))
    if config.api is not None:
        listeners.append(("api.listen", config.api.listen))
    if config.web_endpoint is not None:
        listeners.append(("web.listen", config.web_endpoint))
    return listeners


def check(config: Config, flag_modules: tuple[str, ...] = ()) -> list[str]:
    """What start-up checks beyond the values themselves: listeners, extension modules,
    the mesh certificates and the node id they name.  ``flag_modules`` came from ``--module``."""
    where = f"{config.source}: " if config.source is not None else ""
    problems = []
    listeners = _listeners(config)
    for key, endpoint in listeners:
        problems.extend(f"{where}{key}: {p}" for p in _endpoint_problems(endpoint))
    for module in config.modules:
        source = "--module" if module in flag_modules else f"{where}extensions.modules"
        problem = _module_problem(module)
        if problem:
            problems.append(f"{source}: {problem}")
    if config.mesh is not None:
        problems.extend(f"{where}{p}" for p in _mesh_problems(config))
    problems.extend(_shared_problems(config))
    return problems


def _shared_problems(config: Config) -> list[str]:
    """Listeners a host's workers cannot share: a ``unix:`` socket is one process's (meshd.workers)."""
    if config.workers <= 1:
        return []
    where = f"{config.source}: " if config.source is not None else ""
    shared = [key for key in _listeners(config) if key[0] in ("websocket.listen", "web.listen", "api.listen")]
    return [f"{where}{key}: {endpoint!r} is a unix: socket, which node.workers = {config.workers} cannot share; "
            f"listen on tcp: or ssl:" for key, endpoint in shared if endpoint.lower().startswith("unix:")]


def _load(path: "str | Path") -> tuple[Optional[Config], list[str]]:
    """The configuration in ``path``, or None and the problems found in it, one per key where possible."""
    try:
        return load(path), []
    except ConfigError as e:
        first = str(e)
    except Exception as e:  # an endpoint naming a file that cannot be read, for one
        first = f"{path}: {e}"
    return None, _problems_per_key(Path(path), first)


def _problems_per_key(path: Path, first: str) -> list[str]:
    """Parse each key of the file alone, so that one pass reports every bad key (else ``first``)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except Exception:
        return [first]
    problems: list[str] = []
    for section, body in data.items():
        if isinstance(body, dict) and section not in ("mesh", "api"):
            parts = [(f"{section}.{key}", {section: {key: value}}) for key, value in body.items()]
        else:
            parts = [(section, {section: body})]
        for key, part in parts:
            try:
                parse(part, path)
            except ConfigError as e:
                problem = str(e)
            except Exception as e:
                problem = f"{path}: {key}: {e}"
            else:
                continue
            if problem not in problems:
                problems.append(problem)
    return problems or [first]


_PORT = re.compile(r"^(tcp|tcp6|ssl):(?:port=)?(\d+)(?::|$)", re.IGNORECASE)


def _endpoint_problems(endpoint: str) -> list[str]:
    """Why Twisted could not listen on ``endpoint``, as far as can be told without listening."""
    try:
        check_endpoint(endpoint)
    except ValueError as e:
        return [str(e)]
    except Exception as e:  # ssl: with a key file that cannot be read, for one
        return [f"{endpoint!r}: {e}"]
    port = _PORT.match(endpoint)
    if port and int(port.group(2)) > 65535:
        return [f"{endpoint!r}: port {port.group(2)} is out of range (0-65535)"]
    if endpoint.lower().startswith("unix:"):
        address = re.split(r"(?<!\\):", endpoint)[1]
        address = address.split("=", 1)[1] if address.startswith("address=") else address
        if not Path(address).parent.is_dir():
            return [f"{endpoint!r}: the directory {str(Path(address).parent)!r} does not exist"]
    return []


def _module_problem(name: str) -> Optional[str]:
    try:
        module = importlib.import_module(name)
    except Exception as e:
        return f"cannot import extension module {name!r}: {type(e).__name__}: {e}"
    if not callable(getattr(module, "setup", None)):
        return f"extension module {name!r} has no setup(app) function"
    return None


def _mesh_problems(config: Config) -> list[str]:
    """Problems with the mesh certificates: unreadable, not matching, not signed, expired, another node's."""
    from meshd.mesh.tls import Credentials, CredentialsError

    mesh = config.mesh
    assert mesh is not None
    problems = []
    for key in ("ca", "cert", "key"):
        path = getattr(mesh, key)
        try:
            Path(path).read_bytes()
        except OSError as e:
            problems.append(f"mesh.{key}: cannot read {path}: {e.strerror}")
    if problems:
        return problems
    try:
        credentials = Credentials.load(mesh.ca, mesh.cert, mesh.key)
    except CredentialsError as e:
        key = "mesh.ca" if str(e).startswith(str(mesh.ca)) else "mesh.cert, mesh.key"
        return [f"{key}: {e}"]
    ca = credentials.ca.original.to_cryptography()
    own = credentials.own.original.to_cryptography()
    try:
        own.verify_directly_issued_by(ca)
    except Exception:
        problems.append(f"mesh.cert: {mesh.cert} is not signed by the cluster CA in mesh.ca ({mesh.ca})")
    now = datetime.datetime.now(datetime.timezone.utc)
    for key, cert, path in (("mesh.ca", ca, mesh.ca), ("mesh.cert", own, mesh.cert)):
        if cert.not_valid_after_utc < now:
            problems.append(f"{key}: {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if config.node_id is None:
        try:
            named = credentials.node_id
        except Exception as e:
            named = None
            problems.append(f"mesh.cert: {e}")
        if named is not None:
            problems.append(
                f'node.id: not set, but mesh.cert is the certificate of node {named}: set [node] id = "{named}"'
            )
        elif mesh.require_node_id_in_cert and not problems:
            credentials_problem = _check_node(credentials, None, True)
            if credentials_problem:
                problems.append(credentials_problem)
    else:
        problem = _check_node(credentials, config.node_id, mesh.require_node_id_in_cert)
        if problem:
            problems.append(problem)
    return problems


def _check_node(credentials, node_id: Optional[UUID], required: bool) -> Optional[str]:
    from uuid import uuid4

    from meshd.mesh.tls import CredentialsError

    try:
        credentials.check_node(node_id or uuid4(), required)
    except CredentialsError as e:
        return str(e)
    return None


# -- version --------------------------------------------------------------------


def version_line() -> str:
    """``meshd X (Twisted Y, Autobahn Z, Python W)``, for --version."""
    import platform

    import autobahn
    import twisted

    from meshd import __version__

    return (
        f"meshd {__version__} (Twisted {twisted.__version__}, Autobahn {autobahn.__version__}, "
        f"Python {platform.python_version()})"
    )


# -- the service ------------------------------------------------------------------


def makeService(options: Options) -> "Application":
    from meshd.app import Application
    from meshd.logs import NodeFields

    config: Config = options["config_object"]
    if options["worker"] is None and config.workers > 1:
        return _supervisor(options, config)
    if options.parent is not None:  # run by twistd: the process is the node's
        tune_collector()
    reconfigure = options.configure
    siblings = None
    if options["worker"] is not None:
        config, siblings, reconfigure = _worker(options, config)
    app = Application(config, siblings=siblings)
    # twistd runs one node per process: its log events, and its start, are the process's.
    uninstall_process_hooks()
    _hooks["fields"] = NodeFields(app.node_id, config.node_name).install()
    for module in config.modules:
        try:
            app.load_extension(module)
        except Exception as e:
            uninstall_process_hooks()
            source = "--module" if module in options["modules"] else f"{config.source}: extensions.modules"
            raise Refused([f"{source}: {module}: {_failed_at(e)}"])
    for endpoint in config.listen:
        app.listen(endpoint)
    if config.metrics_listen:
        app.serve_metrics(config.metrics_listen)
    if config.api is not None:
        app.serve_api(config.api.listen, dict(config.api.keys), config.api.max_body_size)
    if config.web_endpoint is not None:
        app.serve_web(config.web_endpoint, config.demo)
    if config.source is not None:
        # A reload reads the file again with the same flags, and checks it as start-up would.
        app.reconfigure = reconfigure
        ReloadOnHangup(app).setServiceParent(app)
    _catch_startup_failures(config)
    return app


#: The garbage collector's thresholds in a node process. Python's first one, 700 allocations, runs a young
#: collection every few connections, each of which makes dozens of objects; see bench/README.md.
GC_THRESHOLDS = (10_000, 10, 10)


def tune_collector() -> None:
    """Collect less often in a node process, and never scan again what its start made (modules, the app)."""
    import gc

    from twisted.internet import reactor

    gc.set_threshold(*GC_THRESHOLDS)
    reactor.callWhenRunning(gc.freeze)


def _supervisor(options: Options, config: Config):
    """The service of a host running ``workers`` processes (meshd.workers): it serves no client itself."""
    from uuid import uuid4

    from twisted.internet import reactor

    from meshd.logs import NodeFields
    from meshd.workers import StopOnce, Supervisor

    host = config.node_id or uuid4()
    supervisor = Supervisor(config, options.argv, host)
    StopOnce(reactor, worker=False)
    uninstall_process_hooks()
    _hooks["fields"] = NodeFields(host, config.node_name).install()
    if config.source is not None:
        ReloadOnHangup(supervisor).setServiceParent(supervisor)
    _catch_startup_failures(config)
    return supervisor


def _worker(options: Options, config: Config):
    """A worker's configuration, its siblings, and how it reads its configuration again (from its plan)."""
    from twisted.internet import reactor

    from meshd.workers import Plan, StopOnce, worker_place

    directory, index = worker_place(options["worker"])
    try:
        plan = Plan.read(directory)
    except (OSError, ValueError, TypeError) as e:
        raise Refused([f"--worker: cannot read the plan of the host's workers in {directory}: {e}"])

    def reconfigure() -> tuple[Config, list[str]]:
        again, problems = options.configure()
        return plan.adapt(again, directory, index), problems

    StopOnce(reactor, worker=True)
    return plan.adapt(config, directory, index), plan.siblings(directory, index), reconfigure


def _failed_at(error: BaseException) -> str:
    """An extension's failure in one line: what it raised, and the innermost place it was raised."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"setup(app) failed{where}: {type(error).__name__}: {error}"


class ReloadOnHangup(Service):
    """While the node runs, SIGHUP reloads its configuration (:meth:`Application.reload`).

    Only :func:`makeService` adds it: a node built in a test or an embedding
    program takes over no signal.  The handler runs the reload in the reactor
    thread, and the handler that was there before is put back at stop.
    """

    name = "reload-on-sighup"

    def __init__(self, app: "Application") -> None:
        self.app = app
        self._previous: object = None

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        from twisted.internet import reactor

        previous = signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.app.reload))
        self._previous = signal.SIG_DFL if previous is None else previous

    def stopService(self):
        previous, self._previous = self._previous, None
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)
        return super().stopService()


#: What :func:`makeService` installed in the process (for :func:`uninstall_process_hooks`).
_hooks: dict = {}


def uninstall_process_hooks() -> None:
    """Undo what :func:`makeService` installed in the process: the log fields and the start-up hook."""
    fields = _hooks.pop("fields", None)
    if fields is not None:
        fields.uninstall()
    previous = _hooks.pop("excepthook", None)
    if previous is not None:
        sys.excepthook = previous


# -- listeners that cannot be bound at start ---------------------------------------


def _catch_startup_failures(config: Config) -> None:
    """Report a listener that cannot be bound at start as one line, not a traceback.

    twistd starts the node after it has set up logging and written its pid
    file; an exception from the start goes up through twistd, which removes
    the pid file (and tells a daemon's parent), and ends the process.  Only
    then does this hook see it: a ``CannotListenError`` is logged as one
    critical line naming the key; anything else keeps its traceback.
    """
    previous = _hooks["excepthook"] = sys.excepthook

    def hook(kind, error, traceback) -> None:
        from twisted.internet.error import CannotListenError

        if isinstance(error, CannotListenError):
            _log.critical("Cannot start: {problem}", problem=startup_problem(config, error))
        else:
            previous(kind, error, traceback)

    sys.excepthook = hook


def startup_problem(config: Config, error) -> str:
    """``error`` (a ``CannotListenError``) as one line naming the listener's key and the cause."""
    listeners = _listeners(config)
    cause = error.socketError
    cause = getattr(cause, "strerror", None) or str(cause)
    where = f"{error.interface}:{error.port}" if error.interface else str(error.port)
    matches = [(key, e) for key, e in listeners if _listens_on(e, error.port)]
    if len(matches) == 1:
        key, endpoint = matches[0]
        return f"{config.source or 'flags'}: {key}: cannot listen on {endpoint!r} ({where}): {cause}"
    return f"cannot listen on {where}: {cause}"


def _listens_on(endpoint: str, port) -> bool:
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", endpoint)]
    values = [p.split("=", 1)[1] if p.split("=", 1)[0] in ("port", "address") else p for p in parts[1:]]
    return str(port) in values
