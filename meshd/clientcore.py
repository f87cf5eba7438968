# -*- test-case-name: tests.test_client_reconnect, tests.test_aio -*-
"""What meshd's two Python clients share, with no I/O: neither Twisted nor asyncio.

:mod:`meshd.client` (Twisted) and :mod:`meshd.aio` (asyncio) both use these
pieces, so that they read frames, name errors, decide about close codes,
remember subscriptions and schedule token refreshes the same way.  This
module imports neither Twisted nor Autobahn nor websockets.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

from uuid import UUID

from meshd.codec import (
    ErrorCode,
    Message,
    Opcode,
    Position,
    ProtocolError,
    Watchable,
    decode,
    error_code_name,
    unpack_batch,
)
from meshd.constants import (
    CLOSE_DISCONNECTED,
    CLOSE_DRAINING,
    CLOSE_GOING_AWAY,
    CLOSE_HELLO_FAILURES,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_UNSUPPORTED_DATA,
)

__all__ = [
    "CLOSED",
    "CONNECTED",
    "CONNECTING",
    "DISCONNECTED",
    "ConnectionClosed",
    "HistoryAnswer",
    "Interests",
    "MeshError",
    "NotConnected",
    "Positions",
    "Recovery",
    "StateChange",
    "Targets",
    "backoff_policy",
    "close_action",
    "history_answer",
    "hello_error_is_fatal",
    "jwt_expiry",
    "read_frame",
    "refresh_delay",
]

#: The states a reconnecting client reports, in the order of a normal life:
#: ``connecting`` (an attempt starts), ``connected`` (welcomed, and every
#: channel and watchable before the cut subscribed and watched again),
#: ``disconnected`` (an attempt failed or a session ended), ``closed`` (for good).
CONNECTING = "connecting"
CONNECTED = "connected"
DISCONNECTED = "disconnected"
CLOSED = "closed"


class MeshError(Exception):
    """The node answered a request with an Error frame; ``code`` is an ``ErrorCode``."""

    def __init__(self, code: int, message: str, request_id: int = 0) -> None:
        super().__init__(f"{error_code_name(code)}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id

    @property
    def name(self) -> str:
        """The error code's name, such as ``"PermissionDenied"``."""
        return error_code_name(self.code)


class ConnectionClosed(Exception):
    """The WebSocket connection closed; ``code`` and ``reason`` are what the node said.

    ``code`` is None (or 1006) when the connection dropped without a close frame.
    """

    def __init__(self, code: Optional[int], reason: Optional[str]) -> None:
        super().__init__(f"connection closed (code {code}): {reason}")
        self.code = code
        self.reason = reason


class NotConnected(ConnectionClosed):
    """A request made while a reconnecting client has no welcomed session: it was not sent.

    ``code`` and ``reason`` are those of the last connection's close, if any.
    """

    def __init__(self, state: str, code: Optional[int] = None, reason: Optional[str] = None) -> None:
        Exception.__init__(self, f"not connected ({state}; last close code {code}: {reason})")
        self.state = state
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class StateChange:
    """What a reconnecting client tells its state listeners.

    - ``connecting``: ``url`` and ``attempt`` (1 for the first attempt after
      a success or at start);
    - ``connected``: ``url`` and ``welcome`` (the Welcome frame); ``dropped``
      lists the channels and watchables that the node refused to subscribe or
      watch again (they are forgotten), with the error;
    - ``disconnected``: ``code`` and ``reason`` of the close (``code`` None
      when no WebSocket was opened), or ``error`` for a failed attempt, and
      ``retry``: whether the client will try again;
    - ``closed``: ``error`` is why it stopped (None after :meth:`close`).
    """

    state: str
    url: Optional[str] = None
    attempt: int = 0
    welcome: Optional[Message] = None
    code: Optional[int] = None
    reason: Optional[str] = None
    error: Optional[BaseException] = None
    retry: bool = True
    dropped: tuple = ()

    def describe(self) -> str:
        """One line for people, as ``meshctl`` prints it."""
        if self.state == CONNECTED:
            return f"connected to {self.url}"
        if self.state == CONNECTING:
            return f"connecting to {self.url} (attempt {self.attempt})"
        if self.state == DISCONNECTED:
            if self.code is None:
                what = f"connection failed: {self.error}"
            else:
                what = f"disconnected (code {self.code})" + (f": {self.reason}" if self.reason else "")
            return f"{what}; {'reconnecting' if self.retry else 'not reconnecting'}"
        return f"closed: {self.error}" if self.error is not None else "closed"


