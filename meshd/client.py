# -*- test-case-name: tests.test_client, tests.test_client_reconnect -*-
"""A Twisted client for meshd nodes.

One session, as long as the connection lasts::

    from meshd.client import connect

    async def main(reactor):
        client = await connect("ws://127.0.0.1:8765", reactor=reactor)
        await client.subscribe("chat")
        await client.publish("chat", b"hello")
        async for event in client.events():
            print(event.channel, event.payload)

A client that reconnects (with exponential backoff), says Hello again, and
subscribes and watches again what it held before the cut::

    from meshd.client import ReconnectingClient

    client = ReconnectingClient(["ws://a:8765", "ws://b:8765"], token=get_token, reactor=reactor)
    client.add_state_listener(lambda change: print(change.describe()))
    client.startService()
    await client.when_connected()
    await client.subscribe("chat")

Every request returns a Deferred that fires with the node's answer (an
``Ack``, ``Welcome`` or ``Pong`` :class:`~meshd.codec.Message`) or fails with
:class:`MeshError` carrying the node's error code.  Events reach callbacks
added with ``add_listener`` and the async iterators made by ``events()``.
See docs/clients.md.
"""

from __future__ import annotations

import inspect
import itertools
import random
from typing import Any, Awaitable, Callable, Optional, Protocol, Sequence, Union
from uuid import UUID

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredQueue,
    ensureDeferred,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meshd.clientcore import (
    CLOSED,
    CONNECTED,
    CONNECTING,
    DISCONNECTED,
    NOW,
    STOP,
    ConnectionClosed,
    HistoryAnswer,
    Holdings,
    MeshError,
    NotConnected,
    Recovery,
    StateChange,
    answer_error,
    close_action,
    drain_delay,
    hello_error_is_fatal,
    history_answer,
    history_fields,
    jwt_expiry,
    read_frame,
    refresh_delay,
    token_renewable,
)
from meshd.codec import PROTOCOL_VERSION, Message, Opcode, Position, ProtocolError, Watchable, encode
from meshd.constants import SUBPROTOCOL

__all__ = [
    "ConnectionClosed",
    "EventStream",
    "HistoryAnswer",
    "MeshClient",
    "MeshError",
    "NotConnected",
    "ReconnectingClient",
    "Recovery",
    "StateChange",
    "connect",
    "connect_reconnecting",
]

Listener = Callable[[Message], None]
StateListener = Callable[[StateChange], None]
RecoveryListener = Callable[[Recovery], None]
#: A token, or a callable giving one (or a Deferred or awaitable of one) on each connect.
TokenSource = Union[None, str, Callable[[], Union[Optional[str], Deferred, Awaitable]]]


class _Protocol(WebSocketClientProtocol):
    _log = Logger()
    factory: "_Factory"
    client: "Optional[MeshClient]" = None

    def onOpen(self) -> None:
        self.client = MeshClient(self, errors=self.factory.errors)
        self.factory.on_open(self.client)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.client is not None:
            self.client._received(payload, isBinary)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if self.client is not None:
            self.client._lost(ConnectionClosed(code, reason))
        else:
            self.factory.on_fail(ConnectionClosed(code, reason))


class _Factory(WebSocketClientFactory):
    """Makes one WebSocket connection's protocol; tells ``on_open`` and ``on_fail`` how its handshake went."""

    protocol = _Protocol

    def __init__(self, url: str, max_message_size: int, on_open: Callable[["MeshClient"], None],
                 on_fail: Callable[[ConnectionClosed], None], errors: Optional[list] = None) -> None:
        super().__init__(url, protocols=[SUBPROTOCOL])
        self.on_open, self.on_fail = on_open, on_fail
        self.errors = errors
        self.setProtocolOptions(
            utf8validateIncoming=False,
            maxMessagePayloadSize=max_message_size,
            maxFramePayloadSize=max_message_size,
            failByDrop=False,
            tcpNoDelay=True,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            serverConnectionDropTimeout=5,
        )

    def aim(self, url: str) -> None:
        """Make the next connection's handshake for ``url``."""
        self.setSessionParameters(url=url, protocols=[SUBPROTOCOL])


