# -*- test-case-name: tests.test_codec -*-
"""Verified reading of FlatBuffers buffers, described by small table schemas.

The Python FlatBuffers runtime does not verify what it reads: a hostile or
truncated buffer makes it raise arbitrary exceptions or return garbage.  This
module checks every offset, length and string of a buffer against a
:class:`Table` description and returns plain Python values, raising
:class:`Malformed` (with a reason) for anything out of bounds.  Depth and
element counts are bounded by the buffer size, which callers bound.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable
from uuid import UUID

_u8 = struct.Struct("<B").unpack_from
_u16 = struct.Struct("<H").unpack_from
_u16x2 = struct.Struct("<HH").unpack_from
_u32 = struct.Struct("<I").unpack_from
_i32 = struct.Struct("<i").unpack_from
_u64 = struct.Struct("<Q").unpack_from
_uuid_parts = struct.Struct("<QQ").unpack_from


class Malformed(ValueError):
    """The buffer is not a valid instance of the expected schema."""


# Field kinds.
U8, BOOL, U16, U32, U64, STRING, BYTES, UUID_STRUCT, TABLE, STRINGS, TABLES, UNION_TYPE, UNION = range(13)

_INLINE_SIZE = {U8: 1, BOOL: 1, U16: 2, U32: 4, U64: 8, UUID_STRUCT: 16, UNION_TYPE: 1}
_SCALARS = {U8: _u8, U16: _u16, U32: _u32, U64: _u64}


@dataclass(frozen=True)
class Field:
    name: str
    kind: int
    #: TABLE / TABLES: the table; UNION: {type value: (member name, table)}.
    of: Any = None
    required: bool = False


@dataclass(frozen=True)
class Table:
    name: str
    fields: tuple[Field, ...]
    #: Turns the dict of present fields into the caller's value.
    make: Callable[[dict], Any] = dict

    def __post_init__(self) -> None:
        # What read_table needs per field, worked out once:
        # (vtable entry, name, kind, inline size, scalar reader, of, required, description)
        plan = tuple(
            (4 + 2 * slot, f.name, f.kind, _INLINE_SIZE.get(f.kind, 4), _SCALARS.get(f.kind), f.of,
             f.required, f"{self.name}.{f.name}")
            for slot, f in enumerate(self.fields)
        )
        object.__setattr__(self, "plan", plan)
        # Fields a short vtable leaves out are absent: only the required
        # among them need a look.
        object.__setattr__(self, "required", tuple((entry, what) for entry, _n, _k, _s, _r, _o, req, what in plan if req))


def root(buf: bytes, identifier: bytes) -> int:
    """Check size and file identifier; return the position of the root table."""
    if len(buf) < 12:
        raise Malformed(f"{len(buf)} bytes is too short for a frame")
    if buf[4:8] != identifier:
        raise Malformed(f"file identifier is {bytes(buf[4:8])!r}, expected {identifier!r}")
    return _u32(buf, 0)[0]


def read(buf: bytes, identifier: bytes, table: Table) -> Any:
    """Verify and read a whole buffer whose root is ``table``."""
    return read_table(buf, root(buf, identifier), table)


def read_table(buf: bytes, pos: int, table: Table, depth: int = 0) -> Any:
    if depth > 8:
        raise Malformed("tables nested too deeply")
    n = len(buf)
    if pos < 0 or pos + 4 > n:
        raise Malformed(f"{table.name} table out of bounds")
    vtable = pos - _i32(buf, pos)[0]
    if vtable < 0 or vtable + 4 > n:
        raise Malformed(f"{table.name} vtable out of bounds")
    vt_size, t_size = _u16x2(buf, vtable)
    if vt_size < 4 or vt_size % 2 or vtable + vt_size > n or pos + t_size > n:
        raise Malformed(f"{table.name} vtable or table size out of bounds")
    values: dict[str, Any] = {}
    union_type = 0
    plan = table.plan
    present = (vt_size - 4) >> 1
    if present < len(plan):
        for entry, what in table.required:
            if entry >= vt_size:
                raise Malformed(f"{what} is required")
        plan = plan[:present]
    for entry, name, kind, size, scalar, of, required, what in plan:
        offset = _u16(buf, vtable + entry)[0]
        if not offset:
            if required:
                raise Malformed(f"{what} is required")
            continue
        if offset < 4 or offset + size > t_size:
            raise Malformed(f"field {what} out of bounds")
        at = pos + offset
        if scalar is not None:
            values[name] = scalar(buf, at)[0]
        elif kind == STRING:
            values[name] = string(buf, at, what)
        elif kind == BYTES:
            start, length = vector(buf, at, what, 1)
            values[name] = bytes(buf[start : start + length])
        elif kind == UUID_STRUCT:
            hi, lo = _uuid_parts(buf, at)
            values[name] = UUID(int=(hi << 64) | lo)
        elif kind == BOOL:
            values[name] = buf[at] != 0
        elif kind == TABLE:
            values[name] = read_table(buf, follow(buf, at, what), of, depth + 1)
        elif kind == STRINGS:
            start, length = vector(buf, at, what, 4)
            values[name] = [string(buf, start + 4 * i, what) for i in range(length)]
        elif kind == TABLES:
            start, length = vector(buf, at, what, 4)
            values[name] = [read_table(buf, follow(buf, start + 4 * i, what), of, depth + 1) for i in range(length)]
        elif kind == UNION_TYPE:
            union_type = buf[at]
        elif kind == UNION:
            member = of.get(union_type)
            if member is None:
                raise Malformed(f"{what}: unknown union member {union_type}")
            values[name] = read_table(buf, follow(buf, at, what), member[1], depth + 1)
    return table.make(values)


def follow(buf: bytes, at: int, what: str) -> int:
    """Follow the unsigned offset stored at ``at``."""
    target = at + _u32(buf, at)[0]
    if target >= len(buf):
        raise Malformed(f"{what} out of bounds")
    return target


def vector(buf: bytes, at: int, what: str, element_size: int, extra: int = 0) -> tuple[int, int]:
    """Follow the offset at ``at`` to a length-prefixed vector; return (start, length)."""
    target = follow(buf, at, what)
    if target + 4 > len(buf):
        raise Malformed(f"{what} out of bounds")
    length = _u32(buf, target)[0]
    start = target + 4
    if start + length * element_size + extra > len(buf):
        raise Malformed(f"{what} length out of bounds")
    return start, length


def string(buf: bytes, at: int, what: str) -> str:
    start, length = vector(buf, at, what, 1, extra=1)  # strings end with a NUL byte
    if buf[start + length] != 0:
        raise Malformed(f"{what} is not NUL-terminated")
    try:
        return buf[start : start + length].decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed(f"{what} is not valid UTF-8") from None