# -- frames ---------------------------------------------------------------------


def read_frame(data: bytes, binary: bool = True) -> "tuple[list[Message], Optional[Message]]":
    """Decode one message from the node into (events, answer).

    Event and Batch frames give events (a Batch unpacked, in order) and no
    answer; Welcome, Ack, Pong and Error frames give no events and the
    answer.  Raise :class:`ProtocolError` for a text message or a frame that
    does not decode.
    """
    if not binary:
        raise ProtocolError(ErrorCode.Malformed, "text message from the node")
    message = decode(data)
    if message.opcode == Opcode.Event:
        return [message], None
    if message.opcode == Opcode.Batch:
        return unpack_batch(message), None
    return [], message


def answer_error(message: Message) -> MeshError:
    """The :class:`MeshError` an Error frame stands for."""
    return MeshError(message.error_code, message.message or "", message.request_id)


# -- close codes ------------------------------------------------------------------

#: Close codes after which the client does not reconnect (docs/protocol.md section 9):
#: the client itself is broken (1002, 1003), its tokens are refused and the
#: address's budget of refused tokens refills slowly (4003), or the backend
#: disconnected it on purpose (4006: the application may connect again).
FATAL_CLOSE_CODES = frozenset({CLOSE_PROTOCOL_ERROR, CLOSE_UNSUPPORTED_DATA, CLOSE_HELLO_FAILURES,
                               CLOSE_DISCONNECTED})

STOP, NOW, BACKOFF = "stop", "now", "backoff"


def close_action(code: Optional[int], *, token_renewable: bool, closing: bool = False) -> str:
    """What to do after a session ended with ``code``: ``"stop"``, ``"now"`` or ``"backoff"``.

    ``"now"``: the node is draining (4007, or 1000 from a node that did not
    say 4007 yet): reconnect at once, to the next URL.  A session whose token
    expired (4005) is retried only when a token callable can give a new token.
    ``closing``: the application closed the client.
    """
    if closing or code in FATAL_CLOSE_CODES:
        return STOP
    if code == CLOSE_TOKEN_EXPIRED and not token_renewable:
        return STOP
    if code in (CLOSE_DRAINING, CLOSE_GOING_AWAY):
        return NOW
    return BACKOFF


def hello_error_is_fatal(error: MeshError) -> bool:
    """A refused Hello that retrying cannot fix: a refused token, or a protocol version the node does not speak."""
    return error.code in (ErrorCode.AuthenticationFailed, ErrorCode.UnsupportedVersion)


# -- retry delays ---------------------------------------------------------------------


def backoff_policy(initial_delay: float = 0.5, max_delay: float = 30.0, factor: float = 2.0,
                   jitter: Optional[Callable[[], float]] = None) -> Callable[[int], float]:
    """Seconds to wait before retry ``n`` (1, 2, ...): ``initial_delay * factor ** (n - 1)``, at most
    ``max_delay``, plus ``jitter()`` (default: up to half of ``initial_delay``).

    What :mod:`meshd.client` makes of Twisted's ``backoffPolicy``;
    :mod:`meshd.aio` may not import Twisted.
    """
    if jitter is None:
        jitter = lambda: random.random() * initial_delay / 2  # noqa: E731

    def policy(attempt: int) -> float:
        try:
            delay = min(initial_delay * factor ** min(100, attempt - 1), max_delay)
        except OverflowError:
            delay = max_delay
        return delay + jitter()

    return policy