class MeshClient:
    """One session with a node.  Made by :func:`connect` (and by :class:`ReconnectingClient`, one per connection)."""

    log = Logger()

    def __init__(self, protocol: _Protocol, errors: Optional[list] = None) -> None:
        self._protocol = protocol
        self._ids = itertools.count(1)
        self._pending: dict[int, Deferred[Message]] = {}
        self._listeners: list[Listener] = []
        self.session_id: Optional[UUID] = None
        self.node_id: Optional[UUID] = None
        self.principal: Optional[str] = None
        self.max_message_size = 0
        #: The Welcome frame, once welcomed.
        self.welcome: Optional[Message] = None
        #: Why the connection ended, once it has.
        self.closed_reason: Optional[ConnectionClosed] = None
        self._close_waiters: list[Deferred[ConnectionClosed]] = []
        #: Error frames that answered no request (request id 0).
        self.errors: list[MeshError] = [] if errors is None else errors

    # -- requests -------------------------------------------------------------------

    def send(self, opcode: int, **fields: Any) -> None:
        """Send one frame and expect no answer (request id 0)."""
        self.send_raw(encode(opcode, **fields))

    def send_raw(self, data: bytes, binary: bool = True) -> None:
        """Send bytes as one WebSocket message, as they are."""
        if self.closed_reason is not None:
            raise self.closed_reason
        self._protocol.sendMessage(data, isBinary=binary)

    def request(self, opcode: int, **fields: Any) -> "Deferred[Message]":
        """Send one frame with a fresh request id; fire with the answer to it.

        Cancelling the Deferred forgets the request (its answer is ignored).
        """
        if self.closed_reason is not None:
            return fail(self.closed_reason)
        request_id = next(self._ids)
        d: Deferred[Message] = Deferred(lambda _: self._pending.pop(request_id, None))
        self._pending[request_id] = d
        self.send(opcode, request_id=request_id, **fields)
        return d

    def hello(self, token: Optional[str] = None, batch: bool = True) -> "Deferred[Message]":
        """Say Hello; with ``batch`` (the default) the node may send Batch frames, unpacked here."""
        def welcomed(welcome: Message) -> Message:
            self.welcome = welcome
            self.session_id, self.node_id = welcome.session, welcome.node
            self.principal, self.max_message_size = welcome.principal, welcome.max_message_size
            return welcome

        d = self.request(Opcode.Hello, version=PROTOCOL_VERSION, token=token, batch=batch)
        return d.addCallback(welcomed)

    def subscribe(self, channel: str, *, positions: "Optional[Sequence[Position]]" = None,
                  recover: bool = False) -> "Deferred[Message]":
        """Subscribe; with ``recover`` and ``positions`` (on a history channel), the events missed since
        ``positions`` arrive first, then the Ack, whose ``recovered`` says whether they are all there."""
        if recover:
            return self.request(Opcode.Subscribe, channel=channel, recover=True, positions=list(positions or ()))
        return self.request(Opcode.Subscribe, channel=channel)

    def unsubscribe(self, channel: str) -> "Deferred[Message]":
        return self.request(Opcode.Unsubscribe, channel=channel)

    def history(self, channel: str, limit: int = 0,
                positions: "Optional[Sequence[Position]]" = None) -> "Deferred[HistoryAnswer]":
        """What a history channel holds on the node: the latest ``limit`` events (0: all, at most 1000),
        or those after ``positions``; fire with a :class:`HistoryAnswer` (``events``, ``positions``,
        ``recovered``)."""
        d = self.request(Opcode.History, **history_fields(channel, limit, positions))
        return d.addCallback(history_answer)

    def publish(
        self, channel: str, payload: bytes, *, exclude_self: bool = False, ack: bool = True
    ) -> "Optional[Deferred[Message]]":
        """Publish; with ``ack=False`` nothing is awaited and errors land in :attr:`errors`."""
        fields = dict(channel=channel, payload=payload, exclude_self=exclude_self)
        if ack:
            return self.request(Opcode.Publish, **fields)
        self.send(Opcode.Publish, **fields)
        return None

    def watch(self, kind: str, ident: str) -> "Deferred[Message]":
        return self.request(Opcode.Watch, watchable=Watchable(kind, ident))

    def unwatch(self, kind: str, ident: str) -> "Deferred[Message]":
        return self.request(Opcode.Unwatch, watchable=Watchable(kind, ident))

    def ping(self, payload: bytes = b"") -> "Deferred[Message]":
        return self.request(Opcode.Ping, payload=payload)

    def refresh(self, token: str) -> "Deferred[Message]":
        """Replace the session's JWT with ``token`` (same principal) before the old one expires."""
        return self.request(Opcode.Refresh, token=token)

    def call(self, opcode: int, payload: bytes = b"", *, channel: Optional[str] = None,
             watchable: Optional[Watchable] = None) -> "Deferred[Message]":
        """Send a user opcode (1024 and up) handled by a server extension; fire with its Ack."""
        return self.request(opcode, payload=payload, channel=channel, watchable=watchable)

    def close(self, code: int = 1000, reason: str = "bye") -> "Deferred[ConnectionClosed]":
        """Close the connection; fire once it is closed."""
        if self.closed_reason is None:
            self._protocol.sendClose(code, reason)
        return self.when_closed()

    def abort(self) -> None:
        """Drop the connection at once, without a close handshake."""
        if self.closed_reason is None and self._protocol.transport is not None:
            self._protocol.transport.abortConnection()

    def when_closed(self) -> "Deferred[ConnectionClosed]":
        """Fire with a :class:`ConnectionClosed` once the connection has ended."""
        if self.closed_reason is not None:
            return succeed(self.closed_reason)
        d: Deferred[ConnectionClosed] = Deferred()
        self._close_waiters.append(d)
        return d

    # -- events ---------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(message)`` for every Event frame."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def events(self) -> "EventStream":
        """An async iterator over the events that arrive from now on."""
        return EventStream(self)

    # -- from the protocol ----------------------------------------------------------

    def _received(self, data: bytes, binary: bool) -> None:
        try:
            events, answer = read_frame(data, binary)
        except ProtocolError as e:
            self.log.error("Dropping a bad frame from the node: {error}", error=e.message)
            return
        for event in events:
            _tell(self.log, self._listeners, event)
        if answer is None:
            return
        d = self._pending.pop(answer.request_id, None)
        if answer.opcode == Opcode.Error:
            error = answer_error(answer)
            if d is None:
                self.errors.append(error)
                self.log.warn("Error from the node: {error}", error=error)
            else:
                d.errback(error)
        elif d is not None:
            d.callback(answer)

    def _lost(self, reason: ConnectionClosed) -> None:
        pending, self._pending = self._pending, {}
        self.closed_reason = reason
        for d in pending.values():
            d.errback(reason)
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(reason)


