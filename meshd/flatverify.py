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
from typing import Any, Callable, NamedTuple
from uuid import UUID

_u8 = struct.Struct("<B").unpack_from
_u16 = struct.Struct("<H").unpack_from
_u16x2 = struct.Struct("<HH").unpack_from
_u32 = struct.Struct("<I").unpack_from
_i32 = struct.Struct("<i").unpack_from
_u64 = struct.Struct("<Q").unpack_from
_uuid_parts = struct.Struct("<QQ").unpack_from
_position = struct.Struct("<QQQQ").unpack_from


class Position(NamedTuple):
    """A ``Position`` struct (``schemas/client.fbs``): where a client is in one origin node's events
    on a channel."""

    node: UUID
    epoch: int
    seq: int


class Malformed(ValueError):
    """The buffer is not a valid instance of the expected schema."""


# Field kinds.
U8, BOOL, U16, U32, U64, STRING, BYTES, UUID_STRUCT, TABLE, STRINGS, TABLES, UNION_TYPE, UNION, UUIDS, POSITIONS = range(15)

_INLINE_SIZE = {U8: 1, BOOL: 1, U16: 2, U32: 4, U64: 8, UUID_STRUCT: 16, UNION_TYPE: 1}


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
    #: Turns the dict of present fields into the caller's value; or, with
    #: ``positional``, the tuple of every field's value in order, absent ones
    #: as :data:`ABSENT` gives them (no dict is built: frames read per message).
    make: Callable[..., Any] = dict
    positional: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "reader", _compile(self))


def root(buf: bytes, identifier: bytes) -> int:
    """Check size and file identifier; return the position of the root table."""
    if len(buf) < 12:
        raise Malformed(f"{len(buf)} bytes is too short for a frame")
    if buf[4:8] != identifier:
        raise Malformed(f"file identifier is {bytes(buf[4:8])!r}, expected {identifier!r}")
    return _u32(buf, 0)[0]


def read(buf: bytes, identifier: bytes, table: Table) -> Any:
    """Verify and read a whole buffer whose root is ``table``."""
    return table.reader(buf, root(buf, identifier), 0)


def read_table(buf: bytes, pos: int, table: Table, depth: int = 0) -> Any:
    """Verify and read the ``table`` at ``pos``."""
    return table.reader(buf, pos, depth)


# -- the readers ------------------------------------------------------------------
#
# Each Table gets a reader function generated from its fields when it is
# defined, as dataclasses generate __init__: every field's vtable entry,
# inline size and checks become constants in straight-line code, instead of a
# loop that looks them up for each field of each frame (about twice as fast;
# frames are read for every message).  tests/flatref.py keeps the loop as a
# reference, and the tests check that both agree on damaged buffers.

_SCALAR_READERS = {U8: "_u8", U16: "_u16", U32: "_u32", U64: "_u64"}

#: What a positional reader passes for an absent field, by kind: the
#: FlatBuffers default of a scalar (every field of these schemas defaults to
#: zero), None for the rest.
ABSENT = {U8: 0, U16: 0, U32: 0, U64: 0, BOOL: False}

#: Unpackers of a vtable's first k field offsets, for k up to 64.
_OFFSETS = [struct.Struct(f"<{k}H").unpack_from for k in range(65)]


def _compile(table: Table) -> Callable[[bytes, int, int], Any]:
    count = len(table.fields)
    if count > len(_OFFSETS) - 1:
        raise ValueError(f"{table.name}: more than {len(_OFFSETS) - 1} fields")
    if table.positional and any(f.kind in (UNION_TYPE, UNION) for f in table.fields):
        raise ValueError(f"{table.name}: a positional table cannot hold a union")
    namespace: dict[str, Any] = {
        "Malformed": Malformed, "UUID": UUID, "_u8": _u8, "_u16": _u16, "_u16x2": _u16x2, "_u32": _u32,
        "_i32": _i32, "_u64": _u64, "_uuid_parts": _uuid_parts, "_position": _position, "Position": Position, "follow": follow, "vector": vector,
        "string": string, "make": table.make,
        # The vtable's offsets are read in one call: all the fields', or the
        # k there are (an older writer's) followed by zeros.
        "offsets": _OFFSETS[count], "short": [(_OFFSETS[k], (0,) * (count - k)) for k in range(count)],
    }
    name = table.name
    slots = [f"o{slot}" for slot in range(count)]
    lines = [
        "def reader(buf, pos, depth):",
        "    if depth > 8:",
        "        raise Malformed('tables nested too deeply')",
        "    n = len(buf)",
        "    if pos < 0 or pos + 4 > n:",
        f"        raise Malformed({name + ' table out of bounds'!r})",
        "    vtable = pos - _i32(buf, pos)[0]",
        "    if vtable < 0 or vtable + 4 > n:",
        f"        raise Malformed({name + ' vtable out of bounds'!r})",
        "    vt_size, t_size = _u16x2(buf, vtable)",
        "    if vt_size < 4 or vt_size % 2 or vtable + vt_size > n or pos + t_size > n:",
        f"        raise Malformed({name + ' vtable or table size out of bounds'!r})",
    ]
    if count:
        lines += [
            "    k = (vt_size - 4) >> 1",
            f"    if k >= {count}:",
            f"        {', '.join(slots)}, = offsets(buf, vtable + 4)",
            "    else:",
            "        unpack, zeros = short[k]",
            f"        {', '.join(slots)}, = unpack(buf, vtable + 4) + zeros",
        ]
    if table.positional:
        lines += [f"    v{slot} = {ABSENT.get(f.kind)!r}" for slot, f in enumerate(table.fields)]
    else:
        lines += ["    values = {}", "    union_type = 0"]
    for slot, f in enumerate(table.fields):
        what = f"{name}.{f.name}"
        size = _INLINE_SIZE.get(f.kind, 4)
        dest = f"v{slot}" if table.positional else f"values[{f.name!r}]"
        lines += [
            f"    o = o{slot}",
            "    if o:",
            f"        if o < 4 or o + {size} > t_size:",
            f"            raise Malformed({'field ' + what + ' out of bounds'!r})",
            "        at = pos + o",
        ]
        lines += ["        " + line for line in _read_field(f, what, namespace, slot, dest)]
        if f.required:
            lines += ["    else:", f"        raise Malformed({what + ' is required'!r})"]
    if table.positional:
        lines.append(f"    return make(({''.join(f'v{slot}, ' for slot in range(count))}))")
    else:
        lines.append("    return make(values)")
    exec("\n".join(lines), namespace)  # noqa: S102 - source built above from the schema description
    return namespace["reader"]


