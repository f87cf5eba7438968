# -*- test-case-name: tests.test_history -*-
"""Recovering a subscription over the mesh, when this node cannot vouch for every position alone.

The node holds the channel (:meth:`~meshd.registry.Registry.pin`) and tells
its peers at once, so that they start sending it the channel's events and
their Start markers; then it asks them (a ``History`` query) for the events
after the positions it does not cover.  A peer answers for the positions it
covers: its own events always, a third node's when it followed the channel.
An origin's own answer comes after its Start marker on the same link, so
what the origin sent in the answer and what it sends this node from the
marker on leave no gap between them.  When every position is vouched for,
the missed events go to the session, it is subscribed and the Ack says
``recovered``, all in one turn: an event is either kept by then (and
replayed) or comes later (and is delivered live).  docs/recovery.md says
what is guaranteed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional
from uuid import UUID

from twisted.internet.defer import Deferred

from meshd.codec import Opcode, Position, decode
from meshd.mesh.wire import Query, QueryKind

if TYPE_CHECKING:
    from meshd.app import Application
    from meshd.handlers import Request
    from meshd.mesh.queries import Results

#: How long a recovering Subscribe waits for the peers' answers, in seconds.
RECOVERY_TIMEOUT = 2.0


def recover(app: "Application", request: "Request", channel: str, positions: "list[Position]") -> Deferred:
    """Answer a Subscribe with ``recover`` whose ``positions`` this node does not all cover."""
    assert app.mesh is not None and app.history is not None
    registry, history = app.registry, app.history
    registry.pin(channel)
    app.mesh.announce_now()
    held = history.channels.get(channel)
    missing = [p for p in positions
               if held is None or held.covered.get((p.node, p.epoch), p.seq + 1) > p.seq]
    asked = app.mesh.ask(Query(kind=QueryKind.History, channel=channel, positions=tuple(missing)),
                         RECOVERY_TIMEOUT)

    def answered(results: "Results") -> None:
        try:
            replay = _replay(app, channel, positions, missing, results)
            session = request.session
            if not session.is_open:
                return
            if replay is not None:
                session.send_events(replay)
            registry.subscribe(session, channel)
            if request.message.request_id:
                request.reply(Opcode.Ack, positions=app.positions_now(channel, history.read(channel)[2]),
                              recovered=replay is not None)
        finally:
            registry.unpin(channel)

    return asked.addCallback(answered)


def _replay(app: "Application", channel: str, positions: "list[Position]", missing: "list[Position]",
            results: "Results") -> "Optional[list[bytes]]":
    """The frames to send before the Ack, or None when some position cannot be vouched for."""
    history = app.history
    assert history is not None
    # The peers' answers: per position, the events after it, the origin's own answer first.
    vouched: dict[tuple[UUID, int], list[tuple[int, bytes]]] = {}
    vouched_by: dict[tuple[UUID, int], UUID] = {}
    by_origin = sorted(results.answers.items(), key=lambda item: 0 if any(p.node == item[0] for p in missing) else 1)
    for node, answers in by_origin:
        covered = {(p.node, p.epoch) for a in answers for p in a.covered}
        frames = [f for a in answers for f in _frames(a.events)]
        for key in covered:
            if key in vouched:
                continue
            events = []
            for frame in frames:
                event = decode(frame)
                if (event.node, event.epoch) == key:
                    events.append((event.seq, frame))
            vouched[key] = events
            vouched_by[key] = node
    linked = set(app.mesh.linked()) if app.mesh is not None else set()
    held = history.channels.get(channel)
    covered_here = held.covered if held is not None else {}
    since: dict[tuple[UUID, int], int] = {}
    replay: list[bytes] = []
    for p in positions:
        key = (p.node, p.epoch)
        if p in missing:
            if key not in vouched:
                if p.node in linked or _held_after(held, key, p.seq):
                    return None
                since[key] = -1  # gone, and no node followed it: nothing of it after p reached anyone else
                continue
            events = [(seq, frame) for seq, frame in vouched[key] if seq > p.seq]
            replay += [frame for _, frame in events]
            last = max([p.seq] + [seq for seq, _ in events])
            here = covered_here.get(key)
            if here is not None and (here <= last or vouched_by[key] == p.node):
                # What came here since follows on: from a third node's answer only if it reaches this
                # node's coverage; from the origin's own, always (its Start marker came before it).
                since[key] = last
            elif p.node in linked:
                return None  # its events after the answer may not have come here: a gap could hide
            else:
                since[key] = -1  # gone: nothing more will come of it
        elif covered_here.get(key, p.seq + 1) > p.seq:
            return None  # what this node held after it went meanwhile (its bounds)
        else:
            since[key] = p.seq
    if held is not None:
        for key, start in held.covered.items():
            since.setdefault(key, start)  # an origin the client saw nothing of: all held of it
        replay += [e.frame for e in held.entries if since.get((e.origin, e.epoch), -1) != -1
                   and e.seq > since[(e.origin, e.epoch)]]
    return replay


def _held_after(held, key: "tuple[UUID, int]", seq: int) -> bool:
    """Whether this node holds events of ``key`` after ``seq`` (it did not follow them all)."""
    return held is not None and any((e.origin, e.epoch) == key and e.seq > seq for e in held.entries)


def _frames(payload: bytes) -> "list[bytes]":
    """The Event frames of a Batch-style payload (each after its 4-byte little-endian length)."""
    out, at = [], 0
    while at + 4 <= len(payload):
        length = int.from_bytes(payload[at:at + 4], "little")
        out.append(payload[at + 4:at + 4 + length])
        at += 4 + length
    return out
