# -*- test-case-name: tests.test_session -*-
"""One WebSocket connection's server-side state, and its lifecycle as a state machine.

::

    connected --hello_started--> authenticating --welcome--> welcomed
        ^   |                        |                          |
        |   +------welcome-----------|--------------------------+
        +------hello_refused---------+
    welcomed --refreshed--> welcomed (the expiry timer moves)
    any state but closed --close / hello_timed_out / overflowed--> closing
    welcomed --token_expired--> closing
    any state --lost--> closed

The machine is the only writer of the session's lifecycle fields
(:attr:`Session.phase`, :attr:`Session.principal`, :attr:`Session.grants`,
:attr:`Session.expires`, :attr:`Session.batch`, :attr:`Session.close_code`)
and owns two timers: the hello timer starts when the session opens and stops
when it is welcomed or gone; the expiry timer runs while a welcomed
session's token has an expiry (``welcome`` starts it, ``refreshed`` moves
it, closing stops it) and fires ``token_expired``.  Handlers read the
fields; they change them only through the machine's inputs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterator, Optional, Protocol
from uuid import UUID

from automat import TypeMachineBuilder
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.logger import Logger

from meshd.codec import encode_batch
from meshd.constants import CLOSE_HELLO_TIMEOUT, CLOSE_SLOW_CONSUMER, CLOSE_TOKEN_EXPIRED
from meshd.permissions import NO_GRANTS, Grants
from meshd.wsframes import frame_binary

if TYPE_CHECKING:
    from meshd._io import Outlet
    from meshd.codec import Watchable
    from meshd.events import Event
    from meshd.metrics import Metrics

_OPEN = WebSocketProtocol.STATE_OPEN

#: The phases of a session (:attr:`Session.phase`).
CONNECTED = "connected"
AUTHENTICATING = "authenticating"
WELCOMED = "welcomed"
CLOSING = "closing"
CLOSED = "closed"

#: Largest Batch frame built for a session; more events go in several.
MAX_BATCH_BYTES = 256 * 1024
#: Random bytes read at a time for session ids: one system call per 256 sessions, not one each.
_ID_POOL = 4096


def _random_ids() -> Iterator[UUID]:
    """Version-4 UUIDs cut from os.urandom pools, as uuid4() makes them one system call each."""
    while True:
        pool = os.urandom(_ID_POOL)
        for at in range(0, _ID_POOL, 16):
            yield UUID(bytes=pool[at:at + 16], version=4)


_ids = _random_ids()


def _new_pool_in_child() -> None:
    # A forked process (a worker) must not hand out the ids its parent has yet to.
    global _ids
    _ids = _random_ids()


os.register_at_fork(after_in_child=_new_pool_in_child)


def new_session_id() -> UUID:
    """A new random (version 4) session id, as ``uuid4()`` makes, from a pool of ``os.urandom`` bytes."""
    return next(_ids)


class Lifecycle(Protocol):
    """The inputs of a session's machine."""

    def hello_started(self) -> None:
        "An authenticator is checking a Hello's token."

    def hello_refused(self) -> None:
        "The token proved nothing (or the check failed): the client may try again."

    def welcome(self, principal: Optional[str], batch: bool, expires: Optional[float] = None,
                grants: Grants = NO_GRANTS) -> None:
        "The Hello is accepted; its token, if any, ends at ``expires`` (clock seconds) and grants ``grants``."

    def refreshed(self, expires: Optional[float], grants: Grants) -> None:
        "A Refresh's new token for the same principal is accepted: it ends at ``expires``."

    def token_expired(self) -> None:
        "The session's token expired without a Refresh."

    def hello_timed_out(self) -> None:
        "``limits.hello_timeout`` passed without a Welcome."

    def overflowed(self) -> None:
        "The client stopped reading while its output passed its limit."

    def close(self, code: int, reason: str) -> None:
        "The node closes the session (shutting down, for example)."

    def lost(self) -> None:
        "The connection is gone."


class _Core:
    """What the machine's outputs act on: the session, seen from inside."""

    __slots__ = ("session",)

    def __init__(self, session: "Session") -> None:
        self.session = session


_builder = TypeMachineBuilder(Lifecycle, _Core)
_connected = _builder.state(CONNECTED)
_authenticating = _builder.state(AUTHENTICATING)
_welcomed = _builder.state(WELCOMED)
_closing = _builder.state(CLOSING)
_closed = _builder.state(CLOSED)


def _enter(phase: str):
    def output(lifecycle: Lifecycle, core: _Core, *args) -> None:
        core.session.phase = phase

    return output


_connected.upon(Lifecycle.hello_started).to(_authenticating)(_enter(AUTHENTICATING))
_authenticating.upon(Lifecycle.hello_refused).to(_connected)(_enter(CONNECTED))


def _do_welcome(lifecycle: Lifecycle, core: _Core, principal: Optional[str], batch: bool,
                expires: Optional[float] = None, grants: Grants = NO_GRANTS) -> None:
    session = core.session
    session._stop_hello_timer()
    session.phase = WELCOMED
    session.principal = principal
    session.batch = batch
    session.grants = grants
    session._expire_at(expires)