def _tell(log: Logger, listeners: list, item: Any) -> None:
    """Call each listener with ``item``; one that fails is logged and the others still run."""
    for listener in list(listeners):
        try:
            listener(item)
        except Exception:
            log.failure("Listener {listener} failed", listener=listener)


class EventSource(Protocol):
    """What :class:`EventStream` reads from: a :class:`MeshClient` or a :class:`ReconnectingClient`."""

    def add_listener(self, listener: Listener) -> None: ...

    def remove_listener(self, listener: Listener) -> None: ...

    def when_closed(self) -> Deferred: ...


class EventStream:
    """``async for event in client.events()``: ends when the client closes for good.

    For a :class:`MeshClient` that is when its connection ends; for a
    :class:`ReconnectingClient`, when it is closed or gives up (the stream
    goes on across reconnects).
    """

    _END = object()

    def __init__(self, client: EventSource) -> None:
        self._queue: DeferredQueue = DeferredQueue()
        self._client = client
        client.add_listener(self._queue.put)
        client.when_closed().addCallback(lambda _: self._queue.put(self._END))

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> Message:
        item = await self._queue.get()
        if item is self._END:
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        """Stop receiving events into this stream."""
        try:
            self._client.remove_listener(self._queue.put)
        except ValueError:
            pass


def _endpoint(reactor, url: str, tls_options) -> IStreamClientEndpoint:
    secure, host, port, _resource, _path, _params = parse_url(url)
    endpoint = HostnameEndpoint(reactor, host, port)
    if secure:
        options = tls_options(url) if callable(tls_options) else tls_options
        endpoint = wrapClientTLS(options or optionsForClientTLS(host), endpoint)
    return endpoint


