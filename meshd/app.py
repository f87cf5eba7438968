# -*- test-case-name: tests.test_scopes -*-
"""The node: a Twisted service that owns the registry, the state and the handlers."""

from __future__ import annotations

import importlib
import inspect
import math
import random
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional
from uuid import UUID, uuid4

from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred, succeed
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meshd import builtins
from meshd._io import EndOfTurn, Outlet
from meshd.auth import DevelopmentAuthenticator, IAuthenticator, JWTAuthenticator, TokenAuthenticator, TokensOrJWT
from meshd.codec import ErrorCode, Opcode, ProtocolError, decode, encode
from meshd.config import Config, ConfigError, MeshSettings, key_of, load
from meshd.constants import CLOSE_DRAINING, CLOSE_HELLO_TIMEOUT, CLOSE_SLOW_CONSUMER
from meshd.delivery import LocalDelivery
from meshd.handlers import Handlers, Request, lookup
from meshd.limits import Limits
from meshd.listening import Listening
from meshd.metrics import Metrics
from meshd.permissions import Policy
from meshd.registry import Registry
from meshd.session import Session
from meshd.state import NodeState, NullRouter
from meshd.websocket import MeshServerFactory

if TYPE_CHECKING:
    from meshd.mesh.local import Siblings

#: A drain closes at most this many batches of sessions a second.
DRAIN_BATCHES_PER_SECOND = 10
#: What :meth:`Application.reload` replaces; any other key that changed needs a restart.
RELOADABLE = frozenset({"rules", "tokens", "jwt", "drain_seconds"})
#: Seconds between sweeps of the history channels (events past their age go, empty channels are forgotten).
HISTORY_SWEEP = 30.0
#: What may change in ``[mesh]`` on a reload: the certificate files (read again on every reload).
RELOADABLE_MESH = frozenset({"ca", "cert", "key"})
#: What may change in ``[api]`` on a reload: the keys.
RELOADABLE_API = frozenset({"keys"})


