"""A reference reader for meshd.flatverify tables: the plain loop over fields.

meshd.flatverify generates a reader per table for speed; this is the same
logic written as one loop, kept as an oracle: the tests check that both give
the same value, or the same Malformed message, for any buffer.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from meshd.flatverify import (
    BOOL, BYTES, POSITIONS, STRING, STRINGS, TABLE, TABLES, U8, U16, U32, U64, UNION, UNION_TYPE, UUID_STRUCT, UUIDS,
    ABSENT, Malformed, Position, Table, _i32, _position, _u8, _u16, _u16x2, _u32, _u64, _uuid_parts, follow, root,
    string, vector,
)

_INLINE_SIZE = {U8: 1, BOOL: 1, U16: 2, U32: 4, U64: 8, UUID_STRUCT: 16, UNION_TYPE: 1}
_SCALARS = {U8: _u8, U16: _u16, U32: _u32, U64: _u64}


def read(buf: bytes, identifier: bytes, table: Table) -> Any:
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
    for slot, field in enumerate(table.fields):
        entry, name, kind, of = 4 + 2 * slot, field.name, field.kind, field.of
        what = f"{table.name}.{name}"
        offset = _u16(buf, vtable + entry)[0] if entry < vt_size else 0
        if not offset:
            if field.required:
                raise Malformed(f"{what} is required")
            continue
        if offset < 4 or offset + _INLINE_SIZE.get(kind, 4) > t_size:
            raise Malformed(f"field {what} out of bounds")
        at = pos + offset
        if kind in _SCALARS:
            values[name] = _SCALARS[kind](buf, at)[0]
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
        elif kind == UUIDS:
            start, length = vector(buf, at, what, 16)
            values[name] = [UUID(int=(hi << 64) | lo) for hi, lo in (_uuid_parts(buf, start + 16 * i)
                                                                     for i in range(length))]
        elif kind == POSITIONS:
            start, length = vector(buf, at, what, 32)
            values[name] = [Position(UUID(int=(hi << 64) | lo), epoch, seq)
                            for hi, lo, epoch, seq in (_position(buf, start + 32 * i) for i in range(length))]
        elif kind == UNION_TYPE:
            union_type = buf[at]
        elif kind == UNION:
            member = of.get(union_type)
            if member is None:
                raise Malformed(f"{what}: unknown union member {union_type}")
            values[name] = read_table(buf, follow(buf, at, what), member[1], depth + 1)
    if table.positional:
        return table.make(tuple(values.get(f.name, ABSENT.get(f.kind)) for f in table.fields))
    return table.make(values)
