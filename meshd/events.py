# -*- test-case-name: tests.test_scopes -*-
"""An event: encoded once, framed once, sent to any number of sessions."""

from __future__ import annotations

from typing import Optional, Union
from uuid import UUID

from meshd.codec import EventType, Watchable, decode, encode_event
from meshd.wsframes import frame_binary

WatchableLike = Union[Watchable, "tuple[str, str]", None]


def as_watchable(value: WatchableLike) -> Optional[Watchable]:
    if value is None or isinstance(value, Watchable):
        return value
    kind, ident = value
    return Watchable(str(kind), str(ident))


class Event:
    """One event, encoded once, ready to be sent to any number of sessions.

    ``Event(type, channel=..., watchable=..., payload=..., session_id=...,
    node_id=...)`` is the one way to make one (``state.event(...)`` fills in
    this node's id).  :attr:`frame` is the encoded Event frame; :attr:`wire`
    is that frame as one WebSocket message, built when first needed (a node
    that only forwards an event never frames it).
    """

    __slots__ = ("frame", "_wire", "event_type", "channel", "watchable", "origin_node")

    def __init__(
        self,
        event_type: int = EventType.ChannelEvent,
        *,
        channel: Optional[str] = None,
        watchable: WatchableLike = None,
        payload: bytes = b"",
        session_id: Optional[UUID] = None,
        node_id: Optional[UUID] = None,
        epoch: int = 0,
        seq: int = 0,
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
            epoch=epoch,  # with seq, a history channel's event's position (0: none)
            seq=seq,
        )
        self._wire: Optional[bytes] = None

    def positioned(self, channel: str, node_id: UUID, epoch: int, seq: int) -> "Event":
        """This event as one of history channel ``channel``: the same, with this node (``node_id``) as
        its origin and its position (``epoch``, ``seq``) in the frame."""
        m = decode(self.frame)
        return Event(m.event_type, channel=channel, watchable=m.watchable, payload=m.payload or b"",
                     session_id=m.session, node_id=node_id, epoch=epoch, seq=seq)

    @property
    def wire(self) -> bytes:
        """The event as one binary WebSocket message."""
        wire = self._wire
        if wire is None:
            wire = self._wire = frame_binary(self.frame)
        return wire

    def __repr__(self) -> str:
        return f"<Event type={self.event_type} channel={self.channel!r} watchable={self.watchable}>"


def received(frame: bytes, channel: Optional[str], watchable: Optional[Watchable]) -> Event:
    """An :class:`Event` around a frame another node encoded (its type is not decoded: 0)."""
    event = Event.__new__(Event)
    event.event_type = 0
    event.channel = channel
    event.watchable = watchable
    event.origin_node = None
    event.frame = frame
    event._wire = None
    return event
