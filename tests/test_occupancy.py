"""Occupied and vacated: once per change, cluster-wide, without flapping."""

from __future__ import annotations

from uuid import UUID, uuid4

from twisted.internet.task import Clock
from twisted.trial import unittest

from meshd.occupancy import VACATE_GRACE, Occupancy, owner
from meshd.registry import Registry

from .meshsupport import MeshTestCase
from .support import sleep


class OccupancyTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.linked: list[UUID] = []
        self.node = UUID(int=1)
        self.occupancy = Occupancy(self.node, Registry(), self.clock, linked=lambda: self.linked)
        self.calls: list[tuple[str, str]] = []
        self.occupancy.occupied_hooks.append(lambda c: self.calls.append(("occupied", c)))
        self.occupancy.vacated_hooks.append(lambda c: self.calls.append(("vacated", c)))

    def test_once_per_change(self) -> None:
        """The first node with subscribers occupies; more do not; the last one leaving vacates after the grace."""
        peer = uuid4()
        self.occupancy.changed("room", True)
        self.occupancy.peer_changed(peer, "room", True)
        self.assertEqual(self.calls, [("occupied", "room")])
        self.occupancy.changed("room", False)
        self.occupancy.peer_changed(peer, "room", False)
        self.clock.advance(VACATE_GRACE - 0.01)
        self.assertEqual(self.calls, [("occupied", "room")])
        self.clock.advance(0.01)
        self.assertEqual(self.calls, [("occupied", "room"), ("vacated", "room")])
        self.assertEqual((self.occupancy.counts, self.occupancy.occupied), ({}, set()))

    def test_no_flapping(self) -> None:
        """A channel that has subscribers again within the grace is neither vacated nor occupied again."""
        self.occupancy.changed("room", True)
        self.occupancy.changed("room", False)
        self.clock.advance(VACATE_GRACE / 2)
        self.occupancy.peer_changed(uuid4(), "room", True)
        self.clock.advance(VACATE_GRACE * 2)
        self.assertEqual(self.calls, [("occupied", "room")])

    def test_only_the_owner_calls(self) -> None:
        """Among linked nodes, only the channel's owner calls the hooks; every node keeps the state."""
        others = [uuid4() for _ in range(5)]
        self.linked = others
        channels = [f"c{i}" for i in range(40)]
        for channel in channels:
            self.occupancy.peer_changed(others[0], channel, True)
        mine = [c for c in channels if owner(c, [self.node, *others]) == self.node]
        self.assertTrue(0 < len(mine) < len(channels))
        self.assertEqual(self.calls, [("occupied", c) for c in mine])
        self.assertEqual(self.occupancy.occupied, set(channels))

    def test_a_failing_hook_does_not_stop_the_others(self) -> None:
        self.occupancy.occupied_hooks.insert(0, lambda c: 1 / 0)
        self.occupancy.changed("room", True)
        self.assertEqual(self.calls, [("occupied", "room")])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_stop_cancels_pending(self) -> None:
        self.occupancy.changed("room", True)
        self.occupancy.changed("room", False)
        self.occupancy.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ClusterOccupancyTests(MeshTestCase):
    async def test_three_nodes_report_once(self) -> None:
        """With hooks on every node of three, each change is reported once in all, whichever node it is on."""
        nodes = await self.cluster_of(3)
        calls: list[tuple[str, str, UUID]] = []
        for node in nodes:
            node.app.on_channel_occupied(lambda c, n=node: calls.append(("occupied", c, n.app.node_id)))
            node.app.on_channel_vacated(lambda c, n=node: calls.append(("vacated", c, n.app.node_id)))
        channels = [f"room-{i}" for i in range(6)]
        a, b = await self.client_of(nodes[1]), await self.client_of(nodes[2])
        for channel in channels:
            await a.subscribe(channel)
            await b.subscribe(channel)
        for channel in channels:
            await self.interest_settled(nodes, channel, nodes[1:])
        self.assertEqual(sorted(c for kind, c, _ in calls if kind == "occupied"), channels)
        ids = [n.app.node_id for n in nodes]
        self.assertEqual({c: n for _, c, n in calls}, {c: owner(c, ids) for c in channels})
        for channel in channels:
            await a.unsubscribe(channel)
            await b.unsubscribe(channel)
        await self.wait_for(lambda: len(calls) == 2 * len(channels), "every channel vacated")
        await sleep(VACATE_GRACE / 2)  # nothing more comes
        self.assertEqual(sorted(c for kind, c, _ in calls if kind == "vacated"), channels)
