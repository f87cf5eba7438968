# -*- test-case-name: tests.test_mesh_wire -*-
"""Encode and decode node-to-node frames (``schemas/mesh.fbs``)."""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Optional, Union
from uuid import UUID

import flatbuffers

from meshd import flatverify as fv
from meshd.codec import PADDING, WATCHABLE, EventType, Position, Watchable, encode_event, string_part, watchable_part
from meshd.codec import PRESENCE_ENTRY, PresenceEntry, positions_vector, presence_vector
from meshd.codec import batch_payload as _batch_payload
from meshd.fb.client.Uuid import CreateUuid
from meshd.fb.mesh import Answer as A
from meshd.fb.mesh import ChannelCount as CC
from meshd.fb.mesh import Cursor as C
from meshd.fb.mesh import Frame as F
from meshd.fb.mesh import Goodbye as G
from meshd.fb.mesh import Heartbeat as H
from meshd.fb.mesh import Interest as I
from meshd.fb.mesh import LinkHello as L
from meshd.fb.mesh import Peer as P
from meshd.fb.mesh import Peers as PS
from meshd.fb.mesh import Query as Q
from meshd.fb.mesh.Body import Body
from meshd.fb.mesh.GoodbyeCode import GoodbyeCode
from meshd.fb.mesh.QueryKind import QueryKind
from meshd.fb.mesh.RouteKind import RouteKind
from meshd.mesh.framing import LENGTH

__all__ = [
    "HISTORY_FEATURE", "MESH_IDENTIFIER", "QUERY_FEATURE", "MESH_VERSION", "Answer", "Body", "ChannelCount", "Cursor", "Goodbye",
    "GoodbyeCode", "Heartbeat", "Interest", "LinkHello", "Malformed", "Peer", "Peers", "Query", "QueryKind",
    "RouteKind", "Routed", "decode", "encode_answers", "encode_goodbye", "encode_heartbeat", "encode_hello",
    "encode_interest", "encode_peers", "encode_query", "encode_routed", "marker_frame", "read_routed",
    "routed_frame", "start_frame",
]

MESH_IDENTIFIER = b"MSHM"
MESH_VERSION = 1
#: ``LinkHello.features``: frames a node takes beyond version 1's first set.  Query and Answer frames:
QUERY_FEATURE = "query"
#: Start markers (a Routed frame of kind Start) and history channels' positions (meshd.history):
HISTORY_FEATURE = "history"
Malformed = fv.Malformed
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Peer:
    node: UUID
    address: str


@dataclass(frozen=True)
class Cursor:
    node: UUID
    incarnation: int = 0
    seq: int = 0


@dataclass(frozen=True)
class LinkHello:
    node: UUID
    cluster: str
    incarnation: int = 0
    version: int = 0
    address: str = ""
    peers: tuple[Peer, ...] = ()
    interests: tuple[str, ...] = ()
    cursors: tuple[Cursor, ...] = ()
    nonce: int = 0
    features: tuple[str, ...] = ()
    name: str = ""


@dataclass(frozen=True)
class Heartbeat:
    acked: int = 0
    ping: int = 0
    pong: int = 0


@dataclass(slots=True)  # not frozen: built and read for every event that crosses a link
class Routed:
    origin: UUID
    frame: bytes
    seq: int = 0
    kind: int = RouteKind.Event
    channel: Optional[str] = None
    watchable: Optional[Watchable] = None
    exclude_session: Optional[UUID] = None


@dataclass(frozen=True)
class Interest:
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class Peers:
    peers: tuple[Peer, ...] = ()


@dataclass(frozen=True)
class Goodbye:
    code: int = GoodbyeCode.Shutdown
    reason: str = ""


@dataclass(frozen=True)
class Query:
    id: int = 0
    kind: int = QueryKind.Stats
    principal: Optional[str] = None
    session: Optional[UUID] = None
    code: int = 0
    reason: str = ""
    channel: Optional[str] = None
    positions: tuple[Position, ...] = ()


