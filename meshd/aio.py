# -*- test-case-name: tests.test_aio -*-
"""An asyncio client for meshd nodes, on the ``websockets`` library (``pip install meshd[aio]``).

::

    import asyncio
    from meshd.aio import connect

    async def main():
        async with connect("ws://127.0.0.1:8765") as client:
            await client.subscribe("chat")
            await client.publish("chat", b"hello")
            async for event in client.events():
                print(event.channel, event.payload)

    asyncio.run(main())

The client reconnects (unless ``reconnect=False``) with exponential backoff,
says Hello again, and subscribes and watches again what it held, like
:class:`meshd.client.ReconnectingClient`; the rules are shared in
:mod:`meshd.clientcore`.  It imports neither Twisted nor Autobahn.
See docs/clients.md.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from typing import Any, Awaitable, Callable, Optional, Sequence, Union
from uuid import UUID

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WSConnectionClosed
from websockets.exceptions import InvalidURI
from websockets.version import version as websockets_version

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
    backoff_policy,
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
    "Client",
    "ConnectionClosed",
    "EventStream",
    "HistoryAnswer",
    "MeshError",
    "NotConnected",
    "Recovery",
    "StateChange",
    "connect",
]

log = logging.getLogger("meshd.aio")

#: websockets 15 and later dial through the environment's proxy unless told ``proxy=None``.
_WEBSOCKETS_PROXIES = int(websockets_version.split(".")[0]) >= 15

Listener = Callable[[Message], None]
StateListener = Callable[[StateChange], None]
#: A token, or a callable giving one (or an awaitable of one) on each connect.
TokenSource = Union[None, str, Callable[[], Union[Optional[str], Awaitable[Optional[str]]]]]


class Client(Holdings):
    """A session with one of ``urls``, kept open (with ``reconnect``) until :meth:`close`.

    On every connection it says Hello (with ``token``, or what the
    ``token`` callable returns then), subscribes to every channel and
    watches every watchable it held before the cut, and only then reports
    ``connected``.  Without ``reconnect`` it closes for good when its first
    session ends (or cannot start).  Requests made while it has no welcomed
    session raise :class:`NotConnected` at once; requests in flight when the
    connection drops raise :class:`ConnectionClosed`.  Events reach
    listeners and :meth:`events` iterators across reconnects.  On history
    channels (docs/protocol.md section 6) it keeps the positions of what it
    received and, with ``recover`` (the default), subscribes again with
    them, so the node sends the missed events first; recovery listeners
    hear whether it could.
    """

    def __init__(
        self,
        urls: Union[str, Sequence[str]] = "ws://127.0.0.1:8765",
        token: TokenSource = None,
        *,
        reconnect: bool = True,
        initial_delay: float = 0.5,
        max_delay: float = 30.0,
        retry_policy: Optional[Callable[[int], float]] = None,
        batch: bool = True,
        refresh_margin: float = 60.0,
        handshake_timeout: float = 10.0,
        max_message_size: int = 16 << 20,
        ssl: Any = None,
        recover: bool = True,
        **websocket_options: Any,
    ) -> None:
        super().__init__(urls, recover=recover)
        self._token = token
        self._reconnect = reconnect
        self._policy = retry_policy or backoff_policy(initial_delay, max_delay)
        self._batch = batch
        self._refresh_margin = refresh_margin
        self._handshake_timeout = handshake_timeout
        self._ws_options: dict[str, Any] = dict(subprotocols=[SUBPROTOCOL], compression=None,
                                                max_size=max_message_size, open_timeout=handshake_timeout)
        if _WEBSOCKETS_PROXIES:
            self._ws_options["proxy"] = None  # not the environment's HTTP proxy, unless asked for
        if ssl is not None:
            self._ws_options["ssl"] = ssl
        self._ws_options.update(websocket_options)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        #: request id -> called with the answer as it is read (before any later event), not when awaited
        self._on_answer: dict[int, Callable[[Message], None]] = {}
        self._connected_waiters: list[tuple[asyncio.Future, Optional[int]]] = []
        self._closed_event: Optional[asyncio.Event] = None
        self._wake: Optional[asyncio.Event] = None
        self._ws: Optional[ClientConnection] = None
        self._task: Optional[asyncio.Task] = None
        self._refresh_task: Optional[asyncio.Task] = None
        self._attempt = 0
        self._failures = 0
        self._closing = False
        self._fatal: Optional[BaseException] = None
        self._last_close: Optional[ConnectionClosed] = None
        #: The Welcome frame of the current session.
        self.welcome: Optional[Message] = None
        #: ``connecting``, ``connected``, ``disconnected`` or ``closed``.
        self.state = DISCONNECTED
        #: Why it closed for good: None after :meth:`close`, else the error it stopped on.
        self.closed_reason: Optional[BaseException] = None
        #: Error frames that answered no request (request id 0).
        self.errors: list[MeshError] = []

    # -- what it holds ----------------------------------------------------------------

    @property
    def session_id(self) -> Optional[UUID]:
        return self.welcome.session if self.welcome is not None else None

    @property
    def node_id(self) -> Optional[UUID]:
        return self.welcome.node if self.welcome is not None else None

    @property
    def principal(self) -> Optional[str]:
        return self.welcome.principal if self.welcome is not None else None

    # -- life --------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting, in the running event loop."""
        if self._task is None:
            self._closed_event = asyncio.Event()
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="meshd.aio.Client")

    async def wait_connected(self, fail_after_failures: Optional[int] = None) -> "Client":
        """Return once connected (welcomed, subscriptions back).

        Raise once it closes, or (given ``fail_after_failures``) after that
        many attempts in a row failed, with the last one's error.
        """
        if self.state == CONNECTED:
            return self
        if self.state == CLOSED:
            raise self._fatal or NotConnected(CLOSED, *self._last_code())
        future = asyncio.get_running_loop().create_future()
        self._connected_waiters.append((future, fail_after_failures))
        return await future

    async def close(self) -> None:
        """Close for good: the session is closed (1000), nothing reconnects, event streams end."""
        self._closing = True
        if self._task is None:
            self._finish()
            return
        assert self._wake is not None
        self._wake.set()
        ws = self._ws
        if ws is not None:
            await ws.close()
        done, _ = await asyncio.wait({self._task}, timeout=5)
        if not done:
            self._task.cancel()
            await asyncio.wait({self._task})

    async def wait_closed(self) -> None:
        """Return once it has closed for good."""
        if self.state == CLOSED:
            return
        assert self._closed_event is not None, "start() first"
        await self._closed_event.wait()

    async def __aenter__(self) -> "Client":
        self.start()
        await self.wait_connected()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- listeners ------------------------------------------------------------------------

    def events(self) -> "EventStream":
        """An async iterator over the events that arrive from now on, across reconnects; ends when closed."""
        return EventStream(self)

    # -- requests ---------------------------------------------------------------------------

    def _session(self) -> ClientConnection:
        if self.state != CONNECTED or self._ws is None:
            raise NotConnected(self.state, *self._last_code())
        return self._ws

    async def request(self, opcode: int, **fields: Any) -> Message:
        """Send a request on the current session and return its answer; raise :class:`MeshError` for an Error."""
        return await self._request(self._session(), opcode, fields)

    async def subscribe(self, channel: str) -> Message:
        """Subscribe; once acknowledged the channel is subscribed to again on every new session."""
        return await self._hold(channel, Opcode.Subscribe, {"channel": channel})

    async def unsubscribe(self, channel: str) -> Message:
        """Unsubscribe; the channel (and its positions) is forgotten at once, even if the request fails."""
        self._interests.asked(channel)
        self._interests.dropped(channel)
        self._positions.forget(channel)
        return await self.request(Opcode.Unsubscribe, channel=channel)

    async def history(self, channel: str, limit: int = 0,
                      positions: Optional[Sequence[Position]] = None) -> HistoryAnswer:
        """What a history channel holds on the node: the latest ``limit`` events (0: all, at most 1000),
        or those after ``positions``; a :class:`HistoryAnswer` (``events``, ``positions``, ``recovered``).
        It moves no positions of the client's own."""
        return history_answer(await self.request(Opcode.History, **history_fields(channel, limit, positions)))

    async def watch(self, kind: str, ident: str) -> Message:
        watchable = Watchable(kind, ident)
        return await self._hold(watchable, Opcode.Watch, {"watchable": watchable})

    async def unwatch(self, kind: str, ident: str) -> Message:
        watchable = Watchable(kind, ident)
        self._interests.asked(watchable)
        self._interests.dropped(watchable)
        return await self.request(Opcode.Unwatch, watchable=watchable)

    async def _hold(self, key: Union[str, Watchable], opcode: int, fields: dict) -> Message:
        ws = self._session()
        ticket = self._interests.asked(key)

        def granted(answer: Message) -> None:
            # As the Ack is read, before any later event: the positions it carries come first.
            self._interests.granted(key, ticket)
            if isinstance(key, str) and key in self._interests.channels:
                self._positions.acked(key, answer)

        return await self._request(ws, opcode, fields, granted)

    async def publish(self, channel: str, payload: bytes, *, exclude_self: bool = False,
                      ack: bool = True) -> Optional[Message]:
        """Publish; with ``ack=False`` no answer is awaited (errors land in :attr:`errors`)."""
        fields = dict(channel=channel, payload=payload, exclude_self=exclude_self)
        if ack:
            return await self.request(Opcode.Publish, **fields)
        ws = self._session()
        try:
            await ws.send(encode(Opcode.Publish, **fields))
        except WSConnectionClosed:
            raise ConnectionClosed(ws.close_code, ws.close_reason) from None
        return None

    async def ping(self, payload: bytes = b"") -> Message:
        return await self.request(Opcode.Ping, payload=payload)

    async def call(self, opcode: int, payload: bytes = b"", *, channel: Optional[str] = None,
                   watchable: Optional[Watchable] = None) -> Message:
        """Send a user opcode (1024 and up) handled by a server extension; return its Ack."""
        return await self.request(opcode, payload=payload, channel=channel, watchable=watchable)

    async def refresh(self, token: Optional[str] = None) -> Message:
        """Send Refresh with ``token`` (default: a new one from the token callable)."""
        ws = self._session()
        if token is None:
            token = await self._get_token()
        answer = await self._request(ws, Opcode.Refresh, {"token": token})
        log.info("Token refreshed for session %s", self.session_id)
        if ws is self._ws:
            self._schedule_refresh(token)
        return answer

    async def _request(self, ws: ClientConnection, opcode: int, fields: dict,
                       on_answer: Optional[Callable[[Message], None]] = None) -> Message:
        """Send a request; return its answer.  ``on_answer(answer)`` is called as the answer is read, before
        the frames after it are (awaiting the answer resumes later)."""
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        if on_answer is not None:
            self._on_answer[request_id] = on_answer
        try:
            await ws.send(encode(opcode, request_id=request_id, **fields))
            return await future
        except WSConnectionClosed:
            raise ConnectionClosed(ws.close_code, ws.close_reason) from None
        finally:
            self._pending.pop(request_id, None)
            self._on_answer.pop(request_id, None)

    # -- the connection loop -------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self._closing:
                delay = await self._attempt_once()
                if delay is None:
                    break
                assert self._wake is not None
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        except asyncio.CancelledError:
            pass
        except Exception as e:  # a bug: say so, and stop rather than spin
            log.exception("The meshd client failed")
            self._fatal = e
        finally:
            self._finish()

    async def _attempt_once(self) -> Optional[float]:
        """One connection, from dialling to its end; the seconds to wait before the next, or None to stop."""
        url = self._targets.current
        self._attempt += 1
        self._set_state(StateChange(CONNECTING, url=url, attempt=self._attempt))
        try:
            ws = await ws_connect(url, **self._ws_options)
        except Exception as e:  # refused, unreachable, timed out, handshake refused (HTTP 503...)
            log.info("Cannot reach %s: %s", url, e)
            self._targets.advance()
            retry = self._reconnect and not self._closing and not isinstance(e, InvalidURI)
            if not retry and not self._closing:
                self._fatal = e
            self._attempt_failed(e, StateChange(DISCONNECTED, url=url, error=e, retry=retry))
            return self._policy(self._failures) if retry else None
        self._ws = ws
        reader = asyncio.get_running_loop().create_task(self._read(ws))
        setup_error: Optional[BaseException] = None
        welcomed = False
        try:
            token = await asyncio.wait_for(self._setup(ws, url), self._handshake_timeout)
            welcomed = True
        except MeshError as e:
            setup_error = e
            if hello_error_is_fatal(e):
                self._fatal = e
        except (ConnectionClosed, asyncio.TimeoutError, ProtocolError, OSError) as e:
            setup_error = e
        if not welcomed:
            log.info("Session setup with %s failed: %s", url, setup_error)
            await ws.close(1000, "setup failed")
        else:
            self._schedule_refresh(token)
        await reader
        return self._ended(ws, url, welcomed, setup_error)

    async def _setup(self, ws: ClientConnection, url: str) -> Optional[str]:
        if ws.subprotocol != SUBPROTOCOL:
            raise ProtocolError(0, f"the node chose the subprotocol {ws.subprotocol!r}, not {SUBPROTOCOL}")
        token = await self._get_token()
        self.welcome = await self._request(ws, Opcode.Hello,
                                           {"version": PROTOCOL_VERSION, "token": token, "batch": self._batch})
        requests = self._requests_again()

        def again(key: Union[str, Watchable], fields: dict) -> Callable[[Message], None]:
            return lambda answer: self._answered_again_now(key, fields, answer)

        results = await asyncio.gather(*(self._request(ws, opcode, fields, again(key, fields))
                                         for key, opcode, fields in requests), return_exceptions=True)
        dropped = []
        for (key, _, _), result in zip(requests, results, strict=True):
            if isinstance(result, MeshError):
                log.warning("The node refused %s again after a reconnect: %s", key, result)
                self._interests.dropped(key)
                self._positions.forget(key)  # type: ignore[arg-type]
                dropped.append((key, result))
            elif isinstance(result, BaseException):
                raise result
        self._failures = 0
        self._attempt = 0
        log.info("Connected to %s, session %s", url, self.session_id)
        self._set_state(StateChange(CONNECTED, url=url, welcome=self.welcome, dropped=tuple(dropped)))
        waiting, self._connected_waiters = self._connected_waiters, []
        for future, _ in waiting:
            if not future.done():
                future.set_result(self)
        return token

    def _answered_again_now(self, key: Union[str, Watchable], fields: dict, answer: Message) -> None:
        recovery = self._answered_again(key, fields, answer)
        if recovery is None:
            return
        if recovery.recovered:
            log.info("Recovered %d events on %s", recovery.events, recovery.channel)
        else:
            log.warning("Not recovered on %s: events may be missing", recovery.channel)
        _tell(self._recovery_listeners, recovery)

    def _ended(self, ws: ClientConnection, url: str, welcomed: bool, setup_error: Optional[BaseException]) -> Optional[float]:
        """The session on ``ws`` is over: report it; the delay before the next attempt, or None to stop."""
        self._ws = None
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        reason = ConnectionClosed(ws.close_code, ws.close_reason)
        self._last_close = reason
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(reason)
        action = STOP if self._fatal is not None or not self._reconnect else close_action(
            reason.code, token_renewable=token_renewable(self._token), closing=self._closing)
        if action == STOP and self._fatal is None and not self._closing:
            self._fatal = setup_error or reason
        if action == NOW or not welcomed:
            self._targets.advance()
        log.info("Disconnected from %s (code %s): %s", url, reason.code, reason.reason)
        change = StateChange(DISCONNECTED, url=url, code=reason.code, reason=reason.reason, retry=action != STOP,
                             error=setup_error)
        if welcomed:
            self._set_state(change)
        else:
            self._attempt_failed(setup_error or reason, change)
        if action == STOP:
            return None
        return drain_delay() if action == NOW else self._policy(max(1, self._failures))

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                try:
                    events, answer = read_frame(data, isinstance(data, bytes))
                except ProtocolError as e:
                    log.error("Dropping a bad frame from the node: %s", e.message)
                    continue
                for event in events:
                    self._positions.seen(event)
                    _tell(self._listeners, event)
                if answer is not None:
                    self._answered(answer)
        except WSConnectionClosed:
            pass

    def _answered(self, answer: Message) -> None:
        future = self._pending.pop(answer.request_id, None)
        on_answer = self._on_answer.pop(answer.request_id, None)
        if on_answer is not None and answer.opcode != Opcode.Error and future is not None and not future.done():
            try:
                on_answer(answer)
            except Exception:
                log.exception("Handling the answer %r failed", answer)
        if answer.opcode == Opcode.Error:
            error = answer_error(answer)
            if future is None:
                self.errors.append(error)
                log.warning("Error from the node: %s", error)
            elif not future.done():
                future.set_exception(error)
        elif future is not None and not future.done():
            future.set_result(answer)

    def _attempt_failed(self, error: BaseException, change: StateChange) -> None:
        self._failures += 1
        self._set_state(change)
        waiting, self._connected_waiters = self._connected_waiters, []
        for future, remaining in waiting:
            if remaining is not None and remaining <= 1:
                if not future.done():
                    future.set_exception(error)
            else:
                self._connected_waiters.append((future, None if remaining is None else remaining - 1))

    def _finish(self) -> None:
        if self.state == CLOSED:
            return
        self._set_state(StateChange(CLOSED, url=self.url, error=self._fatal))
        self.closed_reason = self._fatal
        error = self._fatal or NotConnected(CLOSED, *self._last_code())
        waiting, self._connected_waiters = self._connected_waiters, []
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error)
        if self._closed_event is not None:
            self._closed_event.set()

    async def _get_token(self) -> Optional[str]:
        token = self._token
        if not callable(token):
            return token
        value = token()
        if inspect.isawaitable(value):
            value = await value
        return value

    def _schedule_refresh(self, token: Optional[str]) -> None:
        exp = jwt_expiry(token) if token_renewable(self._token) else None
        if exp is None:
            return
        delay = refresh_delay(exp, time.time(), self._refresh_margin)
        log.debug("Refreshing the token in %.1f s", delay)
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_later(delay))

    async def _refresh_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.refresh()
        except (MeshError, ConnectionClosed) as e:
            log.warning("Token refresh failed: %s; the session will end when the token expires", e)

    def _last_code(self) -> tuple[Optional[int], Optional[str]]:
        last = self._last_close
        return (last.code, last.reason) if last is not None else (None, None)

    def _set_state(self, change: StateChange) -> None:
        if self.state == CLOSED:
            return
        self.state = change.state
        _tell(self._state_listeners, change)


