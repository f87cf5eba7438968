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
from typing import Optional
from uuid import UUID

import flatbuffers

from meshd.fb.client import Frame as F
from meshd.fb.client import Watchable as W
from meshd.fb.client.ErrorCode import ErrorCode
from meshd.fb.client.EventType import EventType
from meshd.fb.client.Opcode import Opcode
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
    "opcode_name",
    "event_type_name",
    "error_code_name",
]

FILE_IDENTIFIER = b"MSH1"
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


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded frame.  Absent fields are ``None`` (or 0 / False for scalars)."""

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
    b.Finish(F.End(b), file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


# -- verified decoding --------------------------------------------------------

_u16 = struct.Struct("<H").unpack_from
_u16x2 = struct.Struct("<HH").unpack_from
_u32 = struct.Struct("<I").unpack_from
_i32 = struct.Struct("<i").unpack_from
_u64 = struct.Struct("<Q").unpack_from
_uuid_parts = struct.Struct("<QQ").unpack_from

# Field kinds and their inline sizes.
_SCALAR, _STRING, _BYTES, _TABLE, _UUID = range(5)

# Frame's fields in vtable order: (name, kind, inline size, reader for scalars).
_FRAME_FIELDS = (
    ("opcode", _SCALAR, 2, _u16),
    ("request_id", _SCALAR, 8, _u64),
    ("channel", _STRING, 4, None),
    ("watchable", _TABLE, 4, None),
    ("payload", _BYTES, 4, None),
    ("event_type", _SCALAR, 2, _u16),
    ("session", _UUID, 16, None),
    ("node", _UUID, 16, None),
    ("error_code", _SCALAR, 2, _u16),
    ("message", _STRING, 4, None),
    ("token", _STRING, 4, None),
    ("principal", _STRING, 4, None),
    ("version", _SCALAR, 2, _u16),
    ("exclude_self", _SCALAR, 1, None),
    ("max_message_size", _SCALAR, 4, _u32),
)
_WATCHABLE_FIELDS = (("kind", _STRING, 4, None), ("id", _STRING, 4, None))


def _malformed(why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.Malformed, f"malformed frame: {why}")


def _fields(buf: bytes, table: int, layout: tuple, name: str) -> dict[str, int]:
    """Verify a table at ``table``; return the absolute position of each present field."""
    n = len(buf)
    if table < 0 or table + 4 > n:
        raise _malformed(f"{name} table out of bounds")
    vtable = table - _i32(buf, table)[0]
    if vtable < 0 or vtable + 4 > n:
        raise _malformed(f"{name} vtable out of bounds")
    vt_size, t_size = _u16x2(buf, vtable)
    if vt_size < 4 or vt_size % 2 or vtable + vt_size > n or table + t_size > n:
        raise _malformed(f"{name} vtable or table size out of bounds")
    present = {}
    for slot, (field, _kind, size, _reader) in enumerate(layout):
        entry = 4 + 2 * slot
        if entry >= vt_size:
            break
        offset = _u16(buf, vtable + entry)[0]
        if offset:
            if offset < 4 or offset + size > t_size:
                raise _malformed(f"field {name}.{field} out of bounds")
            present[field] = table + offset
    return present


def _vector(buf: bytes, at: int, what: str, extra: int = 0) -> tuple[int, int]:
    """Follow the offset at ``at`` to a length-prefixed vector; return (start, length)."""
    target = at + _u32(buf, at)[0]
    if target + 4 > len(buf):
        raise _malformed(f"{what} out of bounds")
    length = _u32(buf, target)[0]
    start = target + 4
    if start + length + extra > len(buf):
        raise _malformed(f"{what} length out of bounds")
    return start, length


def _string(buf: bytes, at: int, what: str) -> str:
    start, length = _vector(buf, at, what, extra=1)  # strings end with a NUL byte
    try:
        return buf[start : start + length].decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(f"{what} is not valid UTF-8") from None


def decode(buf: bytes) -> Message:
    """Verify and decode one Frame buffer; raise :class:`ProtocolError` if it is not one."""
    if len(buf) < 12:
        raise _malformed(f"{len(buf)} bytes is too short for a frame")
    if buf[4:8] != FILE_IDENTIFIER:
        raise _malformed(f"file identifier is {bytes(buf[4:8])!r}, expected {FILE_IDENTIFIER!r}")
    values: dict = {}
    for field, at in _fields(buf, _u32(buf, 0)[0], _FRAME_FIELDS, "Frame").items():
        kind = _KIND[field]
        if kind is _SCALAR:
            reader = _READER[field]
            values[field] = reader(buf, at)[0] if reader else buf[at] != 0
        elif kind is _STRING:
            values[field] = _string(buf, at, field)
        elif kind is _BYTES:
            start, length = _vector(buf, at, field)
            values[field] = bytes(buf[start : start + length])
        elif kind is _UUID:
            hi, lo = _uuid_parts(buf, at)
            values[field] = UUID(int=(hi << 64) | lo)
        else:
            values[field] = _watchable(buf, at + _u32(buf, at)[0])
    return Message(**values)


def _watchable(buf: bytes, table: int) -> Watchable:
    present = _fields(buf, table, _WATCHABLE_FIELDS, "Watchable")
    if "kind" not in present or "id" not in present:
        raise _malformed("Watchable needs both kind and id")
    return Watchable(
        _string(buf, present["kind"], "watchable.kind"),
        _string(buf, present["id"], "watchable.id"),
    )


_KIND = {name: kind for name, kind, _size, _reader in _FRAME_FIELDS}
_READER = {name: reader for name, _kind, _size, reader in _FRAME_FIELDS}