async def _connect(reactor, url: str, token: Optional[str], hello: bool,
                   max_message_size: int, tls_options) -> MeshClient:
    opened: Deferred[MeshClient] = Deferred()
    factory = _Factory(url, max_message_size, opened.callback,
                       lambda error: opened.called or opened.errback(error))
    await _endpoint(reactor, url, tls_options).connect(factory)
    client = await opened
    if hello:
        try:
            await client.hello(token)
        except BaseException:
            await client.close(reason="Hello refused")
            raise
    return client


def connect(
    url: str = "ws://127.0.0.1:8765",
    token: Optional[str] = None,
    *,
    reactor=None,
    hello: bool = True,
    timeout: float = 10.0,
    max_message_size: int = 16 << 20,
    tls_options=None,
) -> "Deferred[MeshClient]":
    """Connect to a node and (unless ``hello=False``) say Hello with ``token``.

    Fires with a :class:`MeshClient` once the session is welcomed; fails with
    :class:`MeshError` if the node refuses the Hello, with
    :class:`ConnectionClosed` if the WebSocket handshake fails, or with
    ``TimeoutError`` after ``timeout`` seconds.  It does not reconnect: see
    :class:`ReconnectingClient`.
    """
    if reactor is None:
        from twisted.internet import reactor
    d = ensureDeferred(_connect(reactor, url, token, hello, max_message_size, tls_options))
    return d.addTimeout(timeout, reactor)


# -- reconnecting ------------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class _Dialer:
    """The endpoint a :class:`ReconnectingClient`'s ClientService dials: the current URL's."""

    def __init__(self, connect: Callable[[Any], Deferred]) -> None:
        self._connect = connect

    def connect(self, protocolFactory) -> Deferred:
        return self._connect(protocolFactory)


