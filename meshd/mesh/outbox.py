# -*- test-case-name: tests.test_mesh_wire -*-
"""What one node has sent, or will send, to one peer, kept until the peer acknowledges it."""

from __future__ import annotations

from collections import deque
from typing import Iterator


class Outbox:
    """Routed frames for one peer, in sequence order, bounded in bytes and age.

    Frames stay here until the peer acknowledges them (heartbeats carry the
    highest sequence number it has received), so that a link that breaks can
    resume where the peer stopped reading.

    While the link is down, frames only wait here; past ``max_bytes`` or
    ``max_age`` seconds all of them are dropped, and the caller counts and
    logs them.  While the link is up, frames have been written already: past
    ``max_bytes`` the oldest are forgotten (:meth:`trim`) and only count as
    lost if the link then breaks before the peer acknowledged them
    (:meth:`lost_before`).
    """

    __slots__ = ("max_bytes", "max_age", "size", "_entries", "_trimmed_through", "_trimmed")

    def __init__(self, max_bytes: int, max_age: float) -> None:
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.size = 0
        self._entries: deque[tuple[int, float, bytes]] = deque()
        self._trimmed_through = 0  # highest seq forgotten before it was acknowledged
        self._trimmed = 0  # how many such frames

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, seq: int, data: bytes, now: float) -> None:
        self._entries.append((seq, now, data))
        self.size += len(data)

    @property
    def over(self) -> bool:
        return self.size > self.max_bytes

    def trim(self) -> None:
        """Forget the oldest frames (all written) until within ``max_bytes``."""
        entries = self._entries
        while self.size > self.max_bytes and entries:
            seq, _at, data = entries.popleft()
            self.size -= len(data)
            self._trimmed_through = seq
            self._trimmed += 1

    def ack(self, seq: int) -> None:
        """Forget everything up to and including ``seq``."""
        entries = self._entries
        while entries and entries[0][0] <= seq:
            self.size -= len(entries.popleft()[2])
        if seq >= self._trimmed_through:
            self._trimmed = 0

    def lost_before(self, seq: int) -> int:
        """How many forgotten frames a peer that has read up to ``seq`` may have missed."""
        return self._trimmed if seq < self._trimmed_through else 0

    def expire(self, now: float) -> int:
        """Drop everything if the oldest frame is past ``max_age``; return how many."""
        if self._entries and now - self._entries[0][1] > self.max_age:
            return self.clear()
        return 0

    def clear(self) -> int:
        dropped = len(self._entries)
        self._entries.clear()
        self.size = 0
        return dropped

    def after(self, seq: int) -> Iterator[bytes]:
        """The frames with a sequence number above ``seq``, in order."""
        for entry_seq, _at, data in self._entries:
            if entry_seq > seq:
                yield data

    def entries_after(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """The sequence numbers and frames above ``seq``, in order."""
        for entry_seq, _at, data in self._entries:
            if entry_seq > seq:
                yield entry_seq, data
