# -*- test-case-name: tests.test_history -*-
"""The recent events of history channels, as this node holds them (docs/recovery.md).

Every event of a channel with ``history_size`` (``[[channels]]``) carries
its *position*: the origin node, the origin's incarnation (*epoch*) and its
number among that origin's events (*seq*, from the same counter as the
mesh's routed frames, so numbers of one origin only grow, with gaps for its
other events).  A node keeps, per history channel, the events it published
and those it received from peers, bounded in count, bytes and age.

It also knows from where it holds *every* event of each origin: its
*coverage*.  Of its own events, from its start.  Of a peer's, from the
``Start`` marker the peer routes to it when it learns this node's interest
in the channel: from then on the peer sends it every event of the channel,
in order.  An event dropped from the history (count, bytes, age) moves the
coverage of its origin past it; losing interest in the channel (no more
subscribers here) ends the coverage of the peers' events.  Only within its
coverage can the node say that nothing is missing after a position.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional
from uuid import UUID

from meshd.channels import ChannelOptions, ChannelTable
from meshd.codec import Position


@dataclass(frozen=True, slots=True)
class Entry:
    """One event kept: its position, its frame as sessions get it, and when it was kept."""

    origin: UUID
    epoch: int
    seq: int
    frame: bytes
    at: float

    @property
    def position(self) -> Position:
        return Position(self.origin, self.epoch, self.seq)


@dataclass
class ChannelHistory:
    """One channel's kept events, in the order they reached this node, and their coverage."""

    options: ChannelOptions
    entries: "deque[Entry]" = field(default_factory=deque)
    size: int = 0  # bytes of the frames kept
    #: (origin, epoch) -> the seq after which every event of that origin is here (or was, and
    #: went from the front of the history, which moves it).
    covered: dict[tuple[UUID, int], int] = field(default_factory=dict)
    #: (origin, epoch) -> the last seq seen of it.
    latest: dict[tuple[UUID, int], int] = field(default_factory=dict)
    #: (origin, epoch) -> where its last Start marker put the coverage (recovery checks it has not moved).
    starts: dict[tuple[UUID, int], int] = field(default_factory=dict)

    def add(self, entry: Entry, now: float) -> None:
        self.entries.append(entry)
        self.size += len(entry.frame)
        key = (entry.origin, entry.epoch)
        if entry.seq > self.latest.get(key, 0):
            self.latest[key] = entry.seq
        self.trim(now)

    def trim(self, now: float) -> None:
        """Drop from the front what is past the count, the bytes or the age."""
        options, entries = self.options, self.entries
        oldest = now - options.history_ttl
        while entries and (len(entries) > options.history_size or self.size > options.history_bytes
                           or entries[0].at < oldest):
            self.drop_first()

    def drop_first(self) -> None:
        """Drop the oldest event kept; its origin's coverage moves past it."""
        gone = self.entries.popleft()
        self.size -= len(gone.frame)
        key = (gone.origin, gone.epoch)
        if key in self.covered and gone.seq > self.covered[key]:
            self.covered[key] = gone.seq

    def cut(self, own: UUID) -> list[Position]:
        """Where the channel is now: per origin covered here, the last event seen, or the start of
        coverage; this node (``own``) once it has published on the channel."""
        return [Position(origin, epoch, max(after, self.latest.get((origin, epoch), 0)))
                for (origin, epoch), after in self.covered.items() if origin != own or (origin, epoch) in self.latest]

    def after(self, positions: Iterable[Position]) -> Optional[list[Entry]]:
        """Every event held after ``positions``, in the order they came here; None when this node cannot
        tell that nothing after one of them is missing (not covered here, or gone from the front).

        An origin (or an incarnation of it) absent from ``positions`` is one the
        client saw nothing of: all that is held of it is sent.
        """
        since: dict[tuple[UUID, int], int] = {}
        for p in positions:
            key = (p.node, p.epoch)
            covered = self.covered.get(key)
            if covered is None or covered > p.seq:
                return None
            since[key] = p.seq
        for key, covered in self.covered.items():
            since.setdefault(key, covered)
        return [e for e in self.entries if e.seq > since.get((e.origin, e.epoch), e.seq)]