def _do_refresh(lifecycle: Lifecycle, core: _Core, expires: Optional[float], grants: Grants) -> None:
    session = core.session
    session.grants = grants
    session._expire_at(expires)


_connected.upon(Lifecycle.welcome).to(_welcomed)(_do_welcome)
_authenticating.upon(Lifecycle.welcome).to(_welcomed)(_do_welcome)
_welcomed.upon(Lifecycle.refreshed).loop()(_do_refresh)


def _closer(code: int, reason: str):
    def output(lifecycle: Lifecycle, core: _Core) -> None:
        core.session._close(code, reason)

    return output


def _do_close(lifecycle: Lifecycle, core: _Core, code: int, reason: str) -> None:
    core.session._close(code, reason)


_welcomed.upon(Lifecycle.token_expired).to(_closing)(_closer(CLOSE_TOKEN_EXPIRED, "token expired"))
for _state in (_connected, _authenticating):
    _state.upon(Lifecycle.hello_timed_out).to(_closing)(_closer(CLOSE_HELLO_TIMEOUT, "no Hello in time"))
for _state in (_connected, _authenticating, _welcomed):
    _state.upon(Lifecycle.overflowed).to(_closing)(
        _closer(CLOSE_SLOW_CONSUMER, "slow consumer: send buffer full")
    )
    _state.upon(Lifecycle.close).to(_closing)(_do_close)


def _do_lost(lifecycle: Lifecycle, core: _Core) -> None:
    session = core.session
    session._stop_hello_timer()
    session._expire_at(None)
    session.phase = CLOSED
    session.queue.clear()


for _state in (_connected, _authenticating, _welcomed, _closing):
    _state.upon(Lifecycle.lost).to(_closed)(_do_lost)

# What arrives too late to matter: a token check finishing after the close,
# a timer or an overflow racing a close, a second close.
for _input in (Lifecycle.hello_refused, Lifecycle.welcome, Lifecycle.hello_timed_out, Lifecycle.overflowed,
               Lifecycle.close, Lifecycle.refreshed, Lifecycle.token_expired):
    _closing.upon(_input).loop()(lambda lifecycle, core, *args: None)
    _closed.upon(_input).loop()(lambda lifecycle, core, *args: None)
_closed.upon(Lifecycle.lost).loop()(lambda lifecycle, core: None)

_Machine = _builder.build()