@dataclass(frozen=True)
class ChannelCount:
    channel: str
    subscribers: int = 0


@dataclass(frozen=True)
class Answer:
    id: int = 0
    more: bool = False
    sessions: int = 0
    channels: tuple[ChannelCount, ...] = ()
    closed: tuple[UUID, ...] = ()
    events: bytes = b""
    covered: tuple[Position, ...] = ()
    presence: tuple[PresenceEntry, ...] = ()


MeshFrame = Union[LinkHello, Heartbeat, Routed, Interest, Peers, Goodbye, Query, Answer]


# -- decoding -------------------------------------------------------------------


def _make(cls, tuples: tuple[str, ...] = ()):
    def make(values: dict):
        for name in tuples:
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    return make


_PEER = fv.Table(
    "Peer",
    (fv.Field("node", fv.UUID_STRUCT, required=True), fv.Field("address", fv.STRING, required=True)),
    _make(Peer),
)
_CURSOR = fv.Table(
    "Cursor",
    (fv.Field("node", fv.UUID_STRUCT, required=True), fv.Field("incarnation", fv.U64), fv.Field("seq", fv.U64)),
    _make(Cursor),
)
_HELLO = fv.Table(
    "LinkHello",
    (
        fv.Field("node", fv.UUID_STRUCT, required=True),
        fv.Field("incarnation", fv.U64),
        fv.Field("cluster", fv.STRING, required=True),
        fv.Field("version", fv.U16),
        fv.Field("address", fv.STRING),
        fv.Field("peers", fv.TABLES, _PEER),
        fv.Field("interests", fv.STRINGS),
        fv.Field("cursors", fv.TABLES, _CURSOR),
        fv.Field("nonce", fv.U64),
        fv.Field("features", fv.STRINGS),
        fv.Field("name", fv.STRING),
    ),
    _make(LinkHello, ("peers", "interests", "cursors", "features")),
)
_HEARTBEAT = fv.Table(
    "Heartbeat", (fv.Field("acked", fv.U64), fv.Field("ping", fv.U64), fv.Field("pong", fv.U64)), _make(Heartbeat)
)
_ROUTED = fv.Table(
    "Routed",
    (
        fv.Field("origin", fv.UUID_STRUCT, required=True),
        fv.Field("seq", fv.U64),
        fv.Field("kind", fv.U8),
        fv.Field("channel", fv.STRING),
        fv.Field("watchable", fv.TABLE, WATCHABLE),
        fv.Field("exclude_session", fv.UUID_STRUCT),
        fv.Field("frame", fv.BYTES, required=True),
    ),
    _make(Routed),
)
_INTEREST = fv.Table(
    "Interest", (fv.Field("add", fv.STRINGS), fv.Field("remove", fv.STRINGS)), _make(Interest, ("add", "remove"))
)
_PEERS = fv.Table("Peers", (fv.Field("peers", fv.TABLES, _PEER),), _make(Peers, ("peers",)))
_GOODBYE = fv.Table("Goodbye", (fv.Field("code", fv.U16), fv.Field("reason", fv.STRING)), _make(Goodbye))
_QUERY = fv.Table(
    "Query",
    (
        fv.Field("id", fv.U64),
        fv.Field("kind", fv.U8),
        fv.Field("principal", fv.STRING),
        fv.Field("session", fv.UUID_STRUCT),
        fv.Field("code", fv.U16),
        fv.Field("reason", fv.STRING),
        fv.Field("channel", fv.STRING),
        fv.Field("positions", fv.POSITIONS),
    ),
    _make(Query, ("positions",)),
)
_CHANNEL_COUNT = fv.Table(
    "ChannelCount",
    (fv.Field("channel", fv.STRING, required=True), fv.Field("subscribers", fv.U32)),
    _make(ChannelCount),
)
_ANSWER = fv.Table(
    "Answer",
    (
        fv.Field("id", fv.U64),
        fv.Field("more", fv.BOOL),
        fv.Field("sessions", fv.U32),
        fv.Field("channels", fv.TABLES, _CHANNEL_COUNT),
        fv.Field("closed", fv.UUIDS),
        fv.Field("events", fv.BYTES),
        fv.Field("covered", fv.POSITIONS),
        fv.Field("presence", fv.TABLES, PRESENCE_ENTRY),
    ),
    _make(Answer, ("channels", "closed", "covered", "presence")),
)
_FRAME = fv.Table(
    "Frame",
    (
        fv.Field("body_type", fv.UNION_TYPE),
        fv.Field(
            "body",
            fv.UNION,
            {
                Body.LinkHello: ("LinkHello", _HELLO),
                Body.Heartbeat: ("Heartbeat", _HEARTBEAT),
                Body.Routed: ("Routed", _ROUTED),
                Body.Interest: ("Interest", _INTEREST),
                Body.Peers: ("Peers", _PEERS),
                Body.Goodbye: ("Goodbye", _GOODBYE),
                Body.Query: ("Query", _QUERY),
                Body.Answer: ("Answer", _ANSWER),
            },
            required=True,
        ),
    ),
    lambda values: values["body"],
)


