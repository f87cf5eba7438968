# -*- test-case-name: tests.test_scopes -*-
"""The node state that server-side code uses to emit events, in three scopes.

===================================  ==================================================
call                                 reaches
===================================  ==================================================
``distribute_event(event, exclude)``  every node (with the mesh) and every local
                                     subscriber of the event's channel / watchable
``broadcast_event(...)``             every session on this node
``notify_event(...)``                only sessions watching the watchable
``clients.broadcast_to_channel(...)``  the channel's subscribers
===================================  ==================================================

Each event is encoded once and framed once (:class:`Event`); delivery writes
the same prepared WebSocket message to every recipient.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union
from uuid import UUID

from twisted.logger import Logger

from autobahn.websocket.protocol import PreparedMessage

from meshd.codec import EventType, Watchable, encode_batch, encode_event
from meshd.fb.mesh.RouteKind import RouteKind
from meshd.metrics import Metrics
from meshd.registry import Registry
from meshd.session import Session, prepare

WatchableLike = Union[Watchable, "tuple[str, str]", None]


def as_watchable(value: WatchableLike) -> Optional[Watchable]:
    if value is None or isinstance(value, Watchable):
        return value
    kind, ident = value
    return Watchable(str(kind), str(ident))


class Event:
    """One event, encoded and framed once, ready to be sent to any number of sessions."""

    __slots__ = ("frame", "_prepared", "event_type", "channel", "watchable", "origin_node")

    def __init__(
        self,
        event_type: int,
        *,
        channel: Optional[str] = None,
        watchable: WatchableLike = None,
        payload: bytes = b"",
        session_id: Optional[UUID] = None,
        node_id: Optional[UUID] = None,
    ) -> None:
        self.event_type = event_type
        self.channel = channel
        self.watchable = as_watchable(watchable)
        self.origin_node = node_id
        self.frame = encode_event(
            event_type,
            channel=channel,
            watchable=self.watchable,
            payload=bytes(payload),
            session=session_id,
            node=node_id,
        )
        self._prepared = None

    @classmethod
    def from_frame(cls, frame: bytes, channel: Optional[str] = None, watchable: WatchableLike = None) -> "Event":
        """An Event around an already encoded frame (one that came from another node)."""
        event = cls.__new__(cls)
        event.event_type = 0
        event.channel = channel
        event.watchable = as_watchable(watchable)
        event.origin_node = None
        event.frame = frame
        event._prepared = None
        return event

    @property
    def prepared(self) -> PreparedMessage:
        """The event as one WebSocket message, framed when first sent (a node may only forward it)."""
        prepared = self._prepared
        if prepared is None:
            prepared = self._prepared = prepare(self.frame)
        return prepared

    def __repr__(self) -> str:
        return f"<Event type={self.event_type} channel={self.channel!r} watchable={self.watchable}>"


def send_to(sessions: Iterable[Session], prepared: PreparedMessage, skip: Optional[Session]) -> int:
    """Send one prepared message to each session but ``skip``; return how many it was sent to."""
    sent = 0
    # A snapshot: a send may close a slow session, which changes the set.
    for session in tuple(sessions):
        if session is not skip and session.send(prepared):
            sent += 1
    return sent


class Clients:
    """Channel delivery: ``state.clients`` / ``state.of_clients()``."""

    def __init__(self, state: "NodeState") -> None:
        self._state = state

    def broadcast_to_channel(
        self,
        node_id: Optional[UUID],
        channel: str,
        frame: Union[Event, bytes],
        exclude: Optional[UUID] = None,
        local_only: bool = False,
        instance: Optional[UUID] = None,
    ) -> int:
        """Deliver ``frame`` to the subscribers of ``channel``; return the local count.

        ``frame`` is a ready :class:`Event`, or payload bytes that become a
        ``ChannelEvent`` stamped with origin node ``node_id`` (default: this
        node) and origin session ``instance``.  ``exclude`` is a session id
        that does not receive it.  ``local_only`` keeps it on this node; a
        single node has no other nodes to reach, so both settings deliver to
        the local subscribers, and with a mesh ``local_only=False`` also reaches
        the subscribers on every other node.
        """
        state = self._state
        if not isinstance(frame, Event):
            frame = Event(
                EventType.ChannelEvent,
                channel=channel,
                payload=frame,
                session_id=instance,
                node_id=node_id or state.node_id,
            )
        if not local_only and state.router is not None:
            state.router.route(RouteKind.ChannelMessage, frame, channel=channel, exclude_session=exclude)
        return state.to_channel(channel, frame, exclude)


class Batcher:
    """Gathers, per channel, the events of one reactor turn for sessions that take Batch frames.

    At the end of the turn each channel's events go to those sessions as
    Batch frames of at most :attr:`max_batch_bytes`, each encoded and framed
    once for all of them; a lone event goes as the Event frame itself.
    Sessions excluded from one of the events get the others one by one.
    Then the session flusher writes everything, in the same turn.

    A channel's pending events are delivered at once (:meth:`flush_channel`)
    before its set of batch subscribers changes and before an event of the
    channel is sent to them some other way, so that who gets an event and
    in what order does not depend on the batching.
    """

    __slots__ = ("state", "clock", "flusher", "max_batch_bytes", "_pending", "_call")

    log = Logger()

    def __init__(self, state: "NodeState", clock, flusher=None, max_batch_bytes: int = 256 * 1024) -> None:
        self.state = state
        self.clock = clock
        self.flusher = flusher
        self.max_batch_bytes = max_batch_bytes
        self._pending: dict[str, list[tuple[Event, Optional[Session]]]] = {}
        self._call = None

    def add(self, channel: str, event: Event, skip: Optional[Session]) -> None:
        entries = self._pending.get(channel)
        if entries is None:
            self._pending[channel] = [(event, skip)]
            if self._call is None:
                self._call = self.clock.callLater(0, self.flush)
        else:
            entries.append((event, skip))

    def flush_channel(self, channel: str) -> None:
        """Deliver what is pending for ``channel`` now."""
        entries = self._pending.pop(channel, None)
        if entries:
            self._deliver(channel, entries)

    def flush(self) -> None:
        self._call = None
        pending, self._pending = self._pending, {}
        try:
            for channel, entries in pending.items():
                try:
                    self._deliver(channel, entries)
                except Exception:  # one channel's failure must not cost the others theirs
                    self.log.failure("Delivering a batch on {channel} failed", channel=channel)
        finally:
            if self.flusher is not None:
                self.flusher.flush()

    def _deliver(self, channel: str, entries: "list[tuple[Event, Optional[Session]]]") -> None:
        recipients = self.state.registry.batching.get(channel)
        if not recipients:
            return
        sent = 0
        for group in self._groups(entries):
            if len(group) == 1:
                event, skip = group[0]
                sent += send_to(recipients, event.prepared, skip)
                continue
            skipped = {skip for _event, skip in group if skip is not None}
            batch = prepare(encode_batch([event.frame for event, _skip in group]))
            for session in tuple(recipients):
                if session in skipped:
                    sent += sum(session.send(e.prepared) for e, skip in group if skip is not session)
                elif session.send(batch):
                    sent += len(group)
        self.state.metrics.deliveries += sent

    def _groups(self, entries):
        """Split ``entries`` into runs whose Batch frame stays within max_batch_bytes."""
        group, size = [], 0
        for entry in entries:
            cost = len(entry[0].frame) + 4
            if group and size + cost > self.max_batch_bytes:
                yield group
                group, size = [], 0
            group.append(entry)
            size += cost
        if group:
            yield group


class NodeState:
    """What server-side code sees of a node: its id, its registry and the event scopes."""

    log = Logger()

    def __init__(self, node_id: UUID, registry: Registry, metrics: Optional[Metrics] = None) -> None:
        self.node_id = node_id
        self.registry = registry
        self.metrics = metrics or Metrics()
        self.clients = Clients(self)
        #: The mesh, when this node is part of one (meshd.mesh.service.Mesh).
        self.router = None
        #: Gathers channel events for sessions that take Batch frames (set by the app).
        self.batcher: Optional[Batcher] = None

    def deliver(self, sessions: Iterable[Session], event: Event, exclude_id: Optional[UUID] = None,
                count_event: bool = True) -> int:
        """Send ``event`` to ``sessions`` but the one with id ``exclude_id``; count it."""
        sent = send_to(sessions, event.prepared, self.registry.get(exclude_id)) if sessions else 0
        if count_event:
            self.metrics.delivered(sent)
        else:
            self.metrics.deliveries += sent
        return sent

    def of_clients(self) -> Clients:
        return self.clients

    def event(
        self,
        event_type: int,
        *,
        channel: Optional[str] = None,
        watchable: WatchableLike = None,
        payload: bytes = b"",
        session_id: Optional[UUID] = None,
    ) -> Event:
        """Build an :class:`Event` that originates on this node."""
        return Event(
            event_type,
            channel=channel,
            watchable=watchable,
            payload=payload,
            session_id=session_id,
            node_id=self.node_id,
        )

    def distribute_event(self, frame: Event, exclude_id: Optional[UUID] = None) -> int:
        """Deliver to every node but ``exclude_id`` and to this node's listeners.

        Locally the event reaches the subscribers of its channel and the
        watchers of its watchable (each session once); an event with neither
        reaches every welcomed session.  Passing this node's own id as ``exclude_id``
        skips local delivery.
        """
        if self.router is not None:
            self.router.route(
                RouteKind.Event, frame, channel=frame.channel, watchable=frame.watchable,
                exclude_node=exclude_id,
            )
        if exclude_id == self.node_id:
            return 0
        if frame.channel is not None and self.batcher is not None:
            self.batcher.flush_channel(frame.channel)  # keep the channel's order for batch sessions
        return self.deliver(self._listeners(frame.channel, frame.watchable), frame)

    def to_channel(self, channel: str, event: Event, exclude_id: Optional[UUID] = None,
                   count_event: bool = True) -> int:
        """Deliver to this node's subscribers of ``channel``; batched for those that take batches."""
        registry = self.registry
        subscribers = registry.subscribers(channel)
        batching = registry.batching.get(channel)
        if not batching or self.batcher is None:
            return self.deliver(subscribers, event, exclude_id, count_event)
        skip = registry.get(exclude_id)
        self.batcher.add(channel, event, skip)
        queued = len(batching) - (skip in batching)
        return self.deliver(subscribers - batching, event, exclude_id, count_event) + queued

    def _listeners(self, channel: Optional[str], watchable: Optional[Watchable]) -> Iterable[Session]:
        """Who a distributed event reaches here: see :meth:`distribute_event`."""
        registry = self.registry
        if channel is None and watchable is None:
            return registry.members
        if watchable is None:
            return registry.subscribers(channel)
        if channel is None:
            return registry.watchers_of(watchable)
        return registry.subscribers(channel) | registry.watchers_of(watchable)

    def broadcast_event(
        self,
        type: int,
        watchable: WatchableLike = None,
        session_id: Optional[UUID] = None,
        payload: bytes = b"",
        exclude_id: Optional[UUID] = None,
    ) -> int:
        """Deliver an event to every welcomed session on this node but ``exclude_id``."""
        event = self.event(type, watchable=watchable, payload=payload, session_id=session_id)
        return self.deliver(self.registry.members, event, exclude_id)

    def notify_event(
        self,
        type: int,
        watchable: WatchableLike,
        session_id: Optional[UUID] = None,
        payload: bytes = b"",
        exclude_id: Optional[UUID] = None,
    ) -> int:
        """Deliver an event to the sessions watching ``watchable``, but ``exclude_id``."""
        event = self.event(type, watchable=watchable, payload=payload, session_id=session_id)
        if self.router is not None:
            self.router.route(
                RouteKind.WatcherNotification, event, watchable=event.watchable, exclude_session=exclude_id
            )
        return self.deliver(self.registry.watchers_of(event.watchable), event, exclude_id)

    def deliver_routed(self, routed) -> int:
        """Deliver an event that came from another node, by its bytes, to the sessions here."""
        registry = self.registry
        if routed.kind == RouteKind.ChannelMessage:
            if routed.channel is None:
                return 0
            return self.to_channel(
                routed.channel, Event.from_frame(routed.frame, routed.channel), routed.exclude_session,
                count_event=False,
            )
        if routed.kind == RouteKind.WatcherNotification:
            recipients = registry.watchers_of(routed.watchable) if routed.watchable is not None else ()
        else:
            if routed.channel is not None and self.batcher is not None:
                self.batcher.flush_channel(routed.channel)
            recipients = self._listeners(routed.channel, routed.watchable)
        sent = send_to(recipients, prepare(routed.frame), registry.get(routed.exclude_session))
        self.metrics.deliveries += sent
        return sent
