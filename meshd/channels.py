# -*- test-case-name: tests.test_history -*-
"""What a channel keeps and tells beyond delivery: ``[[channels]]`` options by pattern.

Each ``[[channels]]`` entry names a glob pattern (``fnmatch``, case-sensitive,
as rules do) and the options of the channels it matches; the first entry that
matches a channel decides.  A channel no entry matches has none of them: no
history, no presence, as before these options existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Optional

#: ``history_ttl`` when an entry keeps history and does not say.
DEFAULT_HISTORY_TTL = 300.0
#: ``history_bytes`` when an entry keeps history and does not say.
DEFAULT_HISTORY_BYTES = 1 << 20


@dataclass(frozen=True)
class ChannelOptions:
    """The options of the channels one ``[[channels]]`` entry matches."""

    match: str
    #: Events kept per channel (0: no history).
    history_size: int = 0
    #: Seconds an event is kept.
    history_ttl: float = DEFAULT_HISTORY_TTL
    #: Bytes of events kept per channel (their frames as sent).
    history_bytes: int = DEFAULT_HISTORY_BYTES
    #: A Subscribe with positions gets what was missed first (needs history).
    recover: bool = False
    #: Who is subscribed, cluster-wide: the Presence and PresenceStats opcodes, GET /api/presence.
    presence: bool = False
    #: Join and Leave events to the channel's subscribers (needs presence).
    join_leave: bool = False

    @property
    def history(self) -> bool:
        return self.history_size > 0


class ChannelTable:
    """The options of each channel: the first matching entry's, remembered per channel name."""

    _CACHE_SIZE = 10_000

    def __init__(self, entries: "tuple[ChannelOptions, ...]" = ()) -> None:
        self.entries = tuple(entries)
        self._cache: dict[str, Optional[ChannelOptions]] = {}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def options(self, channel: str) -> Optional[ChannelOptions]:
        """The options of ``channel``, or None when no entry matches it."""
        if not self.entries:
            return None
        try:
            return self._cache[channel]
        except KeyError:
            pass
        found = next((e for e in self.entries if fnmatchcase(channel, e.match)), None)
        if len(self._cache) >= self._CACHE_SIZE:
            self._cache.clear()
        self._cache[channel] = found
        return found
