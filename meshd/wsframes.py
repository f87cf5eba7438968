# -*- test-case-name: tests.test_wsframes -*-
"""WebSocket frames as bytes: the client frames the node splits itself, and the frames it sends.

Sans-IO: bytes in, payloads out, no Twisted or Autobahn.  Clients send
almost only small binary messages of one frame each; :func:`split` takes
those off the front of what arrived, in one pass, and stops at the first
frame it does not take (a control frame, a fragment, text, an unmasked or
oversized frame, a 64-bit length), which the general parser then handles
from that frame boundary on.  :func:`frame_binary` frames a payload as one
final, unmasked binary message, as a server sends it (RFC 6455, 5.2).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

_U16 = struct.Struct(">H")
_HEAD_16 = struct.Struct(">BBH")
_HEAD_64 = struct.Struct(">BBQ")

#: First byte of the frames :func:`split` takes: FIN, no RSV bits, binary.
FINAL_BINARY = 0x82
#: Longest payload :func:`split` takes (a 16-bit length); longer frames, rare
#: here, are streamed by the general parser instead of being buffered whole.
MAX_FAST_PAYLOAD = 0xFFFF


class Split(NamedTuple):
    """What :func:`split` found at the front of a buffer."""

    #: The unmasked payloads of the whole frames taken, in order.
    payloads: list
    #: The offset just past each of those frames, in the buffer.
    ends: list
    #: True when it stopped at a frame it does not take (rather than at the
    #: end of the buffer or of a partial frame): the general parser takes
    #: over from ``ends[-1]`` (or 0).
    fallback: bool

    @property
    def consumed(self) -> int:
        """How many bytes at the front of the buffer the taken frames fill."""
        return self.ends[-1] if self.ends else 0


def unmask(key: bytes, masked: bytes) -> bytes:
    """XOR ``masked`` with the 4-byte masking ``key`` repeated (RFC 6455, 5.3)."""
    n = len(masked)
    if not n:
        return b""
    repeated = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(masked, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def split(buf: bytes, limit: int = MAX_FAST_PAYLOAD) -> Split:
    """Take the whole, final, masked binary frames of at most ``limit`` payload bytes off ``buf``."""
    end = len(buf)
    at = 0
    payloads: list[bytes] = []
    ends: list[int] = []
    limit = min(limit, MAX_FAST_PAYLOAD)
    while at < end:
        if buf[at] != FINAL_BINARY:
            return Split(payloads, ends, True)
        if end - at < 2:
            break
        length = buf[at + 1] ^ 0x80  # the mask bit must be set
        if length < 126:
            start = at + 6
        elif length == 126:
            if end - at < 4:
                break
            length = _U16.unpack_from(buf, at + 2)[0]
            if length < 126:  # not the minimal encoding
                return Split(payloads, ends, True)
            start = at + 8
        else:  # unmasked, or a 64-bit length
            return Split(payloads, ends, True)
        if length > limit:
            return Split(payloads, ends, True)
        stop = start + length
        if stop > end:
            break  # the rest of this frame has not arrived yet
        payloads.append(unmask(buf[start - 4 : start], buf[start:stop]))
        ends.append(stop)
        at = stop
    return Split(payloads, ends, False)


def frame_binary(payload: bytes) -> bytes:
    """``payload`` as one final, unmasked, uncompressed binary WebSocket message."""
    n = len(payload)
    if n < 126:
        return bytes((FINAL_BINARY, n)) + payload
    if n < 0x10000:
        return _HEAD_16.pack(FINAL_BINARY, 126, n) + payload
    return _HEAD_64.pack(FINAL_BINARY, 127, n) + payload
