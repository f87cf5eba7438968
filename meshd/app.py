# -*- test-case-name: tests.test_scopes -*-
"""The node: a Twisted service that owns the registry, the state and the handlers."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Optional
from uuid import UUID, uuid4

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshd import builtins
from meshd._io import EndOfTurn, Outlet
from meshd.auth import DevelopmentAuthenticator, IAuthenticator, JWTAuthenticator, TokenAuthenticator, TokensOrJWT
from meshd.codec import ErrorCode, Opcode, ProtocolError, decode, encode
from meshd.config import Config
from meshd.constants import CLOSE_GOING_AWAY, CLOSE_HELLO_TIMEOUT, CLOSE_SLOW_CONSUMER
from meshd.delivery import LocalDelivery
from meshd.handlers import Handlers, Request, lookup
from meshd.limits import Limits
from meshd.metrics import Metrics
from meshd.permissions import Policy
from meshd.registry import Registry
from meshd.session import Session
from meshd.state import NodeState
from meshd.websocket import MeshServerFactory


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
    ) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        self.config = config
        self.clock = clock
        self.node_id: UUID = config.node_id or uuid4()
        self.registry = Registry()
        self.metrics = Metrics()
        #: Runs the end-of-turn steps: batches, mesh interest, then every connection's writes.
        self.turn = EndOfTurn(clock)
        self.turn.timed = self.metrics.turns.observe
        self.delivery = LocalDelivery(self.registry, self.metrics, self.turn)
        #: The mesh service, when the configuration has a ``[mesh]`` section.
        self.mesh = self._make_mesh(config.mesh) if config.mesh is not None else None
        self.state = NodeState(self.node_id, self.registry, self.delivery, self.mesh, self.metrics)
        self.policy = Policy.development() if config.development else Policy(config.rules)
        if authenticator is None:
            if config.jwt is not None:
                # A token in the JWT compact form is checked as a JWT, any other against [auth.tokens].
                authenticator = TokensOrJWT(TokenAuthenticator(config.tokens), JWTAuthenticator(config.jwt, clock))
            elif config.tokens or not config.development:
                authenticator = TokenAuthenticator(config.tokens)
            else:
                authenticator = DevelopmentAuthenticator()
        self.authenticator = authenticator
        self.handlers = Handlers()
        builtins.install(self.handlers)
        #: What clients may cost the node: connections, requests, failed Hellos (see meshd.limits).
        self.limits = Limits.from_config(config, clock)
        self.factory = MeshServerFactory(self, config, clock)
        self._draining = False

    @property
    def draining(self) -> bool:
        """Whether the node is draining: ``/readyz`` answers 503 meanwhile (nothing sets it yet)."""
        return self._draining

    def get_state(self) -> NodeState:
        return self.state

    # -- wiring -------------------------------------------------------------------

    def listen(self, endpoint: str) -> None:
        """Serve WebSocket clients on a server endpoint string (started with the app)."""
        from meshd.tls import listener

        description, factory = listener(endpoint, self.factory)  # ssl: with AEAD suites only
        service = strports.service(description, factory)
        service.setName(f"websocket:{endpoint}")
        service.setServiceParent(self)
        self.log.info("WebSocket clients on {endpoint}", endpoint=endpoint)

    def serve_metrics(self, endpoint: str) -> None:
        """Serve ``GET /metrics`` (Prometheus text format), ``/healthz`` and ``/readyz`` on a server endpoint string."""
        from meshd.metrics import MetricsSite

        service = strports.service(endpoint, MetricsSite(self))
        service.setName(f"metrics:{endpoint}")
        service.setServiceParent(self)

    def _make_mesh(self, settings):
        """The service that links this node with the others of its cluster (``[mesh]``)."""
        from meshd.mesh.service import Mesh
        from meshd.mesh.tls import Credentials

        mesh = Mesh(
            settings,
            Credentials.load(settings.ca, settings.cert, settings.key),
            node_id=self.node_id,
            clock=self.clock,
            metrics=self.metrics,
            turn=self.turn,
            registry=self.registry,
            deliver=self.delivery.deliver_routed,
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

    def stopService(self) -> Deferred:
        self.log.info("meshd node {node} stopping", node=self.node_id)
        for session in list(self.registry.sessions.values()):
            session.lifecycle.close(CLOSE_GOING_AWAY, "node shutting down")
        self.limits.stop()
        return super().stopService()

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
        return session

    def close_session(self, session: Session) -> None:
        """A session's connection is gone."""
        session.lifecycle.lost()
        self.registry.remove(session)
        if session.close_code == CLOSE_SLOW_CONSUMER:
            self.metrics.slow_consumer_closes += 1
        elif session.close_code == CLOSE_HELLO_TIMEOUT:
            self.metrics.hello_timeouts += 1

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
