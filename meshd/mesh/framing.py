# -*- test-case-name: tests.test_mesh_wire -*-
"""Length-prefixed framing for mesh links, with no I/O: bytes in, frames out."""

from __future__ import annotations

import struct

LENGTH = struct.Struct(">I")
HEADER = LENGTH.size


class FrameTooLarge(Exception):
    """A frame longer than the link's maximum was announced or offered."""


def check_size(size: int, max_size: int) -> None:
    """Refuse to send a frame of ``size`` bytes over a link whose limit is ``max_size``."""
    if size > max_size:
        raise FrameTooLarge(f"frame of {size} bytes is over the limit of {max_size}")


def frame(payload: bytes, max_size: int) -> bytes:
    """Prefix ``payload`` with its 4-byte big-endian length."""
    check_size(len(payload), max_size)
    return LENGTH.pack(len(payload)) + payload


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
            (length,) = LENGTH.unpack_from(buffer, start)
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
