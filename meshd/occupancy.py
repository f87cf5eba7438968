# -*- test-case-name: tests.test_occupancy -*-
"""Occupied and vacated: a channel's first subscriber anywhere in the cluster, and its last.

A node knows which channels have subscribers on it (the registry) and on
each of its peers (the interest they gossip).  From both it counts, per
channel, the nodes with subscribers.  A channel is *occupied* when that
count rises from 0, and *vacated* when it has stayed at 0 for
:data:`VACATE_GRACE` seconds: a subscriber that reconnects at once, or a
peer that links again and sends its interest anew, does not make a channel
flap.

Every node keeps this state, but only one calls the hooks for a channel: its
*owner*, the node of highest rendezvous hash of (channel, node id) among
itself and the peers it is linked with now.  In a cluster whose links are up
that is one node, so each change is reported once.  While a node is lost or
the cluster is split, two nodes may each believe they own a channel, or a
change may happen while ownership moves: a change may then be reported
twice, or not at all (docs/extending.md).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Callable, Iterable
from uuid import UUID

from twisted.logger import Logger

if TYPE_CHECKING:
    from meshd.registry import Registry

#: Seconds a channel stays without subscribers anywhere before it is vacated.
VACATE_GRACE = 1.0

Hook = Callable[[str], None]


def owner(channel: str, nodes: Iterable[UUID]) -> UUID:
    """The node that reports ``channel``'s changes: highest rendezvous hash among ``nodes``."""
    name = channel.encode("utf-8")
    return max(nodes, key=lambda node: hashlib.blake2b(node.bytes + name, digest_size=8).digest())


class Occupancy:
    """Counts, per channel, the nodes with subscribers; calls the hooks on this channel's owner."""

    log = Logger()

    def __init__(self, node_id: UUID, registry: "Registry", clock,
                 linked: Callable[[], Iterable[UUID]] = tuple) -> None:
        self.node_id = node_id
        self.clock = clock
        #: The peers linked now (ownership is decided among them and this node).
        self._linked = linked
        self.occupied_hooks: list[Hook] = []
        self.vacated_hooks: list[Hook] = []
        #: Nodes with subscribers, per channel (this one included).
        self.counts: dict[str, int] = {}
        #: Channels occupied, as this node sees the cluster.
        self.occupied: set[str] = set()
        self._vacating: dict[str, object] = {}
        for channel in registry.channels:
            self.changed(channel, True)
        registry.observe(self.changed)

    def changed(self, channel: str, present: bool) -> None:
        """A node gained its first subscriber of ``channel`` (``present``), or lost its last."""
        count = self.counts.get(channel, 0) + (1 if present else -1)
        if count > 0:
            self.counts[channel] = count
            pending = self._vacating.pop(channel, None)
            if pending is not None:
                pending.cancel()
            elif channel not in self.occupied:
                self.occupied.add(channel)
                self._call(self.occupied_hooks, channel)
        else:
            self.counts.pop(channel, None)
            if channel in self.occupied and channel not in self._vacating:
                self._vacating[channel] = self.clock.callLater(VACATE_GRACE, self._vacate, channel)

    def peer_changed(self, node: UUID, channel: str, present: bool) -> None:
        """A peer's interest changed (``Mesh.observe_interest``)."""
        self.changed(channel, present)

    def stop(self) -> None:
        for pending in self._vacating.values():
            pending.cancel()
        self._vacating.clear()

    def _vacate(self, channel: str) -> None:
        del self._vacating[channel]
        self.occupied.discard(channel)
        self._call(self.vacated_hooks, channel)

    def _call(self, hooks: list[Hook], channel: str) -> None:
        if not hooks or owner(channel, (self.node_id, *self._linked())) != self.node_id:
            return
        for hook in list(hooks):
            try:
                hook(channel)
            except Exception:
                self.log.failure("An occupied/vacated hook failed for channel {channel}", channel=channel)