class History:
    """Every history channel's :class:`ChannelHistory` on this node."""

    def __init__(self, table: ChannelTable, clock, node_id: UUID, epoch: int,
                 subscribed: Callable[[str], bool] = lambda c: False, max_bytes: int = 64 << 20) -> None:
        self.table = table
        self.clock = clock
        self.node_id = node_id
        self.epoch = epoch
        #: This node's own events of a channel it holds nothing of are all gone up to this number (those
        #: of the channels :meth:`sweep` forgot): it vouches for its own events from there.
        self.floor = 0
        #: Whether this node has subscribers for a channel (a channel without them and without
        #: events kept is forgotten by :meth:`sweep`).
        self._subscribed = subscribed
        self.channels: dict[str, ChannelHistory] = {}
        #: (session id, channel) -> a recovering Subscribe under way (meshd.recovery), which an
        #: Unsubscribe of the channel cancels.
        self.recovering: dict = {}
        #: The node-wide bound (``limits.history_bytes``): past it, the oldest events go, whatever their
        #: channel (roughly in the order they came: :attr:`_order` names the channel of each).
        self.max_bytes = max_bytes
        self.size = 0
        self.count = 0
        self._order: "deque[str]" = deque()

    def options(self, channel: Optional[str]) -> Optional[ChannelOptions]:
        """The options of ``channel`` when it keeps history, else None."""
        if channel is None or not self.table:
            return None
        options = self.table.options(channel)
        return options if options is not None and options.history else None

    def of(self, channel: str) -> Optional[ChannelHistory]:
        """The channel's history, made on first use (None for a channel without history)."""
        found = self.channels.get(channel)
        if found is None:
            options = self.options(channel)
            if options is None:
                return None
            found = self.channels[channel] = ChannelHistory(options)
            # This node's own events: every one after the floor (none of this channel since it).
            found.covered[(self.node_id, self.epoch)] = self.floor
        return found

    def record(self, channel: str, origin: UUID, epoch: int, seq: int, frame: bytes) -> None:
        """An event of a history channel, published here or received from ``origin``."""
        history = self.of(channel)
        if history is not None:
            now = self.clock.seconds()
            self._changing(history, lambda: history.add(Entry(origin, epoch, seq, frame, now), now))
            self._order.append(channel)
            while self.size > self.max_bytes and self._order:
                oldest = self.channels.get(self._order.popleft())
                if oldest is not None and oldest.entries:
                    self._changing(oldest, oldest.drop_first)
            if len(self._order) > 2 * self.count + 1024:
                self._reorder()

    def _changing(self, history: ChannelHistory, change: Callable[[], None]) -> None:
        """Run ``change`` on one channel's history, keeping the node-wide totals."""
        size, count = history.size, len(history.entries)
        change()
        self.size += history.size - size
        self.count += len(history.entries) - count

    def _reorder(self) -> None:
        """Name the channel of each event kept, oldest first, anew (the old list named events gone since)."""
        kept = sorted((e.at, channel) for channel, h in self.channels.items() for e in h.entries)
        self._order = deque(channel for _, channel in kept)

    def begin(self, channel: str, origin: UUID, epoch: int, after: int) -> None:
        """``origin`` sends this node every event of ``channel`` after ``after`` (its Start marker)."""
        if not self._subscribed(channel):
            return  # a marker for interest given up since: the peer no longer sends the channel
        history = self.of(channel)
        if history is not None:
            history.covered[(origin, epoch)] = history.starts[(origin, epoch)] = after

    def covering(self, channel: str, positions: Iterable[Position]) -> tuple[list[bytes], list[Position]]:
        """For a peer recovering a client: of ``positions``, those this node has every event after, and
        those events (in the order they came here)."""
        history = self.channels.get(channel)
        if history is None:  # nothing of it since the floor, this node's own events included
            own = (self.node_id, self.epoch)
            return [], [p for p in positions if (p.node, p.epoch) == own and p.seq >= self.floor]
        self._changing(history, lambda: history.trim(self.clock.seconds()))
        covered = [p for p in positions if history.covered.get((p.node, p.epoch), p.seq + 1) <= p.seq]
        after = {(p.node, p.epoch): p.seq for p in covered}
        return [e.frame for e in history.entries if e.seq > after.get((e.origin, e.epoch), e.seq)], covered

    def sweep(self) -> None:
        """Drop what is past its age everywhere, and forget the channels left with nothing kept and
        no subscriber here (run now and then: memory then follows what is kept)."""
        now = self.clock.seconds()
        for channel, history in list(self.channels.items()):
            self._changing(history, lambda: history.trim(now))
            if not history.entries and not self._subscribed(channel):
                own = history.covered.get((self.node_id, self.epoch), 0)
                self.floor = max(self.floor, own, history.latest.get((self.node_id, self.epoch), 0))
                del self.channels[channel]

    def end(self, channel: str) -> None:
        """No more subscribers here: peers stop sending the channel, so their coverage ends."""
        history = self.channels.get(channel)
        if history is not None:
            for key in [k for k in history.covered if k[0] != self.node_id]:
                del history.covered[key]
                history.starts.pop(key, None)

    def departed(self, node: UUID, epoch: Optional[int] = None) -> None:
        """``node`` is gone, or came back as a new incarnation: forget what is known of its other
        incarnations where nothing of them is kept (positions of them grow every Ack otherwise)."""
        for history in self.channels.values():
            held = {(e.origin, e.epoch) for e in history.entries}
            for key in [k for k in (*history.covered, *history.latest) if k[0] == node and k[1] != epoch]:
                if key not in held:
                    history.covered.pop(key, None)
                    history.latest.pop(key, None)
                    history.starts.pop(key, None)

    def read(self, channel: str, limit: int = 0, positions: Optional[list[Position]] = None
             ) -> tuple[list[Entry], bool, list[Position]]:
        """The events of ``channel`` to answer with: the latest ``limit`` (0: all kept), or, given
        ``positions``, those after them; whether nothing after ``positions`` is missing; and the cut."""
        history = self.of(channel)
        if history is None:
            return [], False, []
        self._changing(history, lambda: history.trim(self.clock.seconds()))
        if positions is None:
            entries, complete = list(history.entries), False
        else:
            found = history.after(positions)
            entries, complete = (found, True) if found is not None else ([], False)
        if limit and len(entries) > limit:
            entries = entries[-limit:]
            complete = False if positions is not None else complete
        return entries, complete, history.cut(self.node_id)
