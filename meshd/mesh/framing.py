# -*- test-case-name: tests.test_mesh_wire -*-
"""Length-prefixed framing for mesh links, with no I/O: bytes in, frames out."""

from __future__ import annotations

import struct

_LENGTH = struct.Struct(">I")
HEADER = _LENGTH.size


class FrameTooLarge(Exception):
    """A frame longer than the link's maximum was announced or offered."""


def frame(payload: bytes, max_size: int) -> bytes:
    """Prefix ``payload`` with its 4-byte big-endian length."""
    if len(payload) > max_size:
        raise FrameTooLarge(f"frame of {len(payload)} bytes is over the limit of {max_size}")
    return _LENGTH.pack(len(payload)) + payload


class Deframer:
    """Splits a byte stream into frames; refuses any frame over ``max_size``."""

    __slots__ = ("max_size", "_buffer")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        frames = []
        start, end = 0, len(buffer)
        while end - start >= HEADER:
            (length,) = _LENGTH.unpack_from(buffer, start)
            if length > self.max_size:
                raise FrameTooLarge(f"peer announced a frame of {length} bytes (limit {self.max_size})")
            if end - start - HEADER < length:
                break
            frames.append(bytes(buffer[start + HEADER : start + HEADER + length]))
            start += HEADER + length
        del buffer[:start]
        return frames

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buffer)
