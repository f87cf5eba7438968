# -*- test-case-name: tests.test_scopes -*-
"""The node state that server-side code uses to emit events, in four scopes.

========================================  ===============================================
call                                      reaches
========================================  ===============================================
``distribute_event(event)``               every node (with the mesh) and, on each, the
                                          subscribers of the event's channel and the
                                          watchers of its watchable
``broadcast_event(type, ...)``            every welcomed session on this node
``notify_event(type, watchable, ...)``    the sessions watching the watchable (and on
                                          other nodes with ``[mesh] forward_watchers``)
``clients.broadcast_to_channel(...)``     the channel's subscribers, here or everywhere
========================================  ===============================================

The positional signatures are the ones server code has always used, and
keep working.  Beside them, the keyword arguments ``exclude_session=`` and
``exclude_node=`` say what is skipped without the positional ``exclude_id``
(a session in three scopes, a node in ``distribute_event``).

Each event is encoded once and framed once (:class:`~meshd.events.Event`);
delivery writes the same bytes to every recipient.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable, Optional, Union
from uuid import UUID

from meshd.codec import EventType
from meshd.delivery import CHANNEL, LISTENERS, MEMBERS, WATCHERS, LocalDelivery
from meshd.events import Event, WatchableLike, as_watchable
from meshd.fb.mesh.RouteKind import RouteKind
from meshd.metrics import Metrics
from meshd.registry import Registry

if TYPE_CHECKING:
    from typing import Protocol

    from meshd.history import History

    class Router(Protocol):
        #: This node's incarnation: random at each start (a history event's ``epoch``).
        incarnation: int

        def route(self, kind: int, event: Event, *, channel: Optional[str] = None, watchable=None,
                  exclude_session: Optional[UUID] = None, exclude_node: Optional[UUID] = None,
                  seq: Optional[int] = None) -> int: ...

        def next_seq(self) -> int: ...

__all__ = ["Clients", "Event", "NodeState", "NullRouter", "as_watchable"]


class NullRouter:
    """The router of a node without a mesh: there is nobody else to reach."""

    def __init__(self, incarnation: int = 0) -> None:
        self.incarnation = incarnation or random.getrandbits(63) + 1
        self.seq = 0

    def route(self, kind: int, event: Event, **where) -> int:
        return 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


def _one(positional, keyword, name: str, keyword_name: str):
    if positional is not None and keyword is not None:
        raise TypeError(f"give {name} or {keyword_name}, not both")
    return keyword if keyword is not None else positional


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
        *,
        exclude_session: Optional[UUID] = None,
    ) -> int:
        """Deliver ``frame`` to the subscribers of ``channel``; return how many sessions here it reaches.

        ``frame`` is a ready :class:`Event`, or payload bytes that become a
        ``ChannelEvent`` stamped with origin node ``node_id`` (default: this
        node) and origin session ``instance``.  ``exclude`` (or
        ``exclude_session=``) is a session id that does not receive it.
        ``local_only`` keeps it on this node; otherwise, with a mesh, it also
        reaches the subscribers on every other node.
        """
        state = self._state
        exclude = _one(exclude, exclude_session, "exclude", "exclude_session")
        if state.keeps_history(channel):
            return self._with_history(channel, frame, exclude, local_only, instance)
        if not isinstance(frame, Event):
            frame = Event(
                EventType.ChannelEvent,
                channel=channel,
                payload=frame,
                session_id=instance,
                node_id=node_id or state.node_id,
            )
        elif frame.channel != channel:
            frame = _with_channel(frame, channel)
        if not local_only:
            state.router.route(RouteKind.ChannelMessage, frame, channel=channel, exclude_session=exclude)
        return state._emit(CHANNEL, frame, exclude)

    def _with_history(self, channel: str, frame: Union[Event, bytes], exclude: Optional[UUID], local_only: bool,
                      instance: Optional[UUID]) -> int:
        """:meth:`broadcast_to_channel` on a history channel: the event gets its position (with this node
        as its origin, whatever ``node_id`` said) and is kept (meshd.history)."""
        state = self._state
        if isinstance(frame, Event):
            given = frame
            frame, seq = state.sequenced(channel, lambda epoch, seq: given.positioned(channel, state.node_id, epoch, seq))
        else:
            payload = frame
            frame, seq = state.sequenced(channel, lambda epoch, seq: Event(
                EventType.ChannelEvent, channel=channel, payload=payload, session_id=instance,
                node_id=state.node_id, epoch=epoch, seq=seq))
        if not local_only:
            state.router.route(RouteKind.ChannelMessage, frame, channel=channel, exclude_session=exclude, seq=seq)
        return state._emit(CHANNEL, frame, exclude)


def _with_channel(event: Event, channel: str) -> Event:
    """``event``'s frame, delivered as an event of ``channel`` (who gets it, not what it says)."""
    from meshd.events import received

    return received(event.frame, channel, event.watchable)