def decode(buf: bytes, origin: Optional[UUID] = None) -> MeshFrame:
    """Verify and decode one mesh Frame; raise :class:`Malformed` if it is not one.

    ``origin``, the node a Routed frame is expected from, saves building
    its UUID again when it matches.
    """
    routed = read_routed(buf, origin)
    if routed is not None:
        return routed
    return fv.read(buf, MESH_IDENTIFIER, _FRAME)


# -- encoding -------------------------------------------------------------------


def _uuid(b: flatbuffers.Builder, value: UUID) -> int:
    n = value.int
    return CreateUuid(b, n >> 64, n & _U64)


def _strings(b: flatbuffers.Builder, values) -> int:
    offsets = [b.CreateString(v) for v in values]
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def _tables(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def _peer(b: flatbuffers.Builder, peer: Peer) -> int:
    address = b.CreateString(peer.address)
    P.Start(b)
    P.AddNode(b, _uuid(b, peer.node))
    P.AddAddress(b, address)
    return P.End(b)


def _finish(b: flatbuffers.Builder, body_type: int, body: int) -> bytes:
    F.Start(b)
    F.AddBodyType(b, body_type)
    F.AddBody(b, body)
    b.Finish(F.End(b), file_identifier=MESH_IDENTIFIER)
    return bytes(b.Output())


def encode_hello(hello: LinkHello) -> bytes:
    b = flatbuffers.Builder(256)
    cluster = b.CreateString(hello.cluster)
    address = b.CreateString(hello.address)
    peers = _tables(b, [_peer(b, p) for p in hello.peers])
    interests = _strings(b, hello.interests)
    cursors = []
    for c in hello.cursors:
        C.Start(b)
        C.AddNode(b, _uuid(b, c.node))
        C.AddIncarnation(b, c.incarnation)
        C.AddSeq(b, c.seq)
        cursors.append(C.End(b))
    cursor_vector = _tables(b, cursors)
    features = _strings(b, hello.features)
    name = b.CreateString(hello.name) if hello.name else 0
    L.Start(b)
    L.AddNode(b, _uuid(b, hello.node))
    L.AddIncarnation(b, hello.incarnation)
    L.AddCluster(b, cluster)
    L.AddVersion(b, hello.version)
    L.AddAddress(b, address)
    L.AddPeers(b, peers)
    L.AddInterests(b, interests)
    L.AddCursors(b, cursor_vector)
    L.AddNonce(b, hello.nonce)
    L.AddFeatures(b, features)
    if name:
        L.AddName(b, name)
    return _finish(b, Body.LinkHello, L.End(b))


def encode_heartbeat(acked: int, ping: int = 0, pong: int = 0) -> bytes:
    b = flatbuffers.Builder(48)
    H.Start(b)
    H.AddAcked(b, acked)
    if ping:
        H.AddPing(b, ping)
    if pong:
        H.AddPong(b, pong)
    return _finish(b, Body.Heartbeat, H.End(b))


def encode_query(query: Query) -> bytes:
    b = flatbuffers.Builder(128)
    principal = b.CreateString(query.principal) if query.principal is not None else 0
    reason = b.CreateString(query.reason) if query.reason else 0
    channel = b.CreateString(query.channel) if query.channel is not None else 0
    positions = positions_vector(b, list(query.positions)) if query.positions else 0
    Q.Start(b)
    Q.AddId(b, query.id)
    Q.AddKind(b, query.kind)
    if principal:
        Q.AddPrincipal(b, principal)
    if query.session is not None:
        Q.AddSession(b, _uuid(b, query.session))
    Q.AddCode(b, query.code)
    if reason:
        Q.AddReason(b, reason)
    if channel:
        Q.AddChannel(b, channel)
    if positions:
        Q.AddPositions(b, positions)
    return _finish(b, Body.Query, Q.End(b))


def _encode_answer(id: int, more: bool, sessions: int, channels, closed, events: bytes = b"",
                   covered=(), presence=()) -> bytes:
    b = flatbuffers.Builder(256 + len(events))
    event_vector = b.CreateByteVector(events) if events else 0
    presence_offsets = presence_vector(b, presence) if presence else 0
    covered_vector = positions_vector(b, list(covered)) if covered else 0
    counts = []
    for channel, subscribers in channels:
        name = b.CreateString(channel)
        CC.Start(b)
        CC.AddChannel(b, name)
        CC.AddSubscribers(b, subscribers)
        counts.append(CC.End(b))
    count_vector = _tables(b, counts)
    b.StartVector(16, len(closed), 8)
    for session in reversed(closed):
        _uuid(b, session)
    closed_vector = b.EndVector()
    A.Start(b)
    A.AddId(b, id)
    A.AddMore(b, more)
    A.AddSessions(b, sessions)
    A.AddChannels(b, count_vector)
    A.AddClosed(b, closed_vector)
    if event_vector:
        A.AddEvents(b, event_vector)
    if covered_vector:
        A.AddCovered(b, covered_vector)
    if presence_offsets:
        A.AddPresence(b, presence_offsets)
    return _finish(b, Body.Answer, A.End(b))


def encode_answers(id: int, budget: int, sessions: int = 0, channels=(), closed=(), events=(),
                   covered=(), presence=()) -> list[bytes]:
    """The Answer frames to query ``id``: ``channels`` ((name, subscribers) pairs), ``closed`` and
    ``events`` (Event frames) split so that each frame stays within ``budget`` bytes (an event larger
    than that goes alone); all but the last have ``more`` set; ``covered`` goes in the last."""
    kinds = (("c", channels, lambda c: len(c[0].encode("utf-8")) + 24), ("s", closed, lambda s: 16),
             ("e", events, lambda e: len(e) + 4),
             ("p", presence, lambda p: 64 + len((p.principal or "").encode()) + len((p.info or "").encode())))
    parts: list[dict] = []
    part: dict = {"c": [], "s": [], "e": [], "p": []}
    used = 0
    for kind, items, size_of in kinds:
        for item in items:
            size = size_of(item)
            if used + size > budget and any(part.values()):
                parts.append(part)
                part, used = {"c": [], "s": [], "e": [], "p": []}, 0
            part[kind].append(item)
            used += size
    if covered and used + 32 * len(covered) > budget and any(part.values()):
        parts.append(part)  # the covered positions go in the last frame: give them room
        part = {"c": [], "s": [], "e": [], "p": []}
    parts.append(part)
    last = len(parts) - 1
    return [
        _encode_answer(id, i < last, sessions, p["c"], p["s"], _batch_payload(p["e"]), covered if i == last else (),
                       p["p"])
        for i, p in enumerate(parts)
    ]


# Routed frames are built for every event that crosses a link, so they are
# laid out directly like codec.encode_event (tests compare both encoders):
#
#   0 root -> 16   4 "MSHM"   8 Frame vtable   16 Frame table (body, body_type)
#   28 Routed vtable (18 bytes)   48 Routed table: soffset, kind, seq,
#   origin, exclude_session, channel/watchable/frame offsets; then the parts.

_FRAME_HEAD = struct.Struct("<I4s4HiIB3x")
_ROUTED_VT = struct.Struct("<9H2x")
_ROUTED_HEAD = struct.Struct("<iB3xQQQQQIII")
_U32 = struct.Struct("<I")
_R = 48
_ROUTED_SIZE = 60


def _routed_heads() -> dict[tuple[bool, bool, bool], bytes]:
    """The frame head and Routed vtable, by which of channel, watchable and exclude_session are present."""
    head = _FRAME_HEAD.pack(16, MESH_IDENTIFIER, 8, 12, 8, 4, 16 - 8, _R - 20, Body.Routed)
    heads = {}
    for channel in (False, True):
        for watchable in (False, True):
            for exclude in (False, True):
                vtable = _ROUTED_VT.pack(18, _ROUTED_SIZE, 16, 8, 4, 48 if channel else 0,
                                         52 if watchable else 0, 32 if exclude else 0, 56)
                heads[channel, watchable, exclude] = head + vtable
    return heads


_ROUTED_HEADS = _routed_heads()


def encode_routed(routed: Routed) -> bytes:
    """A mesh Frame holding ``routed``, equal in meaning to the generated builder's."""
    return routed_frame(routed.origin, routed.seq, routed.kind, routed.frame, routed.channel, routed.watchable,
                        routed.exclude_session)


#: A channel name as a FlatBuffers string, for the channels routed recently.
_channel_part = functools.lru_cache(maxsize=4096)(string_part)


def routed_frame(origin: UUID, seq: int, kind: int, frame: bytes, channel: Optional[str] = None,
                 watchable: Optional[Watchable] = None, exclude_session: Optional[UUID] = None,
                 length_prefix: bool = False) -> bytes:
    """:func:`encode_routed` from the fields themselves, for the routing path.

    With ``length_prefix`` the frame comes with the link's 4-byte length
    prefix (:func:`meshd.mesh.framing.frame`), in the same copy.
    """
    R = _R
    tail = R + _ROUTED_SIZE
    channel_at = watchable_at = 0
    if channel is not None:
        channel_part = _channel_part(channel)
        channel_at, tail = tail, tail + len(channel_part)
    else:
        channel_part = b""
    n = len(frame)
    padding = PADDING[n & 3]
    frame_at, tail = tail, tail + 4 + n + len(padding)
    if watchable is not None:
        watchable_part_, watchable_at = watchable_part(watchable, tail)
        tail += len(watchable_part_)
    else:
        watchable_part_ = b""
    head = _ROUTED_HEADS[channel is not None, watchable is not None, exclude_session is not None]
    o = origin.int
    x = exclude_session.int if exclude_session is not None else 0
    table = _ROUTED_HEAD.pack(
        R - 28, kind, seq, o >> 64, o & _U64, x >> 64, x & _U64,
        channel_at - (R + 48) if channel is not None else 0,
        watchable_at - (R + 52) if watchable is not None else 0,
        frame_at - (R + 56),
    )
    parts = (head, table, channel_part, _U32.pack(n), frame, padding, watchable_part_)
    if length_prefix:
        return b"".join((LENGTH.pack(tail), *parts))
    return b"".join(parts)


# Reading them back: a frame that starts with one of the eight head-and-vtable
# prefixes encode_routed writes (channel, watchable and exclude_session each
# present or not) has its fixed fields at fixed places; its strings, vectors
# and tables are still followed and bounds-checked like any other.  Anything
# else goes to the generic verifier, which accepts the same frames.


_ROUTED_LAYOUTS = {head: present for present, head in _ROUTED_HEADS.items()}


def read_routed(buf: bytes, origin: Optional[UUID] = None) -> Optional[Routed]:
    """Read a Routed frame laid out as :func:`encode_routed` lays it out, or return None."""
    if len(buf) < _R + _ROUTED_SIZE:
        return None
    layout = _ROUTED_LAYOUTS.get(buf[:_R])
    if layout is None:
        return None
    has_channel, has_watchable, has_exclude = layout
    soffset, kind, seq, o_hi, o_lo, x_hi, x_lo, _c, _w, _f = _ROUTED_HEAD.unpack_from(buf, _R)
    if soffset != _R - 28:
        return None
    o = (o_hi << 64) | o_lo
    # Positional: a class called with keywords builds a dict for them.
    routed = Routed(origin if origin is not None and origin.int == o else UUID(int=o), _frame_bytes(buf), seq, kind)
    if has_channel:
        routed.channel = fv.string(buf, _R + 48, "Routed.channel")
    if has_watchable:
        routed.watchable = fv.read_table(buf, fv.follow(buf, _R + 52, "Routed.watchable"), WATCHABLE, 1)
    if has_exclude:
        routed.exclude_session = UUID(int=(x_hi << 64) | x_lo)
    return routed


#: The client frame of a sequence marker: an empty event that no session receives.
_MARKER_EVENT = encode_event(EventType.NodeEvent)


def marker_frame(origin: UUID, seq: int) -> bytes:
    """A sequence marker, with the link's length prefix: a Routed frame that reaches no session.

    It is a ``ChannelMessage`` without a channel, which every node (this
    version and earlier ones) takes as the origin's sequence number ``seq``
    and delivers to nobody.  A node sends markers so that the numbers a
    peer receives from it never jump by more than ``max_sequence_gap``
    (see :meth:`meshd.mesh.service.Mesh.route`).
    """
    return routed_frame(origin, seq, RouteKind.ChannelMessage, _MARKER_EVENT, length_prefix=True)


def start_frame(origin: UUID, seq: int, channel: str) -> bytes:
    """A Start marker, with the link's length prefix: from ``seq`` on, the peer gets every event of
    ``channel`` from ``origin`` (meshd.history).  It reaches no session; only peers whose LinkHello
    lists :data:`HISTORY_FEATURE` are sent one."""
    return routed_frame(origin, seq, RouteKind.Start, _MARKER_EVENT, channel, length_prefix=True)


def _frame_bytes(buf: bytes) -> bytes:
    start, length = fv.vector(buf, _R + 56, "Routed.frame", 1)
    return buf[start : start + length]


def encode_interest(add=(), remove=()) -> bytes:
    b = flatbuffers.Builder(64)
    a, r = _strings(b, add), _strings(b, remove)
    I.Start(b)
    I.AddAdd(b, a)
    I.AddRemove(b, r)
    return _finish(b, Body.Interest, I.End(b))


def encode_peers(peers) -> bytes:
    b = flatbuffers.Builder(128)
    vector = _tables(b, [_peer(b, p) for p in peers])
    PS.Start(b)
    PS.AddPeers(b, vector)
    return _finish(b, Body.Peers, PS.End(b))


def encode_goodbye(code: int, reason: str) -> bytes:
    b = flatbuffers.Builder(64)
    text = b.CreateString(reason)
    G.Start(b)
    G.AddCode(b, code)
    G.AddReason(b, text)
    return _finish(b, Body.Goodbye, G.End(b))