def _read_field(f: Field, what: str, namespace: dict, slot: int, dest: str) -> list[str]:
    kind = f.kind
    if kind in _SCALAR_READERS:
        return [f"{dest} = {_SCALAR_READERS[kind]}(buf, at)[0]"]
    if kind == BOOL:
        return [f"{dest} = buf[at] != 0"]
    if kind == UUID_STRUCT:
        return ["hi, lo = _uuid_parts(buf, at)", f"{dest} = UUID(int=(hi << 64) | lo)"]
    if kind in (STRING, BYTES):
        # follow() and vector() inline: same checks, same messages.
        extra = 1 if kind == STRING else 0
        lines = [
            "target = at + _u32(buf, at)[0]",
            "if target + 4 > n:",
            f"    raise Malformed({what + ' out of bounds'!r})",
            "length = _u32(buf, target)[0]",
            "start = target + 4",
            f"if start + length + {extra} > n:",
            f"    raise Malformed({what + ' length out of bounds'!r})",
        ]
        if kind == BYTES:
            return lines + [f"{dest} = bytes(buf[start : start + length])"]
        return lines + [
            "if buf[start + length] != 0:",
            f"    raise Malformed({what + ' is not NUL-terminated'!r})",
            "try:",
            f"    {dest} = buf[start : start + length].decode('utf-8')",
            "except UnicodeDecodeError:",
            f"    raise Malformed({what + ' is not valid UTF-8'!r}) from None",
        ]
    if kind == TABLE:
        namespace[f"read_{slot}"] = f.of.reader
        return [f"{dest} = read_{slot}(buf, follow(buf, at, {what!r}), depth + 1)"]
    if kind == STRINGS:
        return [
            f"start, length = vector(buf, at, {what!r}, 4)",
            f"{dest} = [string(buf, start + 4 * i, {what!r}) for i in range(length)]",
        ]
    if kind == TABLES:
        namespace[f"read_{slot}"] = f.of.reader
        return [
            f"start, length = vector(buf, at, {what!r}, 4)",
            f"{dest} = [read_{slot}(buf, follow(buf, start + 4 * i, {what!r}), depth + 1)"
            " for i in range(length)]",
        ]
    if kind == UUIDS:  # a vector of Uuid structs
        return [
            f"start, length = vector(buf, at, {what!r}, 16)",
            f"{dest} = [UUID(int=(hi << 64) | lo) for hi, lo in"
            " (_uuid_parts(buf, start + 16 * i) for i in range(length))]",
        ]
    if kind == POSITIONS:  # a vector of Position structs: Uuid, epoch, seq
        return [
            f"start, length = vector(buf, at, {what!r}, 32)",
            f"{dest} = [Position(UUID(int=(hi << 64) | lo), epoch, seq) for hi, lo, epoch, seq in"
            " (_position(buf, start + 32 * i) for i in range(length))]",
        ]
    if kind == UNION_TYPE:
        return ["union_type = buf[at]"]
    if kind == UNION:
        namespace[f"members_{slot}"] = {value: table.reader for value, (_name, table) in f.of.items()}
        return [
            f"member = members_{slot}.get(union_type)",
            "if member is None:",
            f"    raise Malformed(f'{what}: unknown union member {{union_type}}')",
            f"{dest} = member(buf, follow(buf, at, {what!r}), depth + 1)",
        ]
    raise ValueError(f"{what}: unknown field kind {kind}")


def follow(buf: bytes, at: int, what: str) -> int:
    """Follow the unsigned offset stored at ``at``."""
    target = at + _u32(buf, at)[0]
    if target >= len(buf):
        raise Malformed(f"{what} out of bounds")
    return target


def vector(buf: bytes, at: int, what: str, element_size: int, extra: int = 0) -> tuple[int, int]:
    """Follow the offset at ``at`` to a length-prefixed vector; return (start, length)."""
    n = len(buf)
    target = at + _u32(buf, at)[0]  # follow(), with its check folded into the next
    if target + 4 > n:
        raise Malformed(f"{what} out of bounds")
    length = _u32(buf, target)[0]
    start = target + 4
    if start + length * element_size + extra > n:
        raise Malformed(f"{what} length out of bounds")
    return start, length


def string(buf: bytes, at: int, what: str) -> str:
    n = len(buf)
    target = at + _u32(buf, at)[0]  # vector(), inline: strings are read for every routed frame
    if target + 4 > n:
        raise Malformed(f"{what} out of bounds")
    length = _u32(buf, target)[0]
    start = target + 4
    if start + length + 1 > n:  # strings end with a NUL byte
        raise Malformed(f"{what} length out of bounds")
    if buf[start + length] != 0:
        raise Malformed(f"{what} is not NUL-terminated")
    try:
        return buf[start : start + length].decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed(f"{what} is not valid UTF-8") from None
