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
from meshd.auth import DevelopmentAuthenticator, IAuthenticator, TokenAuthenticator
from meshd.codec import ErrorCode, Opcode, ProtocolError, decode, encode
from meshd.config import Config
from meshd.handlers import Handlers, Request, lookup
from meshd.metrics import Metrics, MetricsResource
from meshd.permissions import Policy
from meshd.registry import Registry
from meshd.session import Flusher, Session
from meshd.state import Batcher, NodeState
from meshd.websocket import CLOSE_HELLO_TIMEOUT, MeshServerFactory


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
        self.state = NodeState(self.node_id, self.registry, self.metrics)
        self.policy = Policy.development() if config.development else Policy(config.rules)
        if authenticator is None:
            if config.tokens or not config.development:
                authenticator = TokenAuthenticator(config.tokens)
            else:
                authenticator = DevelopmentAuthenticator()
        self.authenticator = authenticator
        self.handlers = Handlers()
        builtins.install(self.handlers)
        self.factory = MeshServerFactory(self, config)
        #: The mesh service, once :meth:`join_mesh` has been called.
        self.mesh = None
        self._hello_timers: dict[Session, Any] = {}
        self.flusher = Flusher(self.clock)
        self.state.batcher = Batcher(self.state, self.clock, self.flusher)
        self.registry.before_batch_change = self.state.batcher.flush_channel

    def get_state(self) -> NodeState:
        return self.state

    # -- wiring -------------------------------------------------------------------

    def listen(self, endpoint: str) -> None:
        """Serve WebSocket clients on a server endpoint string (started with the app)."""
        service = strports.service(endpoint, self.factory)
        service.setName(f"websocket:{endpoint}")
        service.setServiceParent(self)
        self.log.info("WebSocket clients on {endpoint}", endpoint=endpoint)

    def serve_metrics(self, endpoint: str) -> None:
        """Serve ``GET /metrics`` (Prometheus text format) on a server endpoint string."""
        from twisted.web.server import Site

        service = strports.service(endpoint, Site(MetricsResource(self)))
        service.setName(f"metrics:{endpoint}")
        service.setServiceParent(self)

    def join_mesh(self, settings) -> None:
        """Link this node with the others of its cluster (``[mesh]``)."""
        from meshd.mesh.service import Mesh
        from meshd.mesh.tls import Credentials

        credentials = Credentials.load(settings.ca, settings.cert, settings.key)
        self.mesh = Mesh(self, settings, credentials)
        self.mesh.setServiceParent(self)

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
        self.log.info("meshd node {node} starting", node=self.node_id)
        super().startService()

    def stopService(self) -> Deferred:
        self.log.info("meshd node {node} stopping", node=self.node_id)
        for session in list(self.registry.sessions.values()):
            if session.is_open:
                session.protocol.sendClose(1000, "node shutting down")
        return super().stopService()

    # -- sessions -----------------------------------------------------------------

    def open_session(self, protocol, peer: str = "") -> Session:
        session = Session(
            protocol, peer, max_backlog=self.config.max_send_buffer, clock=self.clock, flusher=self.flusher
        )
        self.registry.add(session)
        self.metrics.sessions_opened += 1
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            transport.registerProducer(session, True)
        timeout = self.config.hello_timeout
        if timeout > 0:
            self._hello_timers[session] = self.clock.callLater(
                timeout, self._hello_timed_out, session
            )
        return session

    def hello_done(self, session: Session) -> None:
        timer = self._hello_timers.pop(session, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _hello_timed_out(self, session: Session) -> None:
        self._hello_timers.pop(session, None)
        if session.is_open and not session.helloed:
            self.log.info("Closing {session}: no Hello in time", session=session.id)
            self.metrics.hello_timeouts += 1
            session.protocol.sendClose(CLOSE_HELLO_TIMEOUT, "no Hello in time")

    def close_session(self, session: Session) -> None:
        self.hello_done(session)
        self.registry.remove(session)
        if session.overflowed:
            self.metrics.slow_consumer_closes += 1

    # -- dispatch -----------------------------------------------------------------

    def dispatch(self, session: Session, data: bytes) -> None:
        """Handle one binary message from ``session``; answer bad input with an Error frame."""
        self.metrics.frames_received += 1
        try:
            message = decode(data)
        except ProtocolError as e:
            self._refuse(session, e, 0)
            return
        except Exception:  # a verifier bug must not take the connection down
            self.log.failure("Decoding a frame from {session} failed", session=session.id)
            self._refuse(session, ProtocolError(ErrorCode.Malformed, "malformed frame"), 0)
            return
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