def drain_delay(jitter: Callable[[], float] = random.random) -> float:
    """The short random wait before reconnecting after a drain (4007): up to 0.2 s."""
    return 0.2 * jitter()


class Targets:
    """The URLs a client connects to, tried in turn."""

    def __init__(self, urls: Union[str, Sequence[str]]) -> None:
        self.urls: tuple[str, ...] = (urls,) if isinstance(urls, str) else tuple(urls)
        if not self.urls:
            raise ValueError("give at least one URL")
        self._at = 0

    @property
    def current(self) -> str:
        return self.urls[self._at]

    def advance(self) -> str:
        """Move to the next URL (the first after the last); return it."""
        self._at = (self._at + 1) % len(self.urls)
        return self.current


# -- what to subscribe again ---------------------------------------------------------


@dataclass
class Interests:
    """The channels and watchables a client holds, to subscribe and watch again after a cut.

    A channel counts once its Subscribe is acknowledged, and stops counting
    as soon as an Unsubscribe is asked for.  :meth:`asked` and :meth:`granted`
    keep a Subscribe acknowledged after a later Unsubscribe was asked for
    from counting.
    """

    channels: dict = field(default_factory=dict)  # channel -> None, in subscription order
    watchables: dict = field(default_factory=dict)  # Watchable -> None
    _asks: dict = field(default_factory=dict)  # key -> how many asks so far

    def asked(self, key: Union[str, Watchable]) -> int:
        """A Subscribe, Unsubscribe, Watch or Unwatch of ``key`` is being sent; return its ticket."""
        ticket = self._asks.get(key, 0) + 1
        self._asks[key] = ticket
        return ticket

    def granted(self, key: Union[str, Watchable], ticket: int) -> None:
        """The Subscribe or Watch with ``ticket`` was acknowledged."""
        if self._asks.get(key) == ticket:
            self._table(key)[key] = None

    def dropped(self, key: Union[str, Watchable]) -> None:
        """Unsubscribed, unwatched, or refused when asked again."""
        self._table(key).pop(key, None)

    def _table(self, key: Union[str, Watchable]) -> dict:
        return self.watchables if isinstance(key, Watchable) else self.channels

    def requests(self) -> "list[tuple[Union[str, Watchable], int, dict]]":
        """What to send on a new session: (key, opcode, fields) for every channel, then every watchable."""
        out: list = [(c, Opcode.Subscribe, {"channel": c}) for c in self.channels]
        out += [(w, Opcode.Watch, {"watchable": w}) for w in self.watchables]
        return out


# -- history channels: positions and recovery ----------------------------------------


@dataclass(frozen=True)
class Recovery:
    """What a reconnecting client tells its recovery listeners, once per history channel it subscribed to
    again with its positions (docs/protocol.md section 6, *History and recovery*).

    ``recovered``: the node replayed every event missed since ``positions``
    (``events`` of them, delivered to the event listeners before this call);
    False: nothing was replayed and events may be missing, so the application
    should fetch the channel's state again (``history()``, its backend).
    ``url`` is the node's.
    """

    channel: str
    recovered: bool
    events: int = 0
    positions: tuple = ()
    url: Optional[str] = None

    def describe(self) -> str:
        """One line for people, as ``meshctl sub --recover`` prints it."""
        if self.recovered:
            return f"recovered {self.events} event{'' if self.events == 1 else 's'} on {self.channel}"
        return (f"not recovered on {self.channel}: the node cannot vouch for every event since the positions; "
                "events may be missing")


class HistoryAnswer(NamedTuple):
    """The answer to a History request: the ``events`` (Event frames, oldest first), the channel's
    ``positions`` now, and (given positions) whether nothing after them is missing (``recovered``)."""

    events: list
    positions: list
    recovered: bool