def _tell(listeners: list, item: Any) -> None:
    for listener in list(listeners):
        try:
            listener(item)
        except Exception:
            log.exception("Listener %r failed", listener)


class EventStream:
    """``async for event in client.events()``: goes on across reconnects, ends when the client closes."""

    _END = object()

    def __init__(self, client: Client) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._client = client
        client.add_listener(self._queue.put_nowait)
        client.add_state_listener(self._state)
        if client.state == CLOSED:
            self._queue.put_nowait(self._END)

    def _state(self, change: StateChange) -> None:
        if change.state == CLOSED:
            self._queue.put_nowait(self._END)

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> Message:
        item = await self._queue.get()
        if item is self._END:
            self._queue.put_nowait(self._END)  # it stays ended
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        """Stop receiving events into this stream."""
        for remove, listener in ((self._client.remove_listener, self._queue.put_nowait),
                                 (self._client.remove_state_listener, self._state)):
            try:
                remove(listener)
            except ValueError:
                pass


class connect:
    """Connect to a node: ``client = await connect(...)`` or ``async with connect(...) as client:``.

    Returns a started :class:`Client` once it is connected; ``async with``
    closes it at the end.  Raises the error that stopped it (a
    :class:`MeshError` when the node refuses the token), or, given
    ``fail_after_failures``, the error of that many failed attempts in a
    row.  With ``reconnect=False`` the first failure is final.
    """

    def __init__(self, urls: Union[str, Sequence[str]] = "ws://127.0.0.1:8765", token: TokenSource = None, *,
                 fail_after_failures: Optional[int] = None, **options: Any) -> None:
        self.client = Client(urls, token, **options)
        self._fail_after = fail_after_failures

    async def _connect(self) -> Client:
        self.client.start()
        try:
            return await self.client.wait_connected(self._fail_after)
        except BaseException:
            await self.client.close()
            raise

    def __await__(self):
        return self._connect().__await__()

    async def __aenter__(self) -> Client:
        return await self._connect()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.client.close()
