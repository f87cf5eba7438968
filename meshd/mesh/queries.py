# -*- test-case-name: tests.test_mesh_queries -*-
"""Questions to the other nodes of a mesh, and their answers (Query and Answer frames).

A node asks every peer linked now whose LinkHello lists the feature
``query``, and gathers what each answers until all have, or a timeout.
A peer that is not linked, does not know the frames, loses its link or
does not answer in time is listed as missing: the caller says so rather
than waiting.  Nothing here is retried or kept past its answer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable
from uuid import UUID

from twisted.internet.defer import Deferred

from meshd.codec import Position, PresenceEntry
from meshd.mesh.wire import QUERY_FEATURE, Answer, Query, encode_query

if TYPE_CHECKING:
    from meshd.mesh.link import Link

__all__ = ["QUERY_FEATURE", "Answerer", "Queries", "Reply", "Results"]


@dataclass
class Results:
    """What the peers answered to one query: each node's answers, and the nodes that did not answer."""

    answers: dict[UUID, list[Answer]] = field(default_factory=dict)
    missing: list[UUID] = field(default_factory=list)


@dataclass
class _Pending:
    waiting: set[UUID]
    results: Results
    done: Deferred
    timer: object = None


class Queries:
    """The queries this node has asked and not yet had every answer to."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}

    def ask(self, links: Iterable["Link"], unreachable: Iterable[UUID], query: Query,
            timeout: float) -> "Deferred[Results]":
        """Send ``query`` on each of ``links`` (open, with the feature); fire with what came back.

        ``unreachable`` are known nodes it cannot be asked on: they are missing from the start.
        """
        results = Results(missing=sorted(set(unreachable), key=str))
        done: Deferred = Deferred()
        targets = [link for link in links if link.peer is not None]
        if not targets:
            done.callback(results)
            return done
        query = replace(query, id=next(self._ids))
        payload = encode_query(query)
        for link in targets:
            link.send(payload)  # raises (FrameTooLarge) before anything is kept
        pending = _Pending({link.peer.node for link in targets}, results, done)
        self._pending[query.id] = pending
        pending.timer = self.clock.callLater(timeout, self._expire, query.id)
        return done

    def answered(self, node: UUID, answer: Answer) -> None:
        """An Answer frame from ``node``; one for a query no longer pending is dropped."""
        pending = self._pending.get(answer.id)
        if pending is None or node not in pending.waiting:
            return
        pending.results.answers.setdefault(node, []).append(answer)
        if not answer.more:
            pending.waiting.discard(node)
            self._settle(answer.id)

    def lost(self, node: UUID) -> None:
        """The link with ``node`` is gone: no answer will come from it."""
        for id, pending in list(self._pending.items()):
            if node in pending.waiting:
                pending.waiting.discard(node)
                pending.results.answers.pop(node, None)
                pending.results.missing.append(node)
                self._settle(id)

    def cancel_all(self) -> None:
        """The mesh stops: every query fires with what it has."""
        for id, pending in list(self._pending.items()):
            pending.waiting, missing = set(), pending.waiting
            pending.results.missing.extend(missing)
            self._settle(id)

    def _expire(self, id: int) -> None:
        pending = self._pending.get(id)
        if pending is not None:
            pending.timer = None
            for node in pending.waiting:
                pending.results.answers.pop(node, None)  # a part of a split answer is no answer
                pending.results.missing.append(node)
            pending.waiting = set()
            self._settle(id)

    def _settle(self, id: int) -> None:
        pending = self._pending[id]
        if pending.waiting:
            return
        del self._pending[id]
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.results.missing.sort(key=str)
        pending.done.callback(pending.results)


@dataclass(frozen=True)
class Reply:
    """What a node answers a query with (as many Answer frames as it takes)."""

    sessions: int = 0  # Stats
    channels: "Iterable[tuple[str, int]]" = ()  # Stats: (channel, subscribers)
    closed: "Iterable[UUID]" = ()  # Disconnect: the sessions closed
    events: "Iterable[bytes]" = ()  # History: Event frames
    covered: "Iterable[Position]" = ()  # History: the positions the events are complete after
    presence: "Iterable[PresenceEntry]" = ()  # Presence: the channel's sessions on the node


Answerer = Callable[[Query], Reply]