def history_fields(channel: str, limit: int = 0, positions: Optional[Iterable[Position]] = None) -> dict:
    """The fields of a History request."""
    return dict(channel=channel, limit=limit, positions=None if positions is None else list(positions))


def history_answer(answer: Message) -> HistoryAnswer:
    """The events, positions and ``recovered`` of the Ack to a History request."""
    return HistoryAnswer(unpack_batch(answer), list(answer.positions or ()), answer.recovered)


class Positions:
    """Where a client is in each history channel: per origin (node, epoch), the highest seq received.

    A channel counts as a history channel once a Subscribe Ack carries
    ``positions`` (possibly none); those are the starting point.  Each event
    of the channel with a ``seq`` moves its origin's position.  After an
    Ack that says ``recovered``, the positions are merged with the Ack's
    (the highest of each); after any other, they are the Ack's: the client
    starts again from where the channel is now.
    """

    def __init__(self) -> None:
        self._channels: dict[str, dict[tuple[UUID, int], int]] = {}
        #: channel -> [events received since its recovering Subscribe, the positions it asked from]
        self._replaying: dict[str, list] = {}

    def __contains__(self, channel: object) -> bool:
        return channel in self._channels

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self._channels)

    def get(self, channel: str) -> Optional[list[Position]]:
        """The channel's positions, or None if it is not a history channel (or not subscribed)."""
        table = self._channels.get(channel)
        if table is None:
            return None
        return [Position(node, epoch, seq) for (node, epoch), seq in table.items()]

    def seen(self, event: Message) -> None:
        """An event arrived: move its origin's position in its channel."""
        seq = event.seq
        if not seq:
            return
        table = self._channels.get(event.channel)  # type: ignore[arg-type]
        if table is None:
            return
        key = (event.node, event.epoch)
        if seq > table.get(key, 0):  # type: ignore[arg-type]
            table[key] = seq  # type: ignore[index]
        replaying = self._replaying.get(event.channel)  # type: ignore[arg-type]
        if replaying is not None:
            replaying[0] += 1

    def acked(self, channel: str, answer: Message) -> None:
        """The Ack of a Subscribe of ``channel`` arrived (before any later event of the channel)."""
        if answer.positions is None:
            self._channels.pop(channel, None)
            return
        table = self._channels.get(channel, {}) if answer.recovered else {}
        for p in answer.positions:
            key = (p.node, p.epoch)
            if p.seq > table.get(key, -1):
                table[key] = p.seq
        self._channels[channel] = table

    def forget(self, channel: str) -> None:
        self._channels.pop(channel, None)
        self._replaying.pop(channel, None)

    def recovering(self, channel: str) -> dict:
        """The fields of a Subscribe that recovers ``channel`` from its positions; counts what is replayed."""
        asked = self.get(channel) or []
        self._replaying[channel] = [0, tuple(asked)]
        return {"channel": channel, "recover": True, "positions": asked}

    def recovered(self, channel: str, answer: Message, url: Optional[str] = None) -> Recovery:
        """The Ack of a recovering Subscribe arrived: take its positions; what to tell recovery listeners."""
        replayed, asked = self._replaying.pop(channel, (0, ()))
        self.acked(channel, answer)
        return Recovery(channel, answer.recovered, replayed if answer.recovered else 0, asked, url)

    def clear_replays(self) -> None:
        """A session ended: recovering Subscribes in flight will not be answered."""
        self._replaying.clear()


# -- what both reconnecting clients hold ------------------------------------------------------