class Application(MultiService):
    """One meshd node.

    Server-side code reaches the event scopes through :attr:`state` (also
    :meth:`get_state`), adds opcode handlers through :attr:`handlers`, and
    runs its own services as children (``app.addService(...)``), so that
    they start and stop with the node.
    """

    log = Logger()

    def __init__(
        self,
        config: Config = Config(),
        *,
        clock: Optional[IReactorTime] = None,
        authenticator: Optional[IAuthenticator] = None,
        siblings: "Optional[Siblings]" = None,
    ) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        self.config = config
        self.clock = clock
        #: The other workers of this host, when the node is one of them (meshd.workers): they share
        #: its listeners, and its mesh links with them over Unix sockets.
        self.siblings = siblings
        self.node_id: UUID = siblings.node_id if siblings is not None else config.node_id or uuid4()
        #: Each ``ssl:`` listener's configuration key, endpoint and TLS (its files are read again on reload).
        self._listener_tls: list = []
        #: Counts the nodes with subscribers per channel, once an extension asks (on_channel_occupied).
        self.occupancy = None
        #: What to log once every listener is up (the demo page's URL).
        self._announce: list[Callable[[], None]] = []
        self.registry = Registry()
        self.metrics = Metrics()
        #: Runs the end-of-turn steps: batches, mesh interest, then every connection's writes.
        self.turn = EndOfTurn(clock)
        self.turn.timed = self.metrics.turns.observe
        self.delivery = LocalDelivery(self.registry, self.metrics, self.turn)
        #: Random at each start: the epoch of this node's events on history channels, and the mesh's.
        self.incarnation = random.getrandbits(63) + 1
        #: The recent events of the channels that keep history (``[[channels]]``), if any does.
        self.history = self._make_history(config)
        #: The mesh service, when the configuration has a ``[mesh]`` section or the node is a worker.
        self.mesh = self._make_mesh(config.mesh) if config.mesh is not None or siblings is not None else None
        router = self.mesh if self.mesh is not None else NullRouter(self.incarnation)
        self.state = NodeState(self.node_id, self.registry, self.delivery, router, self.metrics, self.history)
        #: Who is subscribed to the channels with presence (``[[channels]]``), if any has it.
        self.presence = self._make_presence(config)
        if self.mesh is not None and self.history is not None:
            self.mesh.departure_observers.append(self.history.departed)
        self.policy = Policy.development() if config.development else Policy(config.rules)
        #: Whether the authenticator comes from the configuration (and a reload replaces it).
        self._configured_authenticator = authenticator is None
        if authenticator is None:
            authenticator = self._authenticator_for(config)
        self.authenticator = authenticator
        #: Where :meth:`reload` reads the configuration again: returns it and the problems start-up
        #: would refuse it for (``twistd meshd`` sets the flags' own; by default, the file alone).
        self.reconfigure: Callable[[], tuple[Config, list[str]]] = self._read_file
        #: Called with the new configuration after each reload that was applied (see :meth:`on_reload`).
        self._reload_hooks: list[Callable[[Config], None]] = []
        self.handlers = Handlers()
        builtins.install(self.handlers)
        #: What clients may cost the node: connections, requests, failed Hellos (see meshd.limits).
        self.limits = Limits.from_config(config, clock)
        self.factory = MeshServerFactory(self, config, clock)
        self._draining = False
        #: Fires when the last session is gone during a drain.
        self._drained: Optional[Deferred] = None
        #: The stop under way.
        self._stopping: Optional[Deferred] = None

    @property
    def draining(self) -> bool:
        """Whether the node is draining (stopping): ``/readyz`` answers 503 meanwhile."""
        return self._draining

    def _authenticator_for(self, config: Config) -> IAuthenticator:
        if config.jwt is not None:
            # A token in the JWT compact form is checked as a JWT, any other against [auth.tokens].
            return TokensOrJWT(TokenAuthenticator(config.tokens), JWTAuthenticator(config.jwt, self.clock))
        if config.tokens or not config.development:
            return TokenAuthenticator(config.tokens)
        return DevelopmentAuthenticator()

    def get_state(self) -> NodeState:
        return self.state

    # -- wiring -------------------------------------------------------------------

    def listen(self, endpoint: str) -> None:
        """Serve WebSocket clients on a server endpoint string (started with the app)."""
        from meshd.tls import listener

        description, factory, tls = listener(endpoint, self.factory)  # ssl: with AEAD suites only
        self._reload_tls("websocket.listen", endpoint, tls)
        service = Listening(description, factory, shared=self.siblings is not None)
        service.setName(f"websocket:{endpoint}")
        service.setServiceParent(self)
        self.log.info("WebSocket clients on {endpoint}", endpoint=endpoint)

    def websocket_addresses(self) -> "list[tuple[str, Any]]":
        """Each WebSocket listener's endpoint string and the address it bound (while listening)."""
        return [
            (service.description, service.address())
            for service in self
            if isinstance(service, Listening) and service.name.startswith("websocket:") and service.port is not None
        ]

    def serve_web(self, endpoint: str, demo: bool) -> None:
        """Serve the browser client, and the demo page when ``demo`` is true (``[web]``), on a server endpoint string."""
        from meshd.tls import listener
        from meshd.web import WebSite

        description, factory, tls = listener(endpoint, WebSite(self, demo))
        self._reload_tls("web.listen", endpoint, tls)
        service = Listening(description, factory, shared=self.siblings is not None)
        service.setName(f"web:{endpoint}")
        service.setServiceParent(self)

        def announce() -> None:
            address = service.address()
            host = getattr(address, "host", "")
            host = "localhost" if host in ("0.0.0.0", "::", "127.0.0.1", "::1") else host
            scheme = "https" if endpoint.startswith("ssl:") else "http"
            if demo:
                self.log.info("Demo page: open {url} in a browser", url=f"{scheme}://{host}:{address.port}/")
            else:
                self.log.info("Browser client at {url}", url=f"{scheme}://{host}:{address.port}/static/meshd-client.js")

        self._announce.append(announce)

    def _reload_tls(self, key: str, endpoint: str, tls) -> None:
        """A reload reads an ``ssl:`` listener's certificate files again (see :meth:`reload`)."""
        if tls is not None:
            self._listener_tls.append((key, endpoint, tls))

    def serve_metrics(self, endpoint: str) -> None:
        """Serve ``GET /metrics`` (Prometheus text format), ``/healthz`` and ``/readyz`` on a server endpoint string."""
        from meshd.metrics import MetricsSite

        service = strports.service(endpoint, MetricsSite(self))
        service.setName(f"metrics:{endpoint}")
        service.setServiceParent(self)

    def serve_api(self, endpoint: str, keys: "dict[str, str]", max_body_size: int = 1 << 20) -> None:
        """Serve the server HTTP API (docs/api.md) on a server endpoint string, for callers holding one of ``keys``."""
        from meshd.api import ApiSite
        from meshd.tls import listener

        site = ApiSite(self, keys, max_body_size=max_body_size)
        description, factory, tls = listener(endpoint, site)  # ssl: as listen's
        self._reload_tls("api.listen", endpoint, tls)

        def reload_keys(config: Config) -> None:  # a reload replaces [api] keys; the rest of [api] needs a restart
            if config.api is not None:
                site.api.keys = TokenAuthenticator(config.api.keys)

        self.on_reload(reload_keys)
        service = Listening(description, factory, shared=self.siblings is not None)
        service.setName(f"api:{endpoint}")
        service.setServiceParent(self)
        self.log.info("Server HTTP API on {endpoint}", endpoint=endpoint)

    def _make_history(self, config: Config):
        """The history of the channels ``[[channels]]`` gives one, or None when none does."""
        if not any(entry.history for entry in config.channels):
            return None
        from meshd.channels import ChannelTable
        from meshd.history import History

        history = History(ChannelTable(config.channels), self.clock, self.node_id, self.incarnation,
                           subscribed=lambda c: c in self.registry.channels or c in self.registry.pins,
                           max_bytes=config.max_history_bytes)
        # Without subscribers here, peers stop sending a channel: what this node holds of them ends there.
        self.registry.observe(lambda channel, present: None if present else history.end(channel))
        sweep = TimerService(HISTORY_SWEEP, history.sweep)
        sweep.clock = self.clock
        sweep.setName("history-sweep")
        sweep.setServiceParent(self)
        return history

    def _make_presence(self, config: Config):
        """Presence for the channels ``[[channels]]`` gives it, or None when none has it."""
        if not any(entry.presence for entry in config.channels):
            return None
        from meshd.channels import ChannelTable
        from meshd.presence import Presence

        presence = Presence(self, ChannelTable(config.channels))
        if self.mesh is not None:
            self.mesh.routed_taps.append(presence.routed)
            self.mesh.departure_observers.append(presence.departed)
        return presence

    def _make_mesh(self, settings: "Optional[MeshSettings]"):
        """The service that links this node with the others of its cluster (``[mesh]``), and with the
        other workers of its host; without ``[mesh]``, with those only."""
        from meshd.mesh.service import Mesh
        from meshd.mesh.tls import Credentials

        credentials = None
        if settings is not None:
            credentials = CurrentCredentials(Credentials.load(settings.ca, settings.cert, settings.key))
        else:
            settings = MeshSettings(cluster="", listen="", advertise="", ca=Path(), cert=Path(), key=Path())
        mesh = Mesh(
            settings,
            credentials,
            node_id=self.node_id,
            clock=self.clock,
            metrics=self.metrics,
            turn=self.turn,
            registry=self.registry,
            deliver=self.delivery.deliver_routed,
            answer=self.answer_query,
            node_name=self.config.node_name,
            history=self.history,
            incarnation=self.incarnation,
            siblings=self.siblings,
        )
        mesh.setServiceParent(self)
        return mesh

    def load_extension(self, module_name: str) -> None:
        """Import ``module_name`` and call its ``setup(app)``."""
        module = importlib.import_module(module_name)
        setup = getattr(module, "setup", None)
        if not callable(setup):
            raise ValueError(f"extension module {module_name!r} has no setup(app) function")
        setup(self)
        self.log.info("Loaded extension {module}", module=module_name)

    def startService(self) -> None:
        self._draining = False
        if self.config.development:
            self.log.warn(
                "meshd {node} in development mode (no configuration file): listening on "
                "loopback only; every operation is allowed and any token is accepted",
                node=self.node_id,
            )
        self.log.info(
            "meshd node {node}{named} starting", node=self.node_id,
            named=f" ({self.config.node_name})" if self.config.node_name else "",
        )
        super().startService()
        for announce in self._announce:
            announce()

    def stopService(self) -> Deferred:
        """Drain, then stop; the Deferred fires when everything has stopped.

        In this order: the node turns not ready (:attr:`draining`, ``/readyz``
        503); the WebSocket listeners stop, so no new connection is accepted;
        the sessions are closed with :data:`~meshd.constants.CLOSE_DRAINING`
        in batches spread over ``node.drain_seconds`` (0: all at once), and
        the drain ends when the last one is gone, or at the latest the close
        handshake's timeout after the last batch (what is left is aborted);
        then the other services stop, the mesh saying Goodbye to its peers,
        and the metrics listener last of all.
        """
        if self._stopping is not None:  # a second stop while the first drains: wait for it
            waiter: Deferred = Deferred()
            self._stopping.addBoth(lambda result: (waiter.callback(None), result)[1])
            return waiter
        self.log.info("meshd node {node} stopping", node=self.node_id)
        self._draining = True
        Service.stopService(self)
        listeners = [s for s in self if (s.name or "").startswith("websocket:")]
        self._stopping = stopping = DeferredList([maybeDeferred(s.stopService) for s in listeners if s.running])
        stopping.addCallback(lambda _: self._drain())
        stopping.addCallback(lambda _: self._stop_children(listeners))

        def stopped(result):
            self._stopping = None
            return result

        return stopping.addBoth(stopped)

    def _stop_children(self, stopped: list) -> Deferred:
        """Stop the services not stopped yet, the last one added first (as MultiService does)."""
        self.limits.stop()
        if self.occupancy is not None:
            self.occupancy.stop()
        children = [s for s in reversed(list(self)) if s not in stopped]
        metrics = [s for s in children if (s.name or "").startswith("metrics:")]
        others = [s for s in children if s not in metrics]
        d = DeferredList([maybeDeferred(s.stopService) for s in others])
        d.addCallback(lambda _: DeferredList([maybeDeferred(s.stopService) for s in metrics]))
        return d.addCallback(lambda _: None)

    def _drain(self) -> Deferred:
        """Close every session with CLOSE_DRAINING, in batches over ``drain_seconds``; fire when all are gone."""
        sessions = list(self.registry.sessions.values())
        if not sessions:
            return succeed(None)
        seconds = self.config.drain_seconds
        count = max(1, min(len(sessions), math.ceil(seconds * DRAIN_BATCHES_PER_SECOND)))
        size = math.ceil(len(sessions) / count)
        batches = [sessions[i:i + size] for i in range(0, len(sessions), size)]
        self.log.info(
            "Draining {sessions} sessions in {batches} batches over {seconds} s",
            sessions=len(sessions), batches=len(batches), seconds=seconds,
        )
        self._drained = drained = Deferred()
        calls = [self.clock.callLater(i * seconds / len(batches), self._close_batch, batch)
                 for i, batch in enumerate(batches) if i > 0]
        # Autobahn drops a connection whose client does not answer the close within this.
        timeout = getattr(self.factory, "closeHandshakeTimeout", 0) or 0
        calls.append(self.clock.callLater(seconds + timeout, self._drain_overdue))

        def done(_):
            self._drained = None
            for call in calls:
                if call.active():
                    call.cancel()

        drained.addCallback(done)
        self._close_batch(batches[0])
        if not self.registry.sessions and self._drained is drained:
            drained.callback(None)  # every session was gone already
        return drained

    def _close_batch(self, batch: list) -> None:
        for session in batch:
            session.lifecycle.close(CLOSE_DRAINING, "node draining: reconnect")

    def _drain_overdue(self) -> None:
        """The drain took its longest: abort what is left."""
        left = list(self.registry.sessions.values())
        self.log.warn("Drain over: aborting {count} sessions still open", count=len(left))
        for session in left:
            transport = getattr(session.protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.callback(None)

    # -- occupancy ----------------------------------------------------------------

    def on_channel_occupied(self, hook: Callable[[str], None]) -> None:
        """Call ``hook(channel)`` once when a channel gets its first subscriber anywhere in the cluster
        (meshd.occupancy)."""
        self._occupancy().occupied_hooks.append(hook)

    def on_channel_vacated(self, hook: Callable[[str], None]) -> None:
        """Call ``hook(channel)`` once when a channel has had no subscriber anywhere in the cluster for
        ``meshd.occupancy.VACATE_GRACE`` seconds."""
        self._occupancy().vacated_hooks.append(hook)

    def _occupancy(self):
        """The occupancy tracker, made on first use: a node without hooks does not count."""
        if self.occupancy is None:
            from meshd.occupancy import Occupancy

            self.occupancy = Occupancy(self.node_id, self.registry, self.clock,
                                       linked=self.mesh.linked if self.mesh is not None else tuple)
            if self.mesh is not None:
                self.mesh.observe_interest(self.occupancy.peer_changed)
        return self.occupancy

    # -- reload -------------------------------------------------------------------

    def on_reload(self, hook: Callable[[Config], None]) -> None:
        """Call ``hook(config)`` after each reload that was applied, with the configuration now in force."""
        self._reload_hooks.append(hook)

    def _read_file(self) -> tuple[Config, list[str]]:
        assert self.config.source is not None
        return load(self.config.source), []

    def reload(self) -> bool:
        """Read the configuration file again and apply what may change while sessions stay (SIGHUP).

        Replaced: the rules, the static tokens and ``[auth.jwt]`` (a new
        authenticator: a key set is fetched again when a token next needs it),
        ``node.drain_seconds``, ``[api] keys``, the mesh certificates (read
        again from ``mesh.ca``, ``cert`` and ``key``: new links use them, links
        up stay), and the certificates of ``ssl:`` listeners (new connections
        use them).
        Any other key that changed is logged as needing a restart and keeps
        its value.  A file the node would refuse changes nothing, with one
        log line naming the file and the key.  Returns whether it was applied.
        """
        if self.config.development:
            self.log.warn("Reload: no configuration file (development mode); nothing to reload")
            return False
        try:
            new, problems = self.reconfigure()
        except ConfigError as e:
            new, problems = None, [str(e)]
        except Exception as e:  # an endpoint naming a file that cannot be read, for one
            new, problems = None, [f"{self.config.source}: {e}"]
        credentials = None
        if not problems and new is not None and new.mesh is not None and self.mesh is not None:
            credentials, problem = self._credentials_for(new)
            if problem:
                problems = [problem]
        listener_tls = []
        if not problems and new is not None:
            for key, endpoint, tls in self._listener_tls:
                try:
                    listener_tls.append((tls, tls.read()))
                except Exception as e:
                    problems.append(f"{self.config.source}: {key}: {endpoint!r}: cannot use its certificate: {e}")
        if problems or new is None:
            self.log.error("Reload refused, the settings in force stay: {problems}", problems="; ".join(problems))
            return False
        old = self.config
        restart = [key_of(f.name) for f in fields(Config)
                   if f.name not in RELOADABLE and f.name not in ("mesh", "api", "source")
                   and getattr(old, f.name) != getattr(new, f.name)]
        mesh, changed = _section_after_reload(old.mesh, new.mesh, "mesh", RELOADABLE_MESH)
        restart.extend(changed)
        api, changed = _section_after_reload(old.api, new.api, "api", RELOADABLE_API)
        restart.extend(changed)
        self.config = replace(old, rules=new.rules, tokens=new.tokens, jwt=new.jwt,
                              drain_seconds=new.drain_seconds, mesh=mesh, api=api)
        self.policy = Policy(new.rules)
        if self._configured_authenticator:
            self.authenticator = self._authenticator_for(self.config)
        if credentials is not None:
            self.mesh.credentials.replace(credentials)
        for tls, options in listener_tls:
            tls.use(options)
        if restart:
            self.log.warn("Reload: {keys} changed in {source}; that needs a restart (the old values stay)",
                          keys=", ".join(restart), source=old.source)
        self.log.info("Reloaded {source}: {rules} rules, {tokens} tokens{jwt}{mesh}{listeners}", source=old.source,
                      rules=len(new.rules), tokens=len(new.tokens), jwt=", [auth.jwt]" if new.jwt else "",
                      mesh=", mesh certificates" if credentials is not None else "",
                      listeners=f", {len(listener_tls)} TLS listener certificates" if listener_tls else "")
        for hook in list(self._reload_hooks):
            try:
                hook(self.config)
            except Exception:
                self.log.failure("A reload hook failed")
        return True

    def _credentials_for(self, config: Config):
        """The mesh credentials ``config`` names, and None; or None and why they cannot be used."""
        from meshd.mesh.tls import Credentials, CredentialsError

        mesh = config.mesh
        assert mesh is not None and self.mesh is not None
        try:
            credentials = Credentials.load(mesh.ca, mesh.cert, mesh.key)
            credentials.check_node(self.node_id, self.mesh.settings.require_node_id_in_cert)
        except CredentialsError as e:
            text = str(e)
            key = "" if text.startswith("mesh.") else "mesh.ca, mesh.cert, mesh.key: "  # else it names its key
            return None, f"{config.source}: {key}{text}"
        return credentials, None


    # -- sessions -----------------------------------------------------------------

    def outlet_for(self, transport) -> Outlet:
        """The bounded output of a new WebSocket connection (see :class:`meshd._io.Outlet`)."""
        # Until the handshake makes it a session, a peer that does not read is just dropped.
        return Outlet(
            transport, self.turn, self.config.max_send_buffer, on_overflow=transport.abortConnection, accepting=False,
            pause_reading=True,
        )

    def open_session(self, protocol, outlet: Outlet, peer: str = "") -> Session:
        """A WebSocket connection finished its opening handshake: make it a session."""
        session = Session(
            protocol, outlet, peer=peer, clock=self.clock, hello_timeout=self.config.hello_timeout,
            metrics=self.metrics,
        )
        self.registry.add(session)
        self.metrics.sessions_opened += 1
        if self._draining:  # its opening handshake was under way when the drain began
            session.lifecycle.close(CLOSE_DRAINING, "node draining: reconnect")
        return session

    def close_session(self, session: Session) -> None:
        """A session's connection is gone."""
        session.lifecycle.lost()
        self.registry.remove(session)
        if self._drained is not None and not self.registry.sessions:
            drained, self._drained = self._drained, None
            drained.callback(None)
        if session.close_code == CLOSE_SLOW_CONSUMER:
            self.metrics.slow_consumer_closes += 1
        elif session.close_code == CLOSE_HELLO_TIMEOUT:
            self.metrics.hello_timeouts += 1

    def disconnect(self, *, principal: Optional[str] = None, session: Optional[UUID] = None,
                   code: int, reason: str) -> list[UUID]:
        """Close this node's sessions of ``principal``, or the session ``session``; the ids closed."""
        if session is not None:
            found = self.registry.get(session)
            candidates = [found] if found is not None else []
        elif principal is not None:
            candidates = [s for s in self.registry.sessions.values() if s.principal == principal]
        else:
            candidates = []
        closed = []
        for found in candidates:
            if found.is_open:
                found.lifecycle.close(code, reason)
                closed.append(found.id)
        return closed

    def positions_now(self, channel: str, cut: "list") -> "list":
        """Where ``channel`` is now, for a Subscribe or History Ack: the history's ``cut``, and for each
        linked peer it does not name yet (its Start marker is on its way), the last number received
        from that peer: its events on the channel up to there were published before this node's
        interest could reach it."""
        from meshd.codec import Position

        if self.mesh is None:
            return cut
        named, linked = {p.node for p in cut}, set(self.mesh.linked())
        return cut + [Position(node, incarnation, seq) for node, incarnation, seq in self.mesh.received()
                      if node not in named and node in linked]

    def answer_query(self, query):
        """What this node answers another's Query (meshd.mesh.queries): counts, the sessions it closed,
        or a history channel's events after positions."""
        from meshd.mesh.queries import Reply
        from meshd.mesh.wire import QueryKind

        if query.kind == QueryKind.Disconnect:
            return Reply(closed=self.disconnect(principal=query.principal, session=query.session,
                                                code=query.code, reason=query.reason))
        if query.kind == QueryKind.Presence:
            found = self.presence is not None and query.channel is not None and self.presence.options(query.channel)
            return Reply(presence=self.presence.local(query.channel) if found else ())
        if query.kind == QueryKind.History:
            if self.history is None or query.channel is None:
                return Reply()
            events, covered = self.history.covering(query.channel, query.positions)
            return Reply(events=events, covered=covered)
        channels = [(name, len(members)) for name, members in self.registry.channels.items()]
        return Reply(sessions=len(self.registry.sessions), channels=channels)

    # -- dispatch -----------------------------------------------------------------

    def dispatch(self, session: Session, data: bytes) -> None:
        """Handle one binary message from ``session``; answer bad input with an Error frame."""
        metrics = self.metrics
        metrics.frames_received += 1
        if self.turn.first_read is None:
            self.turn.reading()  # once per turn: meshd_turn_seconds
        try:
            message = decode(data)
        except ProtocolError as e:
            self._refuse(session, e, 0)
            return
        except Exception:  # a verifier bug must not take the connection down
            self.log.failure("Decoding a frame from {session} failed", session=session.id)
            self._refuse(session, ProtocolError(ErrorCode.Malformed, "malformed frame"), 0)
            return
        opcodes = metrics.opcodes
        opcodes[message.opcode] = opcodes.get(message.opcode, 0) + 1
        request = Request(self, session, message)
        try:
            registration = lookup(self.handlers, session, message)
            result = registration.handler(request)
            if result is None and not message.request_id:
                return  # done, and nothing to answer (most publishes)
            if inspect.iscoroutine(result):
                result = ensureDeferred(result)
            if not isinstance(result, Deferred):
                self._finish(request, result)
                return
        except Exception as e:
            self._failed(request, Failure(e))
            return
        result.addCallback(lambda r: self._finish(request, r)).addErrback(
            lambda f: self._failed(request, f)
        )

    def refuse(self, session: Session, data: bytes, code: int, message: str) -> None:
        """Answer a frame the node does not handle with an Error ``code`` (and the frame's request id)."""
        self.metrics.frames_received += 1
        try:
            request_id = decode(data).request_id
        except ProtocolError:
            request_id = 0
        self._refuse(session, ProtocolError(code, message), request_id)

    def _finish(self, request: Request, result: Any) -> None:
        """Answer a handler's result with an Ack (see meshd.handlers)."""
        if result is not None and not isinstance(result, (bytes, bytearray, memoryview)):
            raise TypeError(f"a handler returned {type(result).__name__}; return None or bytes")
        if request.replied or request.message.request_id == 0 or not request.session.is_open:
            return
        request.reply(Opcode.Ack, payload=bytes(result) if result is not None else None)

    def _failed(self, request: Request, failure: Failure) -> None:
        error = failure.value
        if not isinstance(error, ProtocolError) or not 0 <= error.code <= 0xFFFF:
            self.log.failure(
                "Handler for opcode {opcode} failed", failure, opcode=request.message.opcode
            )
            error = ProtocolError(ErrorCode.InternalError, "the node failed to handle this frame")
        if request.session.is_open:
            self._refuse(request.session, error, request.message.request_id)

    def _refuse(self, session: Session, error: ProtocolError, request_id: int) -> None:
        self.metrics.error(error.code)
        session.send_frame(
            encode(
                Opcode.Error,
                request_id=request_id or error.request_id,
                error_code=error.code,
                message=error.message,
            )
        )


def _section_after_reload(old, new, name: str, reloadable: frozenset):
    """A section (``[mesh]``, ``[api]``) in force after a reload, and its keys that changed but need a restart."""
    if old is None or new is None:
        return old, [name] if old != new else []
    changed = [f"{name}.{f.name}" for f in fields(type(old))
               if f.name not in reloadable and getattr(old, f.name) != getattr(new, f.name)]
    return replace(old, **{key: getattr(new, key) for key in reloadable}), changed


class CurrentCredentials:
    """The mesh credentials in force, replaced by a reload: links made afterwards use the new ones.

    The mesh builds its listener's TLS factory once and each dialer's
    endpoint once; the connection creators these return read the current
    credentials for each new connection, so links already up keep theirs.
    """

    def __init__(self, credentials) -> None:
        self.current = credentials
        self._server = None
        self._clients: dict = {}

    def replace(self, credentials) -> None:
        self.current = credentials
        self._server = None
        self._clients.clear()

    def __getattr__(self, name: str):  # ca, own, node_id, check_node
        return getattr(self.current, name)

    def server_options(self) -> "_ServerCreator":
        return _ServerCreator(self)

    def client_options(self, hostname: str) -> "_ClientCreator":
        return _ClientCreator(self, hostname)

    def server_context(self):
        if self._server is None:
            self._server = self.current.server_options()
        return self._server.getContext()

    def client_creator(self, hostname: str):
        creator = self._clients.get(hostname)
        if creator is None:
            creator = self._clients[hostname] = self.current.client_options(hostname)
        return creator


@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    def __init__(self, credentials: CurrentCredentials) -> None:
        self._credentials = credentials

    def serverConnectionForTLS(self, tlsProtocol):
        from OpenSSL.SSL import Connection

        return Connection(self._credentials.server_context(), None)


@implementer(IOpenSSLClientConnectionCreator)
class _ClientCreator:
    def __init__(self, credentials: CurrentCredentials, hostname: str) -> None:
        self._credentials = credentials
        self._hostname = hostname

    def clientConnectionForTLS(self, tlsProtocol):
        return self._credentials.client_creator(self._hostname).clientConnectionForTLS(tlsProtocol)
