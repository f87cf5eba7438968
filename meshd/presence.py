# -*- test-case-name: tests.test_presence -*-
"""Presence: who is subscribed to a channel, cluster-wide, and Join / Leave events.

For a channel with ``presence`` (``[[channels]]``) a node answers from its
own sessions and asks the other nodes for theirs (a ``Presence`` query):
only nodes that answer are in the answer, so the sessions of a node that is
gone leave presence as soon as its link does.  Nothing is kept per channel
for that: memory follows the sessions.

With ``join_leave`` too, the node of a session that subscribes or leaves
(unsubscribes, disconnects) publishes a ``Join`` or ``Leave`` event on the
channel, which reaches its subscribers on every node like any channel event
(the session itself gets neither).  Each node also notes the joins it sees
from other nodes, so that when a node is gone (its link given up after the
mesh's outage bound, or it restarted with a new incarnation) every other
node sends its own subscribers the ``Leave`` events that node can no longer
send.  That note is bounded by the subscriptions of the channels this node
follows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional
from uuid import UUID

from twisted.internet.defer import Deferred, succeed

from meshd.codec import EventType, Opcode, PresenceEntry, decode, encode
from meshd.delivery import CHANNEL
from meshd.events import received
from meshd.fb.mesh.RouteKind import RouteKind

if TYPE_CHECKING:
    from meshd.app import Application
    from meshd.channels import ChannelOptions, ChannelTable
    from meshd.mesh.queries import Results
    from meshd.mesh.wire import Routed
    from meshd.session import Session

#: How long a Presence request waits for the other nodes, in seconds.
PRESENCE_TIMEOUT = 2.0


class Presence:
    """This node's part of presence (see the module)."""

    def __init__(self, app: "Application", table: "ChannelTable") -> None:
        self.app = app
        self.table = table
        #: node -> channel -> session -> (principal, info): the joins seen from other nodes.
        self.remote: dict[UUID, dict[str, dict[UUID, tuple[Optional[str], Optional[str]]]]] = {}
        app.registry.observe_members(self._member)
        # Without subscribers here, this node no longer hears the channel's Leaves: forget its notes.
        app.registry.observe(lambda channel, present: None if present else self._forget(channel))

    def options(self, channel: Optional[str]) -> "Optional[ChannelOptions]":
        """The options of ``channel`` when it has presence, else None."""
        if channel is None:
            return None
        options = self.table.options(channel)
        return options if options is not None and options.presence else None

    def local(self, channel: str) -> list[PresenceEntry]:
        """This node's sessions subscribed to ``channel``."""
        node = self.app.node_id
        return [PresenceEntry(s.id, node, s.principal, s.info) for s in self.app.registry.subscribers(channel)]

    def cluster(self, channel: str) -> "Deferred[tuple[list[PresenceEntry], list[UUID]]]":
        """Every node's sessions subscribed to ``channel``, and the nodes that did not answer."""
        entries = self.local(channel)
        mesh = self.app.mesh
        if mesh is None:
            return succeed((entries, []))
        from meshd.mesh.wire import Query, QueryKind

        def gathered(results: "Results") -> tuple[list[PresenceEntry], list[UUID]]:
            for answers in results.answers.values():
                for answer in answers:
                    entries.extend(answer.presence)
            return entries, results.missing

        return mesh.ask(Query(kind=QueryKind.Presence, channel=channel), PRESENCE_TIMEOUT).addCallback(gathered)

    # -- Join and Leave ------------------------------------------------------------------

    def _member(self, channel: str, session: "Session", joined: bool) -> None:
        """A session of this node is about to join or leave ``channel``."""
        options = self.options(channel)
        if options is None or not options.join_leave:
            return  # (a subscribed session was welcomed: Subscribe needs Hello)
        kind = EventType.Join if joined else EventType.Leave
        state, node = self.app.state, self.app.node_id

        def make(epoch: int = 0, seq: int = 0):
            return self._event(kind, channel, session.id, node, session.principal, session.info, epoch, seq)

        # On a history channel they are events of the channel like any other: numbered, kept, recovered.
        event, seq = state.sequenced(channel, make) if state.keeps_history(channel) else (make(), 0)
        state.router.route(RouteKind.ChannelMessage, event, channel=channel, exclude_session=session.id,
                           seq=seq or None)
        state._emit(CHANNEL, event, session.id)

    def _event(self, kind: int, channel: str, session: UUID, node: UUID, principal: Optional[str],
               info: Optional[str], epoch: int = 0, seq: int = 0):
        frame = encode(Opcode.Event, event_type=kind, channel=channel, session=session, node=node,
                       principal=principal, payload=(info or "").encode("utf-8"), epoch=epoch, seq=seq)
        return received(frame, channel, None)

    def routed(self, node: UUID, routed: "Routed") -> None:
        """A channel event from ``node``: note the Joins and Leaves of join_leave channels."""
        options = self.options(routed.channel)
        if options is None or not options.join_leave:
            return
        event = decode(routed.frame)
        if event.event_type == EventType.Join and event.session is not None:
            channels = self.remote.setdefault(node, {})
            channels.setdefault(routed.channel, {})[event.session] = (event.principal, event.payload.decode(
                "utf-8", "replace") if event.payload else None)
        elif event.event_type == EventType.Leave and event.session is not None:
            sessions = self.remote.get(node, {}).get(routed.channel)
            if sessions is not None:
                sessions.pop(event.session, None)
                if not sessions:
                    del self.remote[node][routed.channel]

    def _forget(self, channel: str) -> None:
        for node in list(self.remote):
            channels = self.remote[node]
            channels.pop(channel, None)
            if not channels:
                del self.remote[node]

    def departed(self, node: UUID) -> None:
        """``node`` is gone (or restarted): its sessions leave, told to this node's subscribers (these
        Leaves carry no position: they are this node's telling, not an event of the channel's stream)."""
        state = self.app.state
        for channel, sessions in self.remote.pop(node, {}).items():
            for session, (principal, info) in sessions.items():
                state._emit(CHANNEL, self._event(EventType.Leave, channel, session, node, principal, info))