class Holdings:
    """What the Twisted and asyncio reconnecting clients keep alike: their URLs, what to subscribe and
    watch again, and who listens to events and state changes."""

    def __init__(self, urls: Union[str, Sequence[str]], recover: bool = True) -> None:
        self._targets = Targets(urls)
        self._interests = Interests()
        self._positions = Positions()
        self._recover = recover
        self._listeners: list[Callable[[Message], None]] = []
        self._state_listeners: list[Callable[["StateChange"], None]] = []
        self._recovery_listeners: list[Callable[[Recovery], None]] = []

    @property
    def url(self) -> str:
        """The URL of the current session, or of the next attempt."""
        return self._targets.current

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels to subscribe to again after a cut, in subscription order."""
        return tuple(self._interests.channels)

    @property
    def watchables(self) -> tuple[Watchable, ...]:
        return tuple(self._interests.watchables)

    def add_listener(self, listener: Callable[[Message], None]) -> None:
        """Call ``listener(message)`` for every event, from every session."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Message], None]) -> None:
        self._listeners.remove(listener)

    def positions(self, channel: str) -> Optional[list[Position]]:
        """Where the client is in history channel ``channel`` (per origin node and epoch, the last seq
        received); None for a channel that keeps no history or is not subscribed."""
        return self._positions.get(channel)

    def add_recovery_listener(self, listener: Callable[[Recovery], None]) -> None:
        """Call ``listener(recovery)`` with a :class:`Recovery` for each history channel subscribed to again
        with its positions after a reconnect, once its Ack arrives (after the replayed events, before the
        ``connected`` state change)."""
        self._recovery_listeners.append(listener)

    def remove_recovery_listener(self, listener: Callable[[Recovery], None]) -> None:
        self._recovery_listeners.remove(listener)

    def _requests_again(self) -> "list[tuple[Union[str, Watchable], int, dict]]":
        """What to send on a new session: :meth:`Interests.requests`, history channels with their positions
        (unless ``recover=False``)."""
        out = []
        self._positions.clear_replays()
        for key, opcode, fields in self._interests.requests():
            if self._recover and opcode == Opcode.Subscribe and key in self._positions:
                fields = self._positions.recovering(key)  # type: ignore[arg-type]
            out.append((key, opcode, fields))
        return out

    def _answered_again(self, key: Union[str, Watchable], fields: dict, answer: Message) -> Optional[Recovery]:
        """The Ack of a request of :meth:`_requests_again` arrived: track its positions; the
        :class:`Recovery` to report, if it recovered."""
        if isinstance(key, Watchable) or key not in self._interests.channels:
            return None
        if fields.get("recover"):
            return self._positions.recovered(key, answer, self.url)
        self._positions.acked(key, answer)
        return None

    def add_state_listener(self, listener: Callable[["StateChange"], None]) -> None:
        """Call ``listener(change)`` with a :class:`StateChange` at each state change."""
        self._state_listeners.append(listener)

    def remove_state_listener(self, listener: Callable[["StateChange"], None]) -> None:
        self._state_listeners.remove(listener)


# -- tokens ---------------------------------------------------------------------------------


def jwt_expiry(token: Optional[str]) -> Optional[float]:
    """The ``exp`` claim of a JWT, read without checking the signature; None if ``token`` is not a JWT with one."""
    if not token or token.count(".") != 2:
        return None
    try:
        header, body = (json.loads(_b64url(part)) for part in token.split(".")[:2])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    exp = body.get("exp") if isinstance(body, dict) and isinstance(header, dict) else None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def refresh_delay(exp: float, now: float, margin: float) -> float:
    """Seconds from ``now`` until a Refresh for a token expiring at ``exp``: ``margin`` before, or halfway for short tokens."""
    left = exp - now
    return max(0.0, left - min(margin, left / 2))


def token_renewable(token: Any) -> bool:
    """Whether ``token`` is a callable that can give a fresh token on each connect."""
    return callable(token)


def describe_keys(keys: Iterable[Union[str, Watchable]]) -> str:
    """``chat, document/42``: channels and watchables as people write them."""
    return ", ".join(f"{k.kind}/{k.id}" if isinstance(k, Watchable) else k for k in keys)
