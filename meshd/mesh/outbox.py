# -*- test-case-name: tests.test_mesh_outbox -*-
"""What one node has sent, or will send, to one peer, kept until the peer acknowledges it."""

from __future__ import annotations

from collections import deque
from typing import Iterator


class Outbox:
    """Routed frames for one peer, in sequence order, bounded in bytes and age.

    Frames stay here until the peer acknowledges them (heartbeats carry the
    highest sequence number it has received), so that a link that breaks can
    resume where the peer stopped reading.  While the link is down new
    frames only wait here.  Past ``max_bytes`` or ``max_age`` seconds the
    whole outbox is dropped: the caller counts and logs what was lost.
    """

    __slots__ = ("max_bytes", "max_age", "size", "_entries")

    def __init__(self, max_bytes: int, max_age: float) -> None:
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.size = 0
        self._entries: deque[tuple[int, float, bytes]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, seq: int, data: bytes, now: float) -> int:
        """Keep ``data``; return how many frames were dropped to stay within bounds."""
        self._entries.append((seq, now, data))
        self.size += len(data)
        if self.size > self.max_bytes:
            return self.clear()
        return 0

    def ack(self, seq: int) -> None:
        """Forget everything up to and including ``seq``."""
        entries = self._entries
        while entries and entries[0][0] <= seq:
            self.size -= len(entries.popleft()[2])

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
