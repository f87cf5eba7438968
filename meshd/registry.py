# -*- test-case-name: tests.test_units -*-
"""The node's registry: sessions, channel subscribers and watchers."""

from __future__ import annotations

from typing import Callable, Optional
from uuid import UUID

from meshd.codec import Watchable
from meshd.session import Session

_EMPTY: frozenset = frozenset()

#: Told of a channel's first subscriber on this node (True) and of its last leaving (False).
ChannelObserver = Callable[[str, bool], None]
#: Told of a session about to join (True) or leave (False) a channel.
MemberObserver = Callable[[str, Session, bool], None]


class Registry:
    """Maps session ids to sessions, channels to subscribers, watchables to watchers.

    ``sessions`` holds every open connection; ``members`` only those that
    have been welcomed (said Hello), which are the ones events go to.

    Every index is kept in step by the methods below; :meth:`remove` clears a
    session out of all of them, and an emptied channel or watchable entry is
    deleted so that the maps hold only what has listeners.
    """

    __slots__ = ("sessions", "members", "channels", "watchers", "pins", "_observers", "_member_observers")

    def __init__(self) -> None:
        self.sessions: dict[UUID, Session] = {}
        self.members: set[Session] = set()
        self.channels: dict[str, set[Session]] = {}
        self.watchers: dict[Watchable, set[Session]] = {}
        #: Channels held without a subscriber, and by how many holders (:meth:`pin`).
        self.pins: dict[str, int] = {}
        self._observers: list[ChannelObserver] = []
        self._member_observers: list[MemberObserver] = []

    def observe(self, observer: "ChannelObserver") -> None:
        """Call ``observer(channel, True)`` when a channel gets its first subscriber here,
        and ``observer(channel, False)`` when it loses its last."""
        self._observers.append(observer)

    def unobserve(self, observer: "ChannelObserver") -> None:
        self._observers.remove(observer)

    def observe_members(self, observer: "MemberObserver") -> None:
        """Call ``observer(channel, session, joined)`` just before a session joins or leaves a channel."""
        self._member_observers.append(observer)

    def _tell(self, channel: str, present: bool) -> None:
        for observer in tuple(self._observers):
            observer(channel, present)

    def add(self, session: Session) -> None:
        if session.id in self.sessions:
            raise ValueError(f"session {session.id} is already registered")
        self.sessions[session.id] = session

    def admit(self, session: Session) -> None:
        """Make a registered session a member: it has said Hello."""
        if self.sessions.get(session.id) is not session:
            raise ValueError(f"session {session.id} is not registered")
        self.members.add(session)

    def remove(self, session: Session) -> None:
        """Forget a session and every subscription and watch it held."""
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
        self.members.discard(session)
        for channel in session.channels:
            self._unsubscribed(channel, session)
        session.channels.clear()
        for watchable in session.watching:
            _discard(self.watchers, watchable, session)
        session.watching.clear()

    def get(self, session_id: Optional[UUID]) -> Optional[Session]:
        return self.sessions.get(session_id) if session_id is not None else None

    def subscribe(self, session: Session, channel: str) -> bool:
        """Subscribe; return False if already subscribed or no longer registered."""
        if channel in session.channels or session.id not in self.sessions:
            return False
        session.channels.add(channel)
        for observer in self._member_observers:
            observer(channel, session, True)
        members = self.channels.get(channel)
        if members is None:
            members = self.channels[channel] = set()
            if channel not in self.pins:
                self._tell(channel, True)
        members.add(session)
        return True

    def pin(self, channel: str) -> None:
        """Hold interest in ``channel`` without a subscriber (a subscription being recovered): the
        observers hear of it as of a first subscriber; :meth:`unpin` lets it go."""
        pins = self.pins.get(channel, 0)
        if not pins and channel not in self.channels:
            self._tell(channel, True)
        self.pins[channel] = pins + 1

    def unpin(self, channel: str) -> None:
        pins = self.pins.pop(channel) - 1
        if pins:
            self.pins[channel] = pins
        elif channel not in self.channels:
            self._tell(channel, False)

    def unsubscribe(self, session: Session, channel: str) -> bool:
        """Unsubscribe; return False if the session was not subscribed."""
        if channel not in session.channels:
            return False
        session.channels.discard(channel)
        self._unsubscribed(channel, session)
        return True

    def _unsubscribed(self, channel: str, session: Session) -> None:
        for observer in self._member_observers:
            observer(channel, session, False)
        _discard(self.channels, channel, session)
        if channel not in self.channels and channel not in self.pins:
            self._tell(channel, False)

    def watch(self, session: Session, watchable: Watchable) -> bool:
        """Watch; return False if already watching or no longer registered."""
        if watchable in session.watching or session.id not in self.sessions:
            return False
        session.watching.add(watchable)
        self.watchers.setdefault(watchable, set()).add(session)
        return True

    def unwatch(self, session: Session, watchable: Watchable) -> bool:
        if watchable not in session.watching:
            return False
        session.watching.discard(watchable)
        _discard(self.watchers, watchable, session)
        return True

    def subscribers(self, channel: str) -> "set[Session] | frozenset[Session]":
        return self.channels.get(channel, _EMPTY)

    def watchers_of(self, watchable: Watchable) -> "set[Session] | frozenset[Session]":
        return self.watchers.get(watchable, _EMPTY)


def _discard(index: dict, key, session: Session) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(session)
        if not members:
            del index[key]