class Session:
    """A connected client: identity, subscriptions, watches, and the way to reach it.

    What is sent to the session goes to its :class:`~meshd._io.Outlet`, which
    gathers a turn's frames into one write and bounds what may wait for a
    client that does not read.  A session that asked for Batch frames also
    has a :attr:`queue` of this turn's channel events: at the end of the
    turn, or before anything else is sent to it, they become Batch frames
    (:meth:`coalesce`), so the session receives everything in the order it
    was emitted.
    """

    __slots__ = (
        "id", "protocol", "peer", "outlet", "metrics", "phase", "principal", "grants", "expires", "batch", "info",
        "close_code", "channels", "watching", "lifecycle", "queue", "_clock", "_hello_timer", "_expiry_timer",
        "__weakref__",
    )

    log = Logger()

    def __init__(
        self,
        protocol,
        outlet: "Outlet",
        *,
        peer: str = "",
        session_id: Optional[UUID] = None,
        clock=None,
        hello_timeout: float = 0,
        metrics: "Optional[Metrics]" = None,
    ) -> None:
        self.id: UUID = session_id or new_session_id()
        self.protocol = protocol
        self.peer = peer
        self.outlet = outlet
        self.metrics = metrics
        #: One of connected, authenticating, welcomed, closing, closed (written by the machine).
        self.phase = CONNECTED
        #: Who the Hello's token proved; None for an anonymous session.
        self.principal: Optional[str] = None
        #: What its token grants beyond the rules (see meshd.permissions.Grants).
        self.grants: Grants = NO_GRANTS
        #: When its token expires, in the clock's seconds; None: never (or no token).
        self.expires: Optional[float] = None
        #: Whether it takes Batch frames (said so in its Hello).
        self.batch = False
        #: What the client's Hello said about itself (``info``), shown in presence.
        self.info: Optional[str] = None
        #: The close code the node sent it, if the node closed it.
        self.close_code: Optional[int] = None
        self.channels: set[str] = set()
        self.watching: set[Watchable] = set()
        #: The segments of channel events queued for this turn's Batch frames
        #: (by :mod:`meshd.delivery`); nothing joins a segment once something
        #: follows it here.
        self.queue: list[Segment] = []
        self._clock = clock
        self._hello_timer = None
        self._expiry_timer = None
        self.lifecycle: Lifecycle = _Machine(_Core(self))
        outlet.on_overflow = self.lifecycle.overflowed
        outlet.accepting = True  # the WebSocket is open
        if hello_timeout > 0 and clock is not None:
            self._hello_timer = clock.callLater(hello_timeout, self.lifecycle.hello_timed_out)

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.peer} {self.phase}>"

    # -- what handlers read ------------------------------------------------------

    @property
    def helloed(self) -> bool:
        """Welcomed: it said Hello and was accepted."""
        return self.phase == WELCOMED

    @property
    def hello_pending(self) -> bool:
        """An authenticator is checking its Hello's token."""
        return self.phase == AUTHENTICATING

    @property
    def authenticated(self) -> bool:
        return self.principal is not None

    @property
    def overflowed(self) -> bool:
        """Closed for falling too far behind."""
        return self.close_code == CLOSE_SLOW_CONSUMER

    @property
    def is_open(self) -> bool:
        return self.protocol.state == _OPEN

    # -- sending -------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Send one framed WebSocket message if the connection is open; return whether it was sent."""
        if self.queue:
            self.coalesce(None)  # what was emitted before it goes before it
        return self.outlet.write(data)

    def send_frame(self, frame: bytes) -> bool:
        """Send one encoded frame to this session alone."""
        return self.send(frame_binary(frame))

    def send_events(self, frames: "list[bytes]") -> None:
        """Send Event frames to this session alone, in order: in Batch frames when it takes them."""
        if not self.batch:
            for frame in frames:
                self.send_frame(frame)
            return
        for group in _groups(frames, lambda frame: frame):
            self.send_frame(encode_batch(group) if len(group) > 1 else group[0])

    def coalesce(self, shared: "Optional[dict]") -> None:
        """Turn the queued segments into frames, in order, and send them.

        Sessions whose queues hold the same segments share the frames
        through ``shared`` (one dict per turn), so a Batch frame is encoded
        and framed once for all of them.
        """
        queue = self.queue
        if not queue:
            return
        self.queue = []
        last = queue[-1]
        last.open = False  # what follows it for this session must not join it
        key = last if len(queue) == 1 else tuple(queue)
        found = shared.get(key) if shared is not None else None
        if found is None:
            found = _batch_messages([event for segment in queue for event in segment.events])
            if shared is not None:
                shared[key] = found
        messages, count = found
        outlet = self.outlet
        for message in messages:
            if not outlet.write(message):
                return
        if self.metrics is not None:
            self.metrics.deliveries += count

    # -- the machine's helpers -----------------------------------------------------

    def _close(self, code: int, reason: str) -> None:
        self._stop_hello_timer()
        self._expire_at(None)
        self.phase = CLOSING
        self.close_code = code
        self.queue.clear()
        if code == CLOSE_SLOW_CONSUMER:
            self.log.warn(
                "Closing slow session {session}: {backlog} bytes waiting",
                session=self.id, backlog=self.outlet.backlog,
            )
        elif code == CLOSE_HELLO_TIMEOUT:
            self.log.info("Closing {session}: no Hello in time", session=self.id)
        elif code == CLOSE_TOKEN_EXPIRED:
            self.log.info("Closing {session}: its token expired", session=self.id)
        if self.protocol.state == _OPEN:
            self.protocol.sendClose(code, reason)

    def _expire_at(self, expires: Optional[float]) -> None:
        """(Re)start the expiry timer for ``expires``, or stop it for None."""
        timer, self._expiry_timer = self._expiry_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.expires = expires
        if expires is not None and self._clock is not None:
            delay = max(0.0, expires - self._clock.seconds())
            self._expiry_timer = self._clock.callLater(delay, self.lifecycle.token_expired)

    def _stop_hello_timer(self) -> None:
        timer, self._hello_timer = self._hello_timer, None
        if timer is not None and timer.active():
            timer.cancel()


class Segment:
    """Events of one channel, in order, that the same sessions receive one after the other.

    While a segment is :attr:`open`, the channel's next event joins it, and
    so reaches every session that queued it at once; it closes when
    anything else follows it in one of those sessions' queues, when one of
    them is sent something else, when the channel's batch subscribers
    change, and at the end of the turn (see :mod:`meshd.delivery`).
    """

    __slots__ = ("events", "open")

    def __init__(self, event: "Event", open: bool = True) -> None:
        self.events = [event]
        self.open = open


def _groups(items: list, frame_of) -> "Iterator[list]":
    """``items`` in runs whose Event frames fit one Batch frame (at most MAX_BATCH_BYTES of entries)."""
    group: list = []
    size = 0
    for item in items:
        cost = len(frame_of(item)) + 4
        if group and size + cost > MAX_BATCH_BYTES:
            yield group
            group, size = [], 0
        group.append(item)
        size += cost
    if group:
        yield group


def _batch_messages(events: "list[Event]") -> "tuple[list[bytes], int]":
    """``events`` as WebSocket messages (Batch frames of at most MAX_BATCH_BYTES, a lone event as
    itself), and how many events they hold."""
    return [_one_message(group) for group in _groups(events, lambda e: e.frame)], len(events)


def _one_message(group: "list[Event]") -> bytes:
    if len(group) == 1:
        return group[0].wire
    return frame_binary(encode_batch([event.frame for event in group]))
