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

from twisted.internet.defer import Deferred, succeed

from meshd.codec import Opcode, Position, ProtocolError, batch_entries, decode
from meshd.mesh.framing import FrameTooLarge
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
    registry, history, mesh = app.registry, app.history, app.mesh
    registry.pin(channel)
    try:
        mesh.announce_now()
        held = history.channels.get(channel)
        missing = [p for p in positions
                   if held is None or held.covered.get((p.node, p.epoch), p.seq + 1) > p.seq]
        # A node the positions do not name is one the client saw nothing of (it joined later): all of
        # its events count, so ask it from its first.
        named, linked = {p.node for p in positions}, set(mesh.linked())
        missing += [Position(node, incarnation, 0) for node, incarnation, _ in mesh.received()
                    if node not in named and node in linked]
        asked = mesh.ask(Query(kind=QueryKind.History, channel=channel, positions=tuple(missing)), RECOVERY_TIMEOUT)
    except FrameTooLarge:
        # Too many positions for one mesh frame: subscribed, and told it was not recovered.
        registry.unpin(channel)
        registry.subscribe(request.session, channel)
        if request.message.request_id:
            request.reply(Opcode.Ack, positions=app.positions_now(channel, history.read(channel)[2]), recovered=False)
        return succeed(None)
    except Exception:
        registry.unpin(channel)
        raise
    pending = _Pending(request.session, channel)
    history.recovering[(request.session.id, channel)] = pending

    def answered(results: "Results") -> None:
        try:
            session = request.session
            if not session.is_open or pending.cancelled:
                if pending.cancelled and request.message.request_id and session.is_open:
                    request.reply(Opcode.Ack, recovered=False)
                return
            replay = _replay(app, channel, positions, missing, results)
            if replay is not None:
                session.send_events(replay)
            registry.subscribe(session, channel)
            if request.message.request_id:
                request.reply(Opcode.Ack, positions=app.positions_now(channel, history.read(channel)[2]),
                              recovered=replay is not None)
        finally:
            history.recovering.pop((request.session.id, channel), None)
            registry.unpin(channel)

    return asked.addCallback(answered)


class _Pending:
    """A Subscribe being recovered: an Unsubscribe of the channel meanwhile cancels it."""

    __slots__ = ("session", "channel", "cancelled")

    def __init__(self, session, channel: str) -> None:
        self.session, self.channel, self.cancelled = session, channel, False


def cancel(history, session_id: UUID, channel: str) -> bool:
    """An Unsubscribe: a recovery of ``channel`` for that session under way does not subscribe it."""
    pending = history.recovering.get((session_id, channel))
    if pending is None:
        return False
    pending.cancelled = True
    return True


def _replay(app: "Application", channel: str, positions: "list[Position]", missing: "list[Position]",
            results: "Results") -> "Optional[list[bytes]]":
    """The frames to send before the Ack, or None when some position cannot be vouched for."""
    history, mesh = app.history, app.mesh
    assert history is not None and mesh is not None
    linked = set(mesh.linked())
    # The peers' answers: per position, the events after it; the origin's own answer when it gave one.
    vouched: dict[tuple[UUID, int], list[tuple[int, bytes]]] = {}
    vouched_by: dict[tuple[UUID, int], UUID] = {}
    for node, answers in results.answers.items():
        covered = {(p.node, p.epoch) for a in answers for p in a.covered}
        try:
            frames = [f for a in answers for f in batch_entries(a.events)]
        except ProtocolError:
            continue  # a malformed answer vouches for nothing
        for key in covered:
            if key in vouched and vouched_by[key] == key[0]:
                continue  # the origin's own answer is there already
            if key in vouched and node != key[0]:
                continue
            events = []
            for frame in frames:
                try:
                    event = decode(frame)
                except ProtocolError:
                    continue
                if (event.node, event.epoch) == key:
                    events.append((event.seq, frame))
            vouched[key] = events
            vouched_by[key] = node
    held = history.channels.get(channel)
    covered_here = held.covered if held is not None else {}
    starts = held.starts if held is not None else {}
    since: dict[tuple[UUID, int], int] = {}
    replay: list[bytes] = []
    for p in missing:
        key = (p.node, p.epoch)
        if key in since:
            continue
        if key not in vouched:
            if (p.node == app.node_id or p.node in linked or _held_after(held, key, p.seq)
                    or (p.seq and not mesh.gone(p.node))):
                # Its events after p may exist, and no node vouches for them (an origin the client has
                # events of is waited for until the mesh gives it up).
                return None
            since[key] = -1  # unreachable, and no node followed it: nothing of it after p reached a node here
            continue
        events = [(seq, frame) for seq, frame in vouched[key] if seq > p.seq]
        last = max([p.seq] + [seq for seq, _ in events])
        here = covered_here.get(key)
        origin_answered = vouched_by[key] == p.node and here is not None and here == starts.get(key)
        if here is not None and (here <= last or origin_answered):
            # What came here since follows on: from a third node's answer only if it reaches this
            # node's coverage; from the origin's own, when this node's coverage still starts at the
            # origin's Start marker, which came before that answer on the same link.
            since[key] = last
        elif mesh.gone(p.node):
            since[key] = -1  # gone: nothing more will come of it
        else:
            return None  # its events after the answer may not have come here: a gap could hide
        replay += [frame for _, frame in events]
    for p in positions:
        key = (p.node, p.epoch)
        if key in since:
            continue
        if covered_here.get(key, p.seq + 1) > p.seq:
            return None  # what this node held after it went meanwhile (its bounds)
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