class NodeState:
    """What server-side code sees of a node: its id, its registry and the event scopes."""

    def __init__(
        self,
        node_id: UUID,
        registry: Registry,
        delivery: LocalDelivery,
        router: "Optional[Router]" = None,
        metrics: Optional[Metrics] = None,
        history: "Optional[History]" = None,
    ) -> None:
        self.node_id = node_id
        self.registry = registry
        self.delivery = delivery
        #: Reaches the other nodes: the mesh, or nobody (:class:`NullRouter`).
        self.router = router if router is not None else NullRouter()
        self.metrics = metrics if metrics is not None else delivery.metrics
        #: The history channels' recent events (``[[channels]]``), or None when no channel keeps any.
        self.history = history
        self.clients = Clients(self)

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
        """An :class:`Event` that originates on this node (its ``node`` field is this node's id)."""
        return Event(
            event_type, channel=channel, watchable=watchable, payload=payload, session_id=session_id,
            node_id=self.node_id,
        )

    def keeps_history(self, channel: Optional[str]) -> bool:
        """Whether events of ``channel`` are numbered and kept (``[[channels]]`` history)."""
        return self.history is not None and self.history.options(channel) is not None

    def sequenced(self, channel: str, make: "Callable[[int, int], Event]") -> "tuple[Event, int]":
        """An event of history channel ``channel`` that originates here: ``make(epoch, seq)`` builds it
        with the next number of this node's events, and it is kept; returns it and its number."""
        assert self.history is not None
        epoch, seq = self.router.incarnation, self.router.next_seq()
        event = make(epoch, seq)
        self.history.record(channel, self.node_id, epoch, seq, event.frame)
        return event, seq

    def _emit(self, scope: str, event: Event, exclude_session: Optional[UUID] = None) -> int:
        """Deliver an event that originates here to this node's sessions; count it."""
        self.metrics.events += 1
        return self.delivery.deliver(scope, event, self.registry.get(exclude_session))

    def distribute_event(
        self, frame: Event, exclude_id: Optional[UUID] = None, *, exclude_node: Optional[UUID] = None
    ) -> int:
        """Deliver to every node but ``exclude_id`` (or ``exclude_node=``), and to this node's listeners.

        On each node the event reaches the subscribers of its channel and the
        watchers of its watchable (each session once); an event with neither
        reaches every welcomed session.  Excluding this node's own id skips
        local delivery.
        """
        exclude_node = _one(exclude_id, exclude_node, "exclude_id", "exclude_node")
        seq = 0
        channel = frame.channel
        if channel is not None and self.keeps_history(channel):
            given = frame
            frame, seq = self.sequenced(channel, lambda epoch, seq: given.positioned(channel, self.node_id, epoch, seq))
        self.router.route(
            RouteKind.Event, frame, channel=frame.channel, watchable=frame.watchable, exclude_node=exclude_node,
            seq=seq or None,
        )
        if exclude_node == self.node_id:
            return 0
        return self._emit(LISTENERS, frame)

    def broadcast_event(
        self,
        type: int,
        watchable: WatchableLike = None,
        session_id: Optional[UUID] = None,
        payload: bytes = b"",
        exclude_id: Optional[UUID] = None,
        *,
        exclude_session: Optional[UUID] = None,
    ) -> int:
        """Deliver an event to every welcomed session on this node but ``exclude_id`` (``exclude_session=``)."""
        exclude = _one(exclude_id, exclude_session, "exclude_id", "exclude_session")
        event = self.event(type, watchable=watchable, payload=payload, session_id=session_id)
        return self._emit(MEMBERS, event, exclude)

    def notify_event(
        self,
        type: int,
        watchable: WatchableLike,
        session_id: Optional[UUID] = None,
        payload: bytes = b"",
        exclude_id: Optional[UUID] = None,
        *,
        exclude_session: Optional[UUID] = None,
    ) -> int:
        """Deliver an event to the sessions watching ``watchable`` but ``exclude_id`` (``exclude_session=``)."""
        exclude = _one(exclude_id, exclude_session, "exclude_id", "exclude_session")
        event = self.event(type, watchable=watchable, payload=payload, session_id=session_id)
        self.router.route(
            RouteKind.WatcherNotification, event, watchable=event.watchable, exclude_session=exclude
        )
        return self._emit(WATCHERS, event, exclude)
