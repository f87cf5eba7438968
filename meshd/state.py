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

from meshd.codec import EventType, Watchable, encode_event
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

    __slots__ = ("frame", "prepared", "event_type", "channel", "watchable", "origin_node")

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
        self.prepared = prepare(self.frame)

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
        return state.deliver(state.registry.subscribers(channel), frame, exclude)


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

    def deliver(self, sessions: Iterable[Session], event: Event, exclude_id: Optional[UUID] = None) -> int:
        """Send ``event`` to ``sessions`` but the one with id ``exclude_id``; count it."""
        sent = send_to(sessions, event.prepared, self.registry.get(exclude_id))
        self.metrics.delivered(sent)
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
        return self.deliver(self._listeners(frame.channel, frame.watchable), frame)

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
            recipients = registry.subscribers(routed.channel) if routed.channel is not None else ()
        elif routed.kind == RouteKind.WatcherNotification:
            recipients = registry.watchers_of(routed.watchable) if routed.watchable is not None else ()
        else:
            recipients = self._listeners(routed.channel, routed.watchable)
        sent = send_to(recipients, prepare(routed.frame), registry.get(routed.exclude_session))
        self.metrics.deliveries += sent
        return sent
