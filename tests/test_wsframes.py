"""meshd.wsframes: the sans-IO frame splitter, checked against a plain RFC 6455 reader, cut at any byte."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from meshd.wsframes import MAX_FAST_PAYLOAD, frame_binary, split, unmask


def client_frame(payload: bytes, key: bytes, opcode: int = 0x2, fin: bool = True, long16: bool = False,
                 masked: bool = True) -> bytes:
    """One client frame, as RFC 6455 section 5.2 lays it out."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126 and not long16:
        head = bytes((first, mask_bit | n))
    elif n < 0x10000:
        head = struct.pack(">BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack(">BBQ", first, mask_bit | 127, n)
    if not masked:
        return head + payload
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + body


def reference(buf: bytes, limit: int):
    """What the splitter should take: whole final masked binary frames up to ``limit``, minimally encoded."""
    at, out, ends = 0, [], []
    while at + 2 <= len(buf):
        first, second = buf[at], buf[at + 1]
        if first != 0x82 or not second & 0x80:
            return out, ends, True
        n = second & 0x7F
        if n == 127:
            return out, ends, True
        header = 2
        if n == 126:
            if at + 4 > len(buf):
                break
            n = struct.unpack_from(">H", buf, at + 2)[0]
            header = 4
            if n < 126:
                return out, ends, True
        if n > limit:
            return out, ends, True
        start = at + header + 4
        if start + n > len(buf):
            break
        key = buf[at + header : start]
        out.append(bytes(b ^ key[i % 4] for i, b in enumerate(buf[start : start + n])))
        at = start + n
        ends.append(at)
    else:
        if at < len(buf) and buf[at] != 0x82:
            return out, ends, True
    return out, ends, False


frames = st.lists(
    st.one_of(
        st.builds(client_frame, st.binary(max_size=300), st.binary(min_size=4, max_size=4)),
        st.builds(lambda p, k: client_frame(p, k, long16=True), st.binary(max_size=40), st.binary(min_size=4, max_size=4)),
        st.builds(lambda p, k: client_frame(p, k, opcode=0x9), st.binary(max_size=20), st.binary(min_size=4, max_size=4)),
        st.builds(lambda p, k: client_frame(p, k, fin=False), st.binary(max_size=20), st.binary(min_size=4, max_size=4)),
        st.builds(lambda p: client_frame(p, b"", masked=False), st.binary(max_size=20)),
    ),
    max_size=8,
)


class SplitTests(unittest.SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(frames, st.integers(min_value=0, max_value=4000), st.sampled_from([125, 200, 1000, MAX_FAST_PAYLOAD]))
    def test_agrees_with_reference_at_any_cut(self, parts, cut, limit) -> None:
        """Cut anywhere, the splitter takes exactly the frames, payloads and ends a plain reader finds."""
        stream = b"".join(parts)
        buf = stream[: cut % (len(stream) + 1)]
        found = split(buf, limit)
        payloads, ends, fallback = reference(buf, limit)
        self.assertEqual((found.payloads, found.ends, found.fallback), (payloads, ends, fallback))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=500), max_size=10), st.data())
    def test_fed_in_pieces(self, payloads, data) -> None:
        """Fed in arbitrary pieces, keeping the rest each time, every message comes out once, in order."""
        stream = b"".join(client_frame(p, b"\x01\x02\x03\x04") for p in payloads)
        got, rest, at = [], b"", 0
        while at < len(stream):
            step = data.draw(st.integers(min_value=1, max_value=len(stream) - at))
            buf = rest + stream[at : at + step]
            at += step
            found = split(buf)
            self.assertFalse(found.fallback)
            got += found.payloads
            rest = buf[found.consumed :]
        self.assertEqual((got, rest), (payloads, b""))

    def test_stops_at_frames_it_does_not_take(self) -> None:
        """A ping, a fragment, text, an unmasked or oversized frame stops the split at its boundary."""
        key = b"abcd"
        good = client_frame(b"ok", key)
        for other in (client_frame(b"p", key, opcode=0x9), client_frame(b"f", key, fin=False),
                      client_frame(b"t", key, opcode=0x1), client_frame(b"u", b"", masked=False),
                      client_frame(b"x" * 300, key)):
            found = split(good + other + good, limit=200)
            self.assertEqual((found.payloads, found.ends, found.fallback), ([b"ok"], [len(good)], True))

    def test_unmask(self) -> None:
        """unmask XORs with the key repeated, for every length."""
        for n in range(0, 12):
            data = bytes(range(n))
            self.assertEqual(unmask(b"\x01\x02\x03\x04", data), bytes(b ^ (i % 4 + 1) for i, b in enumerate(data)))

    def test_frame_binary_round_trip(self) -> None:
        """A frame from frame_binary, masked as a client would, splits back into its payload."""
        for n in (0, 125, 126, 1000, 65535):
            payload = bytes(i % 7 for i in range(n))
            server = frame_binary(payload)
            self.assertEqual(server[0], 0x82)
            self.assertEqual(split(client_frame(payload, b"wxyz")).payloads, [payload])
