# -*- test-case-name: tests.test_client -*-
"""A Twisted client for meshd nodes.

::

    from meshd.client import connect

    async def main(reactor):
        client = await connect("ws://127.0.0.1:8765", reactor=reactor)
        await client.subscribe("chat")
        await client.publish("chat", b"hello")
        async for event in client.events():
            print(event.channel, event.payload)

Every request returns a Deferred that fires with the node's answer (an
``Ack``, ``Welcome`` or ``Pong`` :class:`~meshd.codec.Message`) or fails with
:class:`MeshError` carrying the node's error code.  Events reach callbacks
added with :meth:`MeshClient.add_listener` and the async iterators made by
:meth:`MeshClient.events`.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional
from uuid import UUID

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.internet.defer import Deferred, DeferredQueue, ensureDeferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from meshd.codec import (
    PROTOCOL_VERSION,
    Message,
    Opcode,
    ProtocolError,
    Watchable,
    decode,
    encode,
    error_code_name,
    unpack_batch,
)
from meshd.constants import SUBPROTOCOL

Listener = Callable[[Message], None]


class MeshError(Exception):
    """The node answered a request with an Error frame."""

    def __init__(self, code: int, message: str, request_id: int = 0) -> None:
        super().__init__(f"{error_code_name(code)}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class ConnectionClosed(Exception):
    """The WebSocket connection closed; ``code`` and ``reason`` are what the node said."""

    def __init__(self, code: Optional[int], reason: Optional[str]) -> None:
        super().__init__(f"connection closed (code {code}): {reason}")
        self.code = code
        self.reason = reason


class _Protocol(WebSocketClientProtocol):
    _log = Logger()
    factory: "_Factory"
    client: "Optional[MeshClient]" = None

    def onOpen(self) -> None:
        self.client = MeshClient(self)
        self.factory.opened.callback(self.client)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.client is not None:
            self.client._received(payload, isBinary)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if self.client is not None:
            self.client._lost(ConnectionClosed(code, reason))
        elif not self.factory.opened.called:
            self.factory.opened.errback(ConnectionClosed(code, reason))


class _Factory(WebSocketClientFactory):
    protocol = _Protocol

    def __init__(self, url: str, max_message_size: int) -> None:
        super().__init__(url, protocols=[SUBPROTOCOL])
        self.opened: Deferred[MeshClient] = Deferred()
        self.setProtocolOptions(
            utf8validateIncoming=False,
            maxMessagePayloadSize=max_message_size,
            maxFramePayloadSize=max_message_size,
            failByDrop=False,
            tcpNoDelay=True,
            closeHandshakeTimeout=5,
            serverConnectionDropTimeout=5,
        )


class MeshClient:
    """One session with a node.  Made by :func:`connect`."""

    log = Logger()

    def __init__(self, protocol: _Protocol) -> None:
        self._protocol = protocol
        self._ids = itertools.count(1)
        self._pending: dict[int, Deferred[Message]] = {}
        self._listeners: list[Listener] = []
        self.session_id: Optional[UUID] = None
        self.node_id: Optional[UUID] = None
        self.principal: Optional[str] = None
        self.max_message_size = 0
        #: Why the connection ended, once it has.
        self.closed_reason: Optional[ConnectionClosed] = None
        self._close_waiters: list[Deferred[ConnectionClosed]] = []
        #: Error frames that answered no request (request id 0).
        self.errors: list[MeshError] = []

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
        """Send one frame with a fresh request id; fire with the answer to it."""
        if self.closed_reason is not None:
            return fail(self.closed_reason)
        request_id = next(self._ids)
        d: Deferred[Message] = Deferred()
        self._pending[request_id] = d
        self.send(opcode, request_id=request_id, **fields)
        return d

    def hello(self, token: Optional[str] = None, batch: bool = True) -> "Deferred[Message]":
        """Say Hello; with ``batch`` (the default) the node may send Batch frames, unpacked here."""
        def welcomed(welcome: Message) -> Message:
            self.session_id, self.node_id = welcome.session, welcome.node
            self.principal, self.max_message_size = welcome.principal, welcome.max_message_size
            return welcome

        d = self.request(Opcode.Hello, version=PROTOCOL_VERSION, token=token, batch=batch)
        return d.addCallback(welcomed)

    def subscribe(self, channel: str) -> "Deferred[Message]":
        return self.request(Opcode.Subscribe, channel=channel)

    def unsubscribe(self, channel: str) -> "Deferred[Message]":
        return self.request(Opcode.Unsubscribe, channel=channel)

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

    def close(self, code: int = 1000, reason: str = "bye") -> "Deferred[ConnectionClosed]":
        """Close the connection; fire once it is closed."""
        if self.closed_reason is None:
            self._protocol.sendClose(code, reason)
        return self.when_closed()

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
            if not binary:
                raise ProtocolError(0, "text message from the node")
            message = decode(data)
        except ProtocolError as e:
            self.log.error("Dropping a bad frame from the node: {error}", error=e.message)
            return
        if message.opcode in (Opcode.Event, Opcode.Batch):
            try:
                events = unpack_batch(message) if message.opcode == Opcode.Batch else [message]
            except ProtocolError as e:
                self.log.error("Dropping a bad batch from the node: {error}", error=e.message)
                return
            for event in events:
                for listener in list(self._listeners):
                    try:
                        listener(event)
                    except Exception:
                        self.log.failure("Event listener {listener} failed", listener=listener)
            return
        d = self._pending.pop(message.request_id, None)
        if message.opcode == Opcode.Error:
            error = MeshError(message.error_code, message.message or "", message.request_id)
            if d is None:
                self.errors.append(error)
                self.log.warn("Error from the node: {error}", error=error)
            else:
                d.errback(error)
        elif d is not None:
            d.callback(message)

    def _lost(self, reason: ConnectionClosed) -> None:
        pending, self._pending = self._pending, {}
        self.closed_reason = reason
        for d in pending.values():
            d.errback(reason)
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(reason)


class EventStream:
    """``async for event in client.events()``: ends when the connection closes."""

    _END = object()

    def __init__(self, client: MeshClient) -> None:
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
        if self._queue.put in self._client._listeners:
            self._client.remove_listener(self._queue.put)


async def _connect(reactor, url: str, token: Optional[str], hello: bool,
                   max_message_size: int, tls_options) -> MeshClient:
    secure, host, port, _resource, _path, _params = parse_url(url)
    factory = _Factory(url, max_message_size)
    endpoint = HostnameEndpoint(reactor, host, port)
    if secure:
        endpoint = wrapClientTLS(tls_options or optionsForClientTLS(host), endpoint)
    await endpoint.connect(factory)
    client = await factory.opened
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
    ``TimeoutError`` after ``timeout`` seconds.
    """
    if reactor is None:
        from twisted.internet import reactor
    d = ensureDeferred(_connect(reactor, url, token, hello, max_message_size, tls_options))
    return d.addTimeout(timeout, reactor)
