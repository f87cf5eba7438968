# -*- test-case-name: tests.test_codec -*-
"""Encode and decode client protocol frames (``schemas/client.fbs``).

The Python FlatBuffers runtime trusts its input: reading a truncated or
hostile buffer raises arbitrary exceptions or returns garbage.  :func:`decode`
therefore verifies the whole buffer first (identifier, every offset, every
length, UTF-8 of every string, required fields) and turns anything wrong into
a :class:`ProtocolError`.  Encoding goes through the generated builder code in
:mod:`meshd.fb.client`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Iterable, NamedTuple, Optional
from uuid import UUID

import flatbuffers

from meshd import flatverify as fv
from meshd.flatverify import Position
from meshd.fb.client import Frame as F
from meshd.fb.client import PresenceEntry as PE
from meshd.fb.client import Watchable as W
from meshd.fb.client.ErrorCode import ErrorCode
from meshd.fb.client.EventType import EventType
from meshd.fb.client.Opcode import Opcode
from meshd.fb.client.Position import CreatePosition
from meshd.fb.client.Uuid import CreateUuid

__all__ = [
    "ErrorCode",
    "EventType",
    "FILE_IDENTIFIER",
    "Message",
    "Opcode",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "Watchable",
    "decode",
    "encode",
    "encode_batch",
    "encode_event",
    "unpack_batch",
    "opcode_name",
    "event_type_name",
    "error_code_name",
]

FILE_IDENTIFIER = b"MSH1"
_U32 = struct.Struct("<I")
PROTOCOL_VERSION = 1
_U64 = (1 << 64) - 1


class ProtocolError(Exception):
    """A frame that the node refuses, with the code and request id to answer with."""

    def __init__(self, code: int, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"ProtocolError({error_code_name(self.code)}, {self.message!r})"


@dataclass(frozen=True, slots=True)
class Watchable:
    """A watchable resource: a ``kind`` ("document") and an ``id`` ("42")."""

    kind: str
    id: str


class PresenceEntry(NamedTuple):
    """One session subscribed to a presence channel (``schemas/client.fbs``)."""

    session: Optional[UUID] = None
    node: Optional[UUID] = None
    principal: Optional[str] = None
    info: Optional[str] = None


class Message(NamedTuple):
    """One decoded frame.  Absent fields are ``None`` (or 0 / False for scalars).

    A named tuple rather than a frozen dataclass: every frame a client sends
    becomes one, and a tuple is built in a fifth of the time.
    """

    opcode: int = 0
    request_id: int = 0
    channel: Optional[str] = None
    watchable: Optional[Watchable] = None
    payload: Optional[bytes] = None
    event_type: int = 0
    session: Optional[UUID] = None
    node: Optional[UUID] = None
    error_code: int = 0
    message: Optional[str] = None
    token: Optional[str] = None
    principal: Optional[str] = None
    version: int = 0
    exclude_self: bool = False
    max_message_size: int = 0
    batch: bool = False
    epoch: int = 0
    seq: int = 0
    positions: "Optional[list[Position]]" = None
    recover: bool = False
    recovered: bool = False
    limit: int = 0
    info: Optional[str] = None
    presence: "Optional[list[PresenceEntry]]" = None
    sessions: int = 0
    principals: int = 0


def _names(enum: type) -> dict[int, str]:
    return {v: k.rstrip("_") for k, v in vars(enum).items() if not k.startswith("_")}


_OPCODE_NAMES = _names(Opcode)
_EVENT_NAMES = _names(EventType)
_ERROR_NAMES = _names(ErrorCode)


def opcode_name(value: int) -> str:
    if value >= Opcode.UserFirst:
        return f"User({value})"
    return _OPCODE_NAMES.get(value, str(value))


def event_type_name(value: int) -> str:
    if value >= EventType.UserFirst:
        return f"User({value})"
    return _EVENT_NAMES.get(value, str(value))


def error_code_name(value: int) -> str:
    return _ERROR_NAMES.get(value, str(value))


# -- encoding ---------------------------------------------------------------


def _uuid(builder: flatbuffers.Builder, value: UUID) -> int:
    n = value.int
    return CreateUuid(builder, n >> 64, n & _U64)


def encode(
    opcode: int,
    *,
    request_id: int = 0,
    channel: Optional[str] = None,
    watchable: Optional[Watchable] = None,
    payload: Optional[bytes] = None,
    event_type: int = 0,
    session: Optional[UUID] = None,
    node: Optional[UUID] = None,
    error_code: int = 0,
    message: Optional[str] = None,
    token: Optional[str] = None,
    principal: Optional[str] = None,
    version: int = 0,
    exclude_self: bool = False,
    max_message_size: int = 0,
    batch: bool = False,
    epoch: int = 0,
    seq: int = 0,
    positions: "Optional[Iterable[Position]]" = None,
    recover: bool = False,
    recovered: bool = False,
    limit: int = 0,
    info: Optional[str] = None,
    presence: "Optional[Iterable[PresenceEntry]]" = None,
    sessions: int = 0,
    principals: int = 0,
) -> bytes:
    """Build one finished Frame buffer; fields left at their default are omitted."""
    size = 64 + (len(payload) if payload else 0) + (len(channel) * 4 if channel else 0)
    b = flatbuffers.Builder(size)
    # Offsets (strings, vectors, tables) must be built before the Frame starts.
    ch = b.CreateString(channel) if channel is not None else 0
    pl = b.CreateByteVector(payload) if payload is not None else 0
    msg = b.CreateString(message) if message is not None else 0
    tok = b.CreateString(token) if token is not None else 0
    pri = b.CreateString(principal) if principal is not None else 0
    wa = 0
    if watchable is not None:
        kind, ident = b.CreateString(watchable.kind), b.CreateString(watchable.id)
        W.Start(b)
        W.AddKind(b, kind)
        W.AddId(b, ident)
        wa = W.End(b)
    nf = b.CreateString(info) if info is not None else 0
    pr = presence_vector(b, presence) if presence is not None else 0
    po = positions_vector(b, list(positions)) if positions is not None else 0
    F.Start(b)
    F.AddOpcode(b, opcode)
    F.AddRequestId(b, request_id)
    if ch:
        F.AddChannel(b, ch)
    if wa:
        F.AddWatchable(b, wa)
    if pl:
        F.AddPayload(b, pl)
    F.AddEventType(b, event_type)
    if session is not None:
        F.AddSession(b, _uuid(b, session))
    if node is not None:
        F.AddNode(b, _uuid(b, node))
    F.AddErrorCode(b, error_code)
    if msg:
        F.AddMessage(b, msg)
    if tok:
        F.AddToken(b, tok)
    if pri:
        F.AddPrincipal(b, pri)
    F.AddVersion(b, version)
    F.AddExcludeSelf(b, exclude_self)
    F.AddMaxMessageSize(b, max_message_size)
    F.AddBatch(b, batch)
    F.AddEpoch(b, epoch)
    F.AddSeq(b, seq)
    if positions is not None:
        F.AddPositions(b, po)
    F.AddRecover(b, recover)
    F.AddRecovered(b, recovered)
    F.AddLimit(b, limit)
    if nf:
        F.AddInfo(b, nf)
    if presence is not None:
        F.AddPresence(b, pr)
    F.AddSessions(b, sessions)
    F.AddPrincipals(b, principals)
    b.Finish(F.End(b), file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def positions_vector(b: flatbuffers.Builder, positions: "list[Position]") -> int:
    """A vector of Position structs (for Frame.positions and the mesh's Query and Answer)."""
    b.StartVector(32, len(positions), 8)
    for p in reversed(positions):
        n = p.node.int
        CreatePosition(b, n >> 64, n & _U64, p.epoch, p.seq)
    return b.EndVector()


def presence_vector(b: flatbuffers.Builder, entries: "Iterable[PresenceEntry]") -> int:
    """A vector of PresenceEntry tables (for Frame.presence and the mesh's Answer.presence)."""
    offsets = []
    for e in entries:
        principal = b.CreateString(e.principal) if e.principal is not None else 0
        info = b.CreateString(e.info) if e.info is not None else 0
        PE.Start(b)
        if e.session is not None:
            PE.AddSession(b, _uuid(b, e.session))
        if e.node is not None:
            PE.AddNode(b, _uuid(b, e.node))
        if principal:
            PE.AddPrincipal(b, principal)
        if info:
            PE.AddInfo(b, info)
        offsets.append(PE.End(b))
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


# -- verified decoding --------------------------------------------------------


def _watchable(values: dict) -> Watchable:
    return Watchable(values["kind"], values["id"])


WATCHABLE = fv.Table(
    "Watchable",
    (fv.Field("kind", fv.STRING, required=True), fv.Field("id", fv.STRING, required=True)),
    _watchable,
)

PRESENCE_ENTRY = fv.Table(
    "PresenceEntry",
    (fv.Field("session", fv.UUID_STRUCT), fv.Field("node", fv.UUID_STRUCT), fv.Field("principal", fv.STRING),
     fv.Field("info", fv.STRING)),
    lambda values: PresenceEntry(**values),
)

# Frame's fields in vtable order (schemas/client.fbs).
FRAME = fv.Table(
    "Frame",
    (
        fv.Field("opcode", fv.U16),
        fv.Field("request_id", fv.U64),
        fv.Field("channel", fv.STRING),
        fv.Field("watchable", fv.TABLE, WATCHABLE),
        fv.Field("payload", fv.BYTES),
        fv.Field("event_type", fv.U16),
        fv.Field("session", fv.UUID_STRUCT),
        fv.Field("node", fv.UUID_STRUCT),
        fv.Field("error_code", fv.U16),
        fv.Field("message", fv.STRING),
        fv.Field("token", fv.STRING),
        fv.Field("principal", fv.STRING),
        fv.Field("version", fv.U16),
        fv.Field("exclude_self", fv.BOOL),
        fv.Field("max_message_size", fv.U32),
        fv.Field("batch", fv.BOOL),
        fv.Field("epoch", fv.U64),
        fv.Field("seq", fv.U64),
        fv.Field("positions", fv.POSITIONS),
        fv.Field("recover", fv.BOOL),
        fv.Field("recovered", fv.BOOL),
        fv.Field("limit", fv.U32),
        fv.Field("info", fv.STRING),
        fv.Field("presence", fv.TABLES, PRESENCE_ENTRY),
        fv.Field("sessions", fv.U32),
        fv.Field("principals", fv.U32),
    ),
    partial(tuple.__new__, Message),
    positional=True,
)
# The reader passes the fields in schema order, absent ones as zero / None:
# Message must list the same fields, in that order, with those defaults.
if [(name, Message._field_defaults[name]) for name in Message._fields] != [
    (f.name, fv.ABSENT.get(f.kind)) for f in FRAME.fields
]:
    raise RuntimeError("meshd.codec: Message and the Frame schema disagree")


def batch_payload(frames: "list[bytes]") -> bytes:
    """``frames`` (complete Event frames) as a Batch frame's payload: each a 4-byte length, then it."""
    return b"".join(_U32.pack(len(f)) + f for f in frames)


def encode_batch(frames: "list[bytes]") -> bytes:
    """A Batch frame carrying ``frames`` (complete Event frames), in order."""
    return encode(Opcode.Batch, payload=batch_payload(frames))


def unpack_batch(message: Message) -> "list[Message]":
    """The Event frames inside a decoded Batch frame; raise ProtocolError if they do not parse."""
    return [decode(frame) for frame in batch_entries(message.payload or b"")]


def batch_entries(data: bytes) -> "list[bytes]":
    """The entries of a Batch-style payload (each a 4-byte little-endian length, then that many bytes);
    raise ProtocolError if one does not fit."""
    out, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise ProtocolError(ErrorCode.Malformed, "malformed frame: truncated batch entry")
        (length,) = _U32.unpack_from(data, at)
        at += 4
        if at + length > len(data):
            raise ProtocolError(ErrorCode.Malformed, "malformed frame: batch entry out of bounds")
        out.append(data[at : at + length])
        at += length
    return out


def decode(buf: bytes) -> Message:
    """Verify and decode one Frame buffer; raise :class:`ProtocolError` if it is not one."""
    try:
        return fv.read(buf, FILE_IDENTIFIER, FRAME)
    except fv.Malformed as e:
        raise ProtocolError(ErrorCode.Malformed, f"malformed frame: {e}") from None


# -- the hot path: Event frames laid out directly -----------------------------------
#
# The generic builder above costs about 75 us per frame in Python; an event is
# encoded for every publish.  encode_event writes the same Frame table with
# struct, in one fixed layout (tests check it against the generated reader,
# flatc's C++ reader, and the 8-byte alignment of the Uuid structs):
#
#   0   root offset -> T          4  "MSH1"          8  vtable (20 bytes)
#   T   soffset to vtable, opcode u16, event_type u16, session (16, 8-aligned),
#       node (16), channel offset, payload offset, watchable offset
#   then the channel string, the payload vector and the Watchable table.

_VT = struct.Struct("<10H")
_TABLE_HEAD = struct.Struct("<iHH")
_QQ = struct.Struct("<QQ")
_WATCHABLE_VT = struct.Struct("<4H")
_T = 32  # the table starts here: 8-aligned, after the 20-byte vtable and padding
_TABLE_SIZE = 52
# A history channel's event: the vtable reaches fields 16 and 17 (epoch, seq), 8-aligned at the table's end.
_VT_POSITIONED = struct.Struct("<20H")
_POSITION = struct.Struct("<4xQQ")  # padding to 8, then epoch and seq
_T_POSITIONED = 48
_TABLE_SIZE_POSITIONED = 72


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def string_part(text: str) -> bytes:
    """A FlatBuffers string as it sits in a buffer: length, UTF-8, NUL, padding to 4."""
    raw = text.encode("utf-8")
    return _U32.pack(len(raw)) + raw + b"\0" * (1 + _pad4(len(raw) + 1))


def vector_part(data: bytes) -> bytes:
    """A FlatBuffers [ubyte] vector: length, bytes, padding to 4."""
    return _U32.pack(len(data)) + data + b"\0" * _pad4(len(data))


def watchable_part(watchable: Watchable, at: int) -> tuple[bytes, int]:
    """A Watchable table (with its vtable) placed at buffer position ``at``.

    Returns the bytes and the position of the table itself.
    """
    table = at + 8  # after its 8-byte vtable: soffset, kind offset, id offset
    kind = string_part(watchable.kind)
    kind_at = table + 12
    id_at = kind_at + len(kind)
    head = _WATCHABLE_VT.pack(8, 12, 4, 8) + struct.pack("<iII", table - at, kind_at - (table + 4), id_at - (table + 8))
    return head + kind + string_part(watchable.id), table


def encode_event(
    event_type: int,
    *,
    channel: Optional[str] = None,
    watchable: Optional[Watchable] = None,
    payload: Optional[bytes] = None,
    session: Optional[UUID] = None,
    node: Optional[UUID] = None,
    epoch: int = 0,
    seq: int = 0,
) -> bytes:
    """An Event frame, equal in meaning to ``encode(Opcode.Event, ...)``, about 15x faster.

    Channel events differ from one publish to the next only in their
    payload, which is laid out last: everything before it is kept per
    (type, channel, session, node) and only the payload vector is added.
    """
    if seq:  # a history channel's event: its position differs every time, nothing to keep
        return _encode_event(event_type, channel, watchable, payload, session, node, epoch, seq)
    if watchable is None and payload is not None:
        # UUIDs hash in Python; their ints in C.
        prefix = _event_prefix(event_type, channel, session.int if session is not None else None,
                               node.int if node is not None else None)
        n = len(payload)
        return b"".join((prefix, _U32.pack(n), payload, PADDING[n & 3]))
    return _encode_event(event_type, channel, watchable, payload, session, node)


@lru_cache(maxsize=4096)
def _event_prefix(event_type: int, channel: Optional[str], session: Optional[int], node: Optional[int]) -> bytes:
    """An Event frame's bytes before its payload's length, for the (type, channel, session, node) in use."""
    as_uuid = lambda n: UUID(int=n) if n is not None else None  # noqa: E731
    return _encode_event(event_type, channel, None, b"", as_uuid(session), as_uuid(node))[:-4]


#: The zero bytes that pad a vector of n bytes to 4: PADDING[n & 3].
PADDING = (b"", b"\0\0\0", b"\0\0", b"\0")


def _encode_event(event_type: int, channel: Optional[str], watchable: Optional[Watchable],
                  payload: Optional[bytes], session: Optional[UUID], node: Optional[UUID],
                  epoch: int = 0, seq: int = 0) -> bytes:
    positioned = bool(seq)
    T, size = (_T_POSITIONED, _TABLE_SIZE_POSITIONED) if positioned else (_T, _TABLE_SIZE)
    parts = []
    tail = T + size
    channel_at = payload_at = watchable_at = 0
    if channel is not None:
        part = string_part(channel)
        channel_at, tail = tail, tail + len(part)
        parts.append(part)
    if payload is not None:
        part = vector_part(payload)
        payload_at, tail = tail, tail + len(part)
        parts.append(part)
    if watchable is not None:
        part, watchable_at = watchable_part(watchable, tail)
        parts.append(part)
    # vtable: size, table size, then the slot offsets of fields 0..7 (and for a history channel's
    # event, 8..15 absent, then epoch and seq)
    slots = (
        4,  # opcode
        0,  # request_id: absent
        44 if channel is not None else 0,
        48 if watchable is not None else 0,
        40 if payload is not None else 0,
        6,  # event_type
        8 if session is not None else 0,
        24 if node is not None else 0,
    )
    if positioned:
        vtable = _VT_POSITIONED.pack(40, size, *slots, *(0,) * 8, 56, 64)
    else:
        vtable = _VT.pack(20, size, *slots)
    s = session.int if session is not None else 0
    n = node.int if node is not None else 0
    table = b"".join((
        _TABLE_HEAD.pack(T - 8, Opcode.Event, event_type),
        _QQ.pack(s >> 64, s & _U64),
        _QQ.pack(n >> 64, n & _U64),
        _U32.pack(payload_at - (T + 40) if payload is not None else 0),
        _U32.pack(channel_at - (T + 44) if channel is not None else 0),
        _U32.pack(watchable_at - (T + 48) if watchable is not None else 0),
        _POSITION.pack(epoch, seq) if positioned else b"",
    ))
    head = _U32.pack(T) + FILE_IDENTIFIER + vtable + b"\0" * (T - 8 - len(vtable))
    return b"".join((head, table, *parts))
