# -*- test-case-name: tests.test_registry -*-
"""One WebSocket connection's server-side state."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Optional
from uuid import UUID, uuid4

from autobahn.websocket.protocol import PreparedMessage, WebSocketProtocol
from twisted.logger import Logger
from twisted.internet.interfaces import IPushProducer
from twisted.internet.tcp import Client, Server
from zope.interface import implementer

if TYPE_CHECKING:
    from meshd.codec import Watchable

_OPEN = WebSocketProtocol.STATE_OPEN

#: Close code sent to a session that stops reading while events pile up for it.
CLOSE_SLOW_CONSUMER = 4002


_HEAD_16 = struct.Struct(">BBH")
_HEAD_64 = struct.Struct(">BBQ")


def prepare(frame: bytes) -> PreparedMessage:
    """Frame ``frame`` as one binary WebSocket message, once, for any number of sessions.

    The same as ``PreparedMessage(frame, True, False, True)`` (final,
    binary, unmasked; ``doNotCompress`` keeps the bytes valid on every
    connection, including one that negotiated permessage-deflate), without
    the general constructor's work: this runs for every event.
    """
    n = len(frame)
    if n < 126:
        head = bytes((0x82, n))
    elif n < 0x10000:
        head = _HEAD_16.pack(0x82, 126, n)
    else:
        head = _HEAD_64.pack(0x82, 127, n)
    prepared = _new_prepared(PreparedMessage)
    prepared.doNotCompress = True
    prepared.payloadHybi = head + frame
    return prepared


_new_prepared = object.__new__

_PLAIN_TCP = (Server, Client)


def write_now(transport, data: bytes) -> None:
    """Write ``data`` to ``transport``, to the kernel at once when nothing is queued before it.

    On a plain TCP connection whose Twisted buffer is empty this is one
    ``send()`` system call, with no registration for write events (two
    ``epoll_ctl`` calls otherwise) and no wait for the next poll; what the
    kernel does not take, and anything on other transports, goes through
    ``transport.write`` as usual.
    """
    if (
        type(transport) in _PLAIN_TCP
        and transport.connected
        and not transport.disconnecting
        and not transport._aborting
        and not transport.TLS
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
        # else the connection is gone: the buffered write fails again at the
        # next poll, where the reactor closes the connection, also when it
        # no longer reads from it.
    transport.write(data)


class Flusher:
    """Writes, once per reactor turn, what each session was sent during the turn.

    A publish fans out to many sessions, and several publishes often arrive
    in one read: gathering each session's frames and writing them together
    at the end of the turn costs one system call per connection instead of
    one per frame, and no write-event registration when the kernel takes it
    all.  The turn ends before the reactor polls again, so nothing waits
    longer than it would in Twisted's own write buffer.
    """

    __slots__ = ("clock", "_dirty", "_call")

    def __init__(self, clock) -> None:
        self.clock = clock
        self._dirty: list[Session] = []
        self._call = None

    def mark(self, session: "Session") -> None:
        self._dirty.append(session)
        if self._call is None:
            self._call = self.clock.callLater(0, self.flush)

    log = Logger()

    def flush(self) -> None:
        self._call = None
        dirty, self._dirty = self._dirty, []
        for session in dirty:
            try:
                session.flush()
            except Exception:  # one broken connection must not stall the others
                self.log.failure("Writing to {session} failed", session=session)


class TurnBacklog:
    """Producer methods that count what is written while a transport stays full.

    A transport pauses its producer when its buffer fills.  What is written
    within the same reactor turn is not counted (the peer had no chance to
    read it yet); from the next turn on, while the transport stays paused,
    the writer adds each write's size to ``_backlog`` and judges the peer
    slow past its own limit.  Users provide ``clock`` (``None``: count at
    once), ``_counting``, ``_arming`` and ``_backlog``.
    """

    __slots__ = ()

    def pauseProducing(self) -> None:
        if self.clock is None:
            self._start_counting()
        elif self._arming is None:
            self._arming = self.clock.callLater(0, self._start_counting)

    def _start_counting(self) -> None:
        self._arming = None
        self._counting = True
        self._backlog = 0

    def resumeProducing(self) -> None:
        if self._arming is not None:
            self._arming.cancel()
            self._arming = None
        self._counting = False
        self._backlog = 0

    def stopProducing(self) -> None:
        self.resumeProducing()


@implementer(IPushProducer)
class Session(TurnBacklog):
    """A connected client: identity, subscriptions, watches, and the way to reach it.

    The session registers itself as the streaming producer of its transport,
    so it learns when the kernel buffer and Twisted's write buffer are full.
    From the next reactor turn on, while the transport stays paused, what is
    sent to it is counted: past ``max_backlog`` bytes the client is too slow
    to keep up, and it is disconnected rather than allowed to grow the
    node's memory without bound.  A burst written within one turn is not
    counted, since the client has had no chance to read any of it yet.
    """

    __slots__ = (
        "id",
        "protocol",
        "peer",
        "principal",
        "authenticated",
        "helloed",
        "hello_pending",
        "batch",
        "channels",
        "watching",
        "max_backlog",
        "overflowed",
        "clock",
        "flusher",
        "_pending",
        "_counting",
        "_arming",
        "_backlog",
        "__weakref__",
    )

    log = Logger()

    def __init__(self, protocol, peer: str = "", max_backlog: int = 1 << 20,
                 session_id: Optional[UUID] = None, clock=None, flusher: "Optional[Flusher]" = None) -> None:
        self.id: UUID = session_id or uuid4()
        self.protocol = protocol
        self.peer = peer
        self.principal: Optional[str] = None
        self.authenticated = False
        self.helloed = False
        self.hello_pending = False  # an authenticator is checking its token
        self.batch = False  # takes Batch frames (said so in its Hello)
        self.channels: set[str] = set()
        self.watching: set[Watchable] = set()
        self.max_backlog = max_backlog
        self.overflowed = False  # closed for falling too far behind
        self.clock = clock
        self.flusher = flusher
        self._pending: list[bytes] = []
        self._counting = False  # the transport has stayed paused past a reactor turn
        self._arming = None  # the call that starts counting, while it is pending
        self._backlog = 0

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.peer}>"

    @property
    def is_open(self) -> bool:
        return self.protocol.state == _OPEN

    def send(self, prepared: PreparedMessage) -> bool:
        """Send a prepared message if the connection is open; return whether it was sent."""
        protocol = self.protocol
        if protocol.state != _OPEN:
            return False
        if self._counting:
            self._backlog += len(prepared.payloadHybi)
            if self._backlog > self.max_backlog:
                self.log.warn(
                    "Closing slow session {session}: {backlog} bytes waiting",
                    session=self.id,
                    backlog=self._backlog,
                )
                self.overflowed = True
                protocol.sendClose(CLOSE_SLOW_CONSUMER, "slow consumer: send buffer full")
                return False
        # The frame's bytes, not sendPreparedMessage: that would do the same
        # for an uncompressed connection, plus per-call logging and
        # statistics.  The node never negotiates compression and never uses
        # Autobahn's send queue.
        if self.flusher is None:
            protocol.transport.write(prepared.payloadHybi)
            return True
        pending = self._pending
        pending.append(prepared.payloadHybi)
        if len(pending) == 1:
            self.flusher.mark(self)
        return True

    def flush(self) -> None:
        """Write what was sent to this session in this reactor turn, in one piece (:func:`write_now`)."""
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        transport = self.protocol.transport
        if transport is not None:
            write_now(transport, data)

    def send_frame(self, frame: bytes) -> bool:
        """Send one encoded frame to this session alone."""
        return self.send(prepare(frame))