class ReconnectingClient(Holdings, Service):
    """A client that keeps a session with one of ``urls`` open until closed.

    Built on ``ClientService`` with a ``backoffPolicy``.  On every
    connection it says Hello (with ``token``, or what the ``token`` callable
    returns then, possibly through a Deferred or awaitable), then subscribes
    to every channel and watches every watchable it held before the cut, and
    only then reports ``connected`` to state listeners and fires
    :meth:`when_connected`.  See docs/clients.md for the close codes it
    stops on (1002, 1003, 4003; 4005 with a fixed token; a Hello refused
    with AuthenticationFailed or UnsupportedVersion) and the one it
    reconnects at once on, to the next URL (4007).

    Requests made while it has no welcomed session fail at once with
    :class:`NotConnected` (they are not queued); requests in flight when
    the connection drops fail with :class:`ConnectionClosed`.  Event
    listeners and :meth:`events` carry on across reconnects.  Events
    published while disconnected are lost, except on history channels
    (docs/protocol.md section 6): with ``recover`` (the default) the client
    keeps their positions and subscribes again with them, so the node sends
    the missed events first; recovery listeners hear whether it could.

    With a ``token`` callable and a JWT that has ``exp``, a Refresh with a
    new token from the callable is sent ``refresh_margin`` seconds before
    ``exp`` (halfway, for tokens shorter than twice that).
    """

    log = Logger()

    def __init__(
        self,
        urls: Union[str, Sequence[str]] = "ws://127.0.0.1:8765",
        token: TokenSource = None,
        *,
        reactor=None,
        initial_delay: float = 0.5,
        max_delay: float = 30.0,
        retry_policy: Optional[Callable[[int], float]] = None,
        batch: bool = True,
        refresh_margin: float = 60.0,
        handshake_timeout: float = 10.0,
        max_message_size: int = 16 << 20,
        tls_options=None,
        recover: bool = True,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        Holdings.__init__(self, urls, recover=recover)
        self._token = token
        self._batch = batch
        self._refresh_margin = refresh_margin
        self._handshake_timeout = handshake_timeout
        self._tls_options = tls_options
        if retry_policy is None:
            # backoffPolicy waits initialDelay * factor ** n before attempt n + 1: shift it so the
            # first retry waits initial_delay; jitter up to half of that.
            backoff = backoffPolicy(initialDelay=initial_delay, maxDelay=max_delay, factor=2.0,
                                    jitter=lambda: random.random() * initial_delay / 2)
            retry_policy = lambda attempt: backoff(attempt - 1)  # noqa: E731
        self._policy = retry_policy
        #: Error frames that answered no request, from every session.
        self.errors: list[MeshError] = []
        self._factory = _Factory(self._targets.current, max_message_size, self._opened, self._open_failed, self.errors)
        self._service = ClientService(_Dialer(self._dial), self._factory, retryPolicy=self._retry_delay,
                                      clock=reactor)
        self._connected_waiters: list[tuple[Deferred, Optional[int]]] = []
        self._close_waiters: list[Deferred] = []
        self._client: Optional[MeshClient] = None  # welcomed and set up
        self._opening: Optional[MeshClient] = None  # connected, being set up
        self._setup_error: Optional[BaseException] = None  # why the session being set up failed
        self._attempt = 0
        self._failures = 0  # attempts in a row that did not end connected
        self._failed_sessions = 0  # of which connections that opened but were not set up
        self._drain_now = False
        self._fatal: Optional[BaseException] = None
        self._closing = False
        self._stopping: Optional[Deferred] = None
        self._refresh_call = None
        self._last_close: Optional[ConnectionClosed] = None
        #: ``connecting``, ``connected``, ``disconnected`` or ``closed`` (after :meth:`startService`).
        self.state = DISCONNECTED
        #: Why it closed for good: None after :meth:`close`, else the error it stopped on.
        self.closed_reason: Optional[BaseException] = None

    # -- what it holds ------------------------------------------------------------------

    @property
    def client(self) -> Optional[MeshClient]:
        """The current session, while connected."""
        return self._client

    @property
    def welcome(self) -> Optional[Message]:
        return self._client.welcome if self._client is not None else None

    @property
    def session_id(self) -> Optional[UUID]:
        return self._client.session_id if self._client is not None else None

    # -- life -----------------------------------------------------------------------------

    def startService(self) -> None:
        """Start connecting (and reconnecting)."""
        if self.running or self._stopping is not None:
            return
        super().startService()
        self._service.startService()

    start = startService

    def stopService(self) -> Deferred:
        """Close the session (WebSocket close 1000) and stop reconnecting; fire once done.  See :meth:`close`."""
        if self._stopping is None:
            self._closing = True
            self._stopping = ensureDeferred(self._shutdown()).addErrback(
                lambda failure: self.log.failure("Closing the client failed", failure))
        if self.running:
            super().stopService()
        d: Deferred = Deferred()
        self._stopping.addBoth(lambda result: (d.callback(None), result)[1])
        return d

    def close(self) -> Deferred:
        """Close for good: the session is closed, nothing reconnects, event streams end."""
        return self.stopService()

    async def _shutdown(self) -> None:
        # Leave the caller's stack first: close() may be called by a listener while ClientService's
        # state machine is in a transition (reporting "connecting"), which it cannot re-enter.
        await deferLater(self._reactor, 0, lambda: None)
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        client = self._client or self._opening
        if client is not None and client.closed_reason is None:
            try:
                await client.close().addTimeout(5, self._reactor)
            except Exception:
                client.abort()
        await self._service.stopService()
        self._set_state(StateChange(CLOSED, url=self.url, error=self._fatal))
        self.closed_reason = self._fatal
        error = self._fatal or NotConnected(CLOSED, *self._last_code())
        waiters, self._connected_waiters = self._connected_waiters, []
        for d, _ in waiters:
            d.errback(error)
        closed, self._close_waiters = self._close_waiters, []
        for d in closed:
            d.callback(self)

    def when_connected(self, fail_after_failures: Optional[int] = None) -> "Deferred[ReconnectingClient]":
        """Fire with this client once it is connected (welcomed, subscriptions back).

        Fails once it closes, or (given ``fail_after_failures``) after that
        many attempts in a row failed, with the last one's error.
        """
        if self.state == CONNECTED:
            return succeed(self)
        if self.state == CLOSED:
            return fail(self._fatal or NotConnected(CLOSED, *self._last_code()))
        d: Deferred = Deferred()
        self._connected_waiters.append((d, fail_after_failures))
        return d

    def when_closed(self) -> Deferred:
        """Fire with this client once it has closed for good."""
        if self.state == CLOSED:
            return succeed(self)
        d: Deferred = Deferred()
        self._close_waiters.append(d)
        return d

    # -- listeners ---------------------------------------------------------------------

    def events(self) -> EventStream:
        """An async iterator over the events that arrive from now on, across reconnects; ends when closed."""
        return EventStream(self)

    # -- requests -----------------------------------------------------------------------

    def _session(self) -> MeshClient:
        if self.state != CONNECTED or self._client is None:
            raise NotConnected(self.state, *self._last_code())
        return self._client

    def request(self, opcode: int, **fields: Any) -> "Deferred[Message]":
        """Send a request on the current session; fail with :class:`NotConnected` if there is none."""
        try:
            return self._session().request(opcode, **fields)
        except NotConnected as e:
            return fail(e)

    def subscribe(self, channel: str) -> "Deferred[Message]":
        """Subscribe; once acknowledged the channel is subscribed to again on every new session."""
        return self._hold(channel, self.request(Opcode.Subscribe, channel=channel))

    def unsubscribe(self, channel: str) -> "Deferred[Message]":
        """Unsubscribe; the channel (and its positions) is forgotten at once, even if the request fails."""
        self._interests.asked(channel)
        self._interests.dropped(channel)
        self._positions.forget(channel)
        return self.request(Opcode.Unsubscribe, channel=channel)

    def history(self, channel: str, limit: int = 0,
                positions: "Optional[Sequence[Position]]" = None) -> "Deferred[HistoryAnswer]":
        """What a history channel holds on the node: the latest ``limit`` events (0: all, at most 1000),
        or those after ``positions``; fire with a :class:`HistoryAnswer` (``events``, ``positions``,
        ``recovered``).  It moves no positions of the client's own."""
        d = self.request(Opcode.History, **history_fields(channel, limit, positions))
        return d.addCallback(history_answer)

    def watch(self, kind: str, ident: str) -> "Deferred[Message]":
        watchable = Watchable(kind, ident)
        return self._hold(watchable, self.request(Opcode.Watch, watchable=watchable))

    def unwatch(self, kind: str, ident: str) -> "Deferred[Message]":
        watchable = Watchable(kind, ident)
        self._interests.asked(watchable)
        self._interests.dropped(watchable)
        return self.request(Opcode.Unwatch, watchable=watchable)

    def _hold(self, key: Union[str, Watchable], d: "Deferred[Message]") -> "Deferred[Message]":
        ticket = self._interests.asked(key)

        def granted(answer: Message) -> Message:
            # Called as the Ack arrives, before any later event: the positions it carries come first.
            self._interests.granted(key, ticket)
            if isinstance(key, str) and key in self._interests.channels:
                self._positions.acked(key, answer)
            return answer

        return d.addCallback(granted)

    def publish(self, channel: str, payload: bytes, *, exclude_self: bool = False,
                ack: bool = True) -> "Optional[Deferred[Message]]":
        """Publish; with ``ack=False`` nothing is awaited (errors land in :attr:`errors`)."""
        if not ack:
            self._session().publish(channel, payload, exclude_self=exclude_self, ack=False)
            return None
        return self.request(Opcode.Publish, channel=channel, payload=payload, exclude_self=exclude_self)

    def ping(self, payload: bytes = b"") -> "Deferred[Message]":
        return self.request(Opcode.Ping, payload=payload)

    def call(self, opcode: int, payload: bytes = b"", *, channel: Optional[str] = None,
             watchable: Optional[Watchable] = None) -> "Deferred[Message]":
        """Send a user opcode (1024 and up); fire with its Ack."""
        return self.request(opcode, payload=payload, channel=channel, watchable=watchable)

    def refresh(self, token: Optional[str] = None) -> "Deferred[Message]":
        """Send Refresh with ``token`` (default: a new one from the token callable)."""
        return ensureDeferred(self._refresh(token))

    # -- connecting -----------------------------------------------------------------------

    def _retry_delay(self, attempt: int) -> float:
        """ClientService's retry policy: backoff over failed attempts and failed sessions, or at once after a drain."""
        if self._drain_now:
            self._drain_now = False
            return drain_delay()
        return self._policy(attempt + self._failed_sessions)

    def _dial(self, factory) -> Deferred:
        url = self._targets.current
        self._attempt += 1
        self._factory.aim(url)
        self._set_state(StateChange(CONNECTING, url=url, attempt=self._attempt))
        d = _endpoint(self._reactor, url, self._tls_options).connect(factory)

        def failed(failure: Failure) -> Failure:
            self.log.info("Cannot reach {url}: {error}", url=url, error=failure.value)
            self._targets.advance()
            self._attempt_failed(failure.value, StateChange(DISCONNECTED, url=url, error=failure.value,
                                                            retry=not self._closing))
            return failure

        return d.addErrback(failed)

    def _open_failed(self, error: ConnectionClosed) -> None:
        """The TCP connection was made, the WebSocket handshake failed (an HTTP 503, for example)."""
        url = self._targets.current
        self.log.info("WebSocket handshake with {url} failed: {error}", url=url, error=error)
        self._failed_sessions += 1
        self._targets.advance()
        self._last_close = error
        self._attempt_failed(error, StateChange(DISCONNECTED, url=url, code=error.code, reason=error.reason,
                                                retry=not self._closing))

    def _attempt_failed(self, error: BaseException, change: StateChange) -> None:
        self._failures += 1
        self._set_state(change)
        waiting, self._connected_waiters = self._connected_waiters, []
        for d, remaining in waiting:
            if remaining is not None and remaining <= 1:
                d.errback(error)
            else:
                self._connected_waiters.append((d, None if remaining is None else remaining - 1))

    def _opened(self, client: MeshClient) -> None:
        client.add_listener(self._deliver)
        client.when_closed().addCallback(self._lost, client)
        if self._closing:
            client.close()
            return
        self._opening = client
        setup = ensureDeferred(self._setup(client)).addTimeout(self._handshake_timeout, self._reactor)
        setup.addErrback(self._setup_failed, client)

    async def _setup(self, client: MeshClient) -> None:
        url = self._targets.current
        token = await self._get_token()
        try:
            await client.hello(token, batch=self._batch)
        except MeshError as e:
            if hello_error_is_fatal(e):
                self._fatal = e
            raise
        requests = self._requests_again()
        asked = []
        for key, opcode, fields in requests:
            d = client.request(opcode, **fields)
            # As each Ack arrives (before any later event): positions, and recovery listeners.
            d.addCallback(self._answered_again_cb, key, fields)
            asked.append(d)
        results = await DeferredList(asked, consumeErrors=True)
        dropped = []
        for (key, _, _), (ok, result) in zip(requests, results, strict=True):
            if ok:
                continue
            if not isinstance(result.value, MeshError):
                result.raiseException()
            self.log.warn("The node refused {key} again after a reconnect: {error}", key=key, error=result.value)
            self._interests.dropped(key)
            self._positions.forget(key)  # type: ignore[arg-type]
            dropped.append((key, result.value))
        if client.closed_reason is not None:
            raise client.closed_reason
        self._opening = None
        self._client = client
        self._failures = self._failed_sessions = 0
        self._attempt = 0
        self.log.info("Connected to {url}, session {session}; {channels} channels and {watches} watches again",
                      url=url, session=client.session_id, channels=len(self._interests.channels),
                      watches=len(self._interests.watchables))
        self._schedule_refresh(token)
        self._set_state(StateChange(CONNECTED, url=url, welcome=client.welcome, dropped=tuple(dropped)))
        waiting, self._connected_waiters = self._connected_waiters, []
        for d, _ in waiting:
            d.callback(self)

    def _answered_again_cb(self, answer: Message, key: Union[str, Watchable], fields: dict) -> Message:
        recovery = self._answered_again(key, fields, answer)
        if recovery is not None:
            if recovery.recovered:
                self.log.info("Recovered {count} events on {channel}", count=recovery.events,
                              channel=recovery.channel)
            else:
                self.log.warn("Not recovered on {channel}: events may be missing", channel=recovery.channel)
            _tell(self.log, self._recovery_listeners, recovery)
        return answer

    def _setup_failed(self, failure: Failure, client: MeshClient) -> None:
        if client.closed_reason is None:
            self.log.info("Session setup failed: {error}", error=failure.value)
            self._setup_error = failure.value
            client.abort()

    async def _get_token(self) -> Optional[str]:
        token = self._token
        if not callable(token):
            return token
        value = await maybeDeferred(token)
        if inspect.isawaitable(value):
            value = await ensureDeferred(value)
        return value

    def _lost(self, reason: ConnectionClosed, client: MeshClient) -> None:
        """A session's connection ended (welcomed or not)."""
        url = self._targets.current
        was_current = client is self._client
        self._last_close = reason
        if was_current:
            self._client = None
            if self._refresh_call is not None and self._refresh_call.active():
                self._refresh_call.cancel()
        else:
            self._opening = None
        action = STOP if self._fatal is not None else close_action(
            reason.code, token_renewable=token_renewable(self._token), closing=self._closing)
        if action == STOP and self._fatal is None and not self._closing:
            self._fatal = reason
        if action == NOW or not was_current:
            self._targets.advance()
        self._drain_now = action == NOW
        self.log.info("Disconnected from {url} (code {code}): {reason}", url=url, code=reason.code,
                      reason=reason.reason)
        change = StateChange(DISCONNECTED, url=url, code=reason.code, reason=reason.reason, retry=action != STOP,
                             error=self._setup_error if not was_current else None)
        error, self._setup_error = self._setup_error or self._fatal or reason, None
        if was_current:
            self._set_state(change)
        else:
            self._failed_sessions += 1
            self._attempt_failed(error, change)
        if action == STOP and not self._closing:
            self.log.warn("Not reconnecting after {error}", error=self._fatal)
            self._reactor.callLater(0, self.stopService)

    def _last_code(self) -> tuple[Optional[int], Optional[str]]:
        last = self._last_close
        return (last.code, last.reason) if last is not None else (None, None)

    def _set_state(self, change: StateChange) -> None:
        if self.state == CLOSED:
            return
        self.state = change.state
        _tell(self.log, self._state_listeners, change)

    def _deliver(self, event: Message) -> None:
        self._positions.seen(event)
        _tell(self.log, self._listeners, event)

    # -- JWT refresh --------------------------------------------------------------------

    def _schedule_refresh(self, token: Optional[str]) -> None:
        exp = jwt_expiry(token) if token_renewable(self._token) else None
        if exp is None:
            return
        delay = refresh_delay(exp, self._reactor.seconds(), self._refresh_margin)
        self.log.debug("Refreshing the token in {delay:.1f} s", delay=delay)
        self._refresh_call = self._reactor.callLater(delay, self._refresh_soon)

    def _refresh_soon(self) -> None:
        def failed(failure: Failure) -> None:
            self.log.warn("Token refresh failed: {error}; the session will end when the token expires",
                          error=failure.value)

        self.refresh().addErrback(failed)

    async def _refresh(self, token: Optional[str]) -> Message:
        client = self._session()
        if token is None:
            token = await self._get_token()
        answer = await client.refresh(token)
        self.log.info("Token refreshed for session {session}", session=client.session_id)
        if client is self._client:
            self._schedule_refresh(token)
        return answer


def connect_reconnecting(
    urls: Union[str, Sequence[str]] = "ws://127.0.0.1:8765",
    token: TokenSource = None,
    *,
    reactor=None,
    fail_after_failures: Optional[int] = None,
    **options: Any,
) -> "Deferred[ReconnectingClient]":
    """Start a :class:`ReconnectingClient` and fire with it once connected.

    With ``fail_after_failures``, fail (and close it) after that many
    attempts in a row failed; ``options`` go to :class:`ReconnectingClient`.
    """
    client = ReconnectingClient(urls, token, reactor=reactor, **options)
    client.startService()

    def failed(failure: Failure) -> Deferred:
        return client.close().addCallback(lambda _: failure)

    return client.when_connected(fail_after_failures).addErrback(failed)
