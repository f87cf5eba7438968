# -*- test-case-name: tests.test_batch -*-
"""Local delivery: getting one event to the sessions of this node that should have it.

Every event that reaches sessions here goes through :class:`LocalDelivery`,
whether server code emitted it on this node or it arrived from a peer
(:meth:`LocalDelivery.deliver_routed`).  A scope names who gets it:

==============  ===========================================================
``CHANNEL``     the subscribers of the event's channel
``WATCHERS``    the watchers of the event's watchable
``LISTENERS``   both (each session once); an event with neither reaches
                every welcomed session
``MEMBERS``     every welcomed session
==============  ===========================================================

Channel events reach sessions that take Batch frames through their queues
(:attr:`meshd.session.Session.queue`), in :class:`~meshd.session.Segment` s
shared by all of a channel's batch subscribers: while nothing else comes
between them for any of those sessions, a channel's next event joins the
open segment, at no cost per session.  At the end of the turn
(:data:`meshd._io.EndOfTurn.COALESCE`) each queue becomes frames, shared
among the sessions whose queues hold the same segments.
``metrics.deliveries`` counts what is written, when it is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

from meshd._io import EndOfTurn
from meshd.events import Event, received
from meshd.fb.mesh.RouteKind import RouteKind
from meshd.session import Segment

if TYPE_CHECKING:
    from meshd.codec import Watchable
    from meshd.metrics import Metrics
    from meshd.registry import Registry
    from meshd.session import Session

CHANNEL = "channel"
WATCHERS = "watchers"
LISTENERS = "listeners"
MEMBERS = "members"

_BY_ROUTE = {
    RouteKind.ChannelMessage: CHANNEL,
    RouteKind.WatcherNotification: WATCHERS,
    RouteKind.Event: LISTENERS,
}


class LocalDelivery:
    """Sends events to this node's sessions, by scope (see the module)."""

    __slots__ = ("registry", "metrics", "_batching", "_segments", "_queued", "_turn")

    def __init__(self, registry: "Registry", metrics: "Metrics", turn: EndOfTurn) -> None:
        self.registry = registry
        self.metrics = metrics
        #: The subscribers of each channel that take Batch frames.
        self._batching: dict[str, set[Session]] = {}
        #: Each channel's open segment of this turn.
        self._segments: dict[str, Segment] = {}
        #: The sessions that queued a segment this turn.
        self._queued: list[Session] = []
        self._turn = turn
        turn.register(EndOfTurn.COALESCE, self._coalesce)
        registry.observe_members(self._members_changing)

    def deliver(self, scope: str, event: Event, skip: "Optional[Session]" = None) -> int:
        """Send ``event`` to the sessions ``scope`` names here, but ``skip``; return how many."""
        registry = self.registry
        if scope == CHANNEL:
            return self._to_channel(event, skip)
        if scope == WATCHERS:
            sessions = registry.watchers_of(event.watchable) if event.watchable is not None else ()
        elif scope == MEMBERS:
            sessions = registry.members
        else:
            sessions = self._listeners(event.channel, event.watchable)
        if not sessions:
            return 0
        wire = event.wire
        sent = 0
        # A snapshot: a send may close a slow session, which changes the set.
        for session in tuple(sessions):
            if session is not skip and session.send(wire):
                sent += 1
        self.metrics.deliveries += sent
        return sent

    def deliver_routed(self, routed) -> int:
        """Deliver a frame that came from another node (a :class:`meshd.mesh.wire.Routed`)."""
        scope = _BY_ROUTE.get(routed.kind, LISTENERS)
        if scope == CHANNEL and routed.channel is None:
            return 0
        event = received(routed.frame, routed.channel, routed.watchable)
        return self.deliver(scope, event, self.registry.get(routed.exclude_session))

    def _listeners(self, channel: Optional[str], watchable: "Optional[Watchable]") -> "Iterable[Session]":
        registry = self.registry
        if channel is None and watchable is None:
            return registry.members
        if watchable is None:
            return registry.subscribers(channel)
        if channel is None:
            return registry.watchers_of(watchable)
        return registry.subscribers(channel) | registry.watchers_of(watchable)

    def _to_channel(self, event: Event, skip: "Optional[Session]") -> int:
        channel = event.channel
        subscribers = self.registry.subscribers(channel)
        if not subscribers:
            return 0
        batching = self._batching.get(channel)
        queued = 0
        if batching:
            queued = self._queue(channel, event, batching, skip)
            subscribers = subscribers - batching
        sent = 0
        if subscribers:
            wire = event.wire
            # Sessions without batches have nothing queued: straight to their outlets.
            for session in tuple(subscribers):
                if session is not skip and session.outlet.write(wire):
                    sent += 1
            self.metrics.deliveries += sent
        return sent + queued

    def _queue(self, channel: str, event: Event, batching: "set[Session]", skip: "Optional[Session]") -> int:
        """Queue ``event`` for the batch subscribers of ``channel`` but ``skip``; how many."""
        segment = self._segments.get(channel)
        if segment is not None and segment.open and skip is None:
            segment.events.append(event)  # every session that queued it gets this one too
            return len(batching)
        # An event that skips a session starts a segment nothing else joins.
        segment = Segment(event, open=skip is None)
        queued = 0
        fresh = self._queued
        for session in tuple(batching):
            if session is not skip and session.outlet.accepting:
                queue = session.queue
                if queue:
                    queue[-1].open = False  # this session's next entry follows it: nothing more joins it
                else:
                    fresh.append(session)
                queue.append(segment)
                queued += 1
        if segment.open:
            self._segments[channel] = segment
        self._turn.want(EndOfTurn.COALESCE)
        return queued

    def _members_changing(self, channel: str, session: "Session", joined: bool) -> None:
        """A session joins or leaves ``channel``: who receives the channel's next event changes."""
        if not session.batch:
            return
        segment = self._segments.pop(channel, None)
        if segment is not None:
            segment.open = False
        if joined:
            self._batching.setdefault(channel, set()).add(session)
        else:
            members = self._batching.get(channel)
            if members is not None:
                members.discard(session)
                if not members:
                    del self._batching[channel]

    def _coalesce(self) -> None:
        """End of turn: every queue becomes frames (see the module)."""
        for segment in self._segments.values():
            segment.open = False
        self._segments.clear()
        sessions, self._queued = self._queued, []
        shared: dict = {}
        for session in sessions:
            session.coalesce(shared)
