"""Mesh frames, framing and the outbox, without sockets."""

from __future__ import annotations

import struct
from uuid import uuid4

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from . import flatref
from .support import flatc_json

from meshd.codec import Watchable
from meshd.mesh.framing import Deframer, FrameTooLarge, frame
from meshd.mesh.outbox import Outbox
from meshd import flatverify as fv
from meshd.mesh.wire import (
    _FRAME, MESH_IDENTIFIER, read_routed,
    Cursor, Goodbye, GoodbyeCode, Heartbeat, Interest, LinkHello, Malformed, Peer, Peers, RouteKind,
    Routed, decode, encode_goodbye, encode_heartbeat, encode_hello, encode_interest, encode_peers,
    encode_routed, routed_frame,
)


def samples() -> list[bytes]:
    return [
        encode_hello(LinkHello(node=uuid4(), cluster="c", incarnation=3, version=1, address="h:1",
                               peers=(Peer(uuid4(), "a:2"),), interests=("x", "y"), cursors=(Cursor(uuid4(), 1, 2),))),
        encode_heartbeat(7),
        encode_routed(Routed(origin=uuid4(), frame=b"MSH1....", seq=9, kind=RouteKind.WatcherNotification,
                             channel="c", watchable=Watchable("k", "i"), exclude_session=uuid4())),
        encode_interest(["a"], ["b"]),
        encode_peers([Peer(uuid4(), "p:3")]),
        encode_goodbye(GoodbyeCode.Duplicate, "dup"),
    ]


class WireTests(unittest.SynchronousTestCase):
    def test_round_trips(self) -> None:
        """Every frame type decodes to what was encoded."""
        hello = LinkHello(node=uuid4(), cluster="c", incarnation=3, version=1, address="h:1",
                          peers=(Peer(uuid4(), "a:2"),), interests=("x",), cursors=(Cursor(uuid4(), 1, 2),))
        self.assertEqual(decode(encode_hello(hello)), hello)
        self.assertEqual(decode(encode_heartbeat(5)), Heartbeat(5))
        routed = Routed(origin=uuid4(), frame=b"abc", seq=2, kind=RouteKind.ChannelMessage, channel="x")
        self.assertEqual(decode(encode_routed(routed)), routed)
        self.assertEqual(decode(encode_interest(["a"], [])), Interest(("a",), ()))
        self.assertEqual(decode(encode_goodbye(GoodbyeCode.Self, "me")), Goodbye(GoodbyeCode.Self, "me"))
        peers = Peers((Peer(uuid4(), "x:1"),))
        self.assertEqual(decode(encode_peers(peers.peers)), peers)

    def test_client_identifier_refused(self) -> None:
        """A client frame is not a mesh frame."""
        from meshd.codec import Opcode, encode

        with self.assertRaises(Malformed):
            decode(encode(Opcode.Ping))

    @settings(max_examples=1500, deadline=None)
    @given(st.sampled_from(range(6)), st.data())
    def test_mutations_only_raise_malformed(self, which: int, data) -> None:
        """Mesh frames with random bytes overwritten or cut never raise anything but Malformed."""
        buf = bytearray(samples()[which])
        for _ in range(data.draw(st.integers(1, 6))):
            buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(buf)))
        buf = bytes(buf[:cut] if data.draw(st.booleans()) else buf)
        try:
            decode(buf)
        except Malformed:
            pass

        def outcome(read):
            try:
                return read(buf, MESH_IDENTIFIER, _FRAME)
            except Malformed as e:
                return ("malformed", str(e))

        self.assertEqual(outcome(fv.read), outcome(flatref.read), "the generated reader and the reference agree")


def routed_by_builder(routed: Routed) -> bytes:
    """The Routed frame built with the flatc-generated builder, as a reference."""
    import flatbuffers

    from meshd.fb.client import Watchable as W
    from meshd.fb.client.Uuid import CreateUuid
    from meshd.fb.mesh import Frame as F
    from meshd.fb.mesh import Routed as R
    from meshd.mesh.wire import Body

    b = flatbuffers.Builder(256)
    frame_vec = b.CreateByteVector(routed.frame)
    channel = b.CreateString(routed.channel) if routed.channel is not None else 0
    watchable = 0
    if routed.watchable is not None:
        kind, ident = b.CreateString(routed.watchable.kind), b.CreateString(routed.watchable.id)
        W.Start(b)
        W.AddKind(b, kind)
        W.AddId(b, ident)
        watchable = W.End(b)
    R.Start(b)
    R.AddOrigin(b, CreateUuid(b, routed.origin.int >> 64, routed.origin.int & (1 << 64) - 1))
    R.AddSeq(b, routed.seq)
    R.AddKind(b, routed.kind)
    if channel:
        R.AddChannel(b, channel)
    if watchable:
        R.AddWatchable(b, watchable)
    if routed.exclude_session is not None:
        x = routed.exclude_session.int
        R.AddExcludeSession(b, CreateUuid(b, x >> 64, x & (1 << 64) - 1))
    R.AddFrame(b, frame_vec)
    body = R.End(b)
    F.Start(b)
    F.AddBodyType(b, Body.Routed)
    F.AddBody(b, body)
    b.Finish(F.End(b), file_identifier=b"MSHM")
    return bytes(b.Output())


texts = st.text(max_size=30)
uuids = st.builds(__import__("uuid").UUID, int=st.integers(0, (1 << 128) - 1))


class RoutedEncoderTests(unittest.SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(uuids, st.binary(max_size=200), st.integers(0, (1 << 64) - 1), st.integers(0, 2),
           st.none() | texts, st.none() | st.builds(Watchable, texts, texts), st.none() | uuids)
    def test_same_as_the_builder(self, origin, frame_bytes, seq, kind, channel, watchable, exclude) -> None:
        """The fixed-layout Routed encoder means what the generated builder's frame means."""
        routed = Routed(origin=origin, frame=frame_bytes, seq=seq, kind=kind, channel=channel,
                        watchable=watchable, exclude_session=exclude)
        self.assertEqual(decode(encode_routed(routed)), routed)
        self.assertEqual(decode(routed_by_builder(routed)), routed)

    @settings(max_examples=500, deadline=None)
    @given(uuids, st.binary(max_size=60), st.none() | texts, st.none() | st.builds(Watchable, texts, texts),
           st.none() | uuids, st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=3),
           st.integers(0, 400))
    def test_fast_reader_agrees_with_the_verifier(self, origin, frame_bytes, channel, watchable, exclude,
                                                   changes, cut) -> None:
        """On any damaged Routed frame, read_routed declines, or says what the generic verifier says."""
        routed = Routed(origin=origin, frame=frame_bytes, seq=7, kind=RouteKind.ChannelMessage, channel=channel,
                        watchable=watchable, exclude_session=exclude)
        buf = bytearray(encode_routed(routed))
        for at, value in changes:
            buf[at % len(buf)] = value
        buf = bytes(buf[: max(len(buf) - cut, 0)] if cut < 200 else buf)

        def outcome(read):
            try:
                return read(buf)
            except Malformed as e:
                return ("malformed", type(e))

        fast = outcome(read_routed)
        if fast is not None:
            self.assertEqual(fast, outcome(lambda b: fv.read(b, MESH_IDENTIFIER, _FRAME)))

    @settings(max_examples=200, deadline=None)
    @given(uuids, st.binary(max_size=70), st.integers(0, 2), st.none() | texts,
           st.none() | st.builds(Watchable, texts, texts), st.none() | uuids)
    def test_with_the_length_prefix(self, origin, frame_bytes, kind, channel, watchable, exclude) -> None:
        """routed_frame(..., length_prefix=True) is the link's framing of the same frame, in one piece."""
        args = (origin, 5, kind, frame_bytes, channel, watchable, exclude)
        self.assertEqual(routed_frame(*args, length_prefix=True), frame(routed_frame(*args), 1 << 20))

    def test_flatc_reads_it(self) -> None:
        """flatc's C++ reader turns an encoded Routed frame back into its fields."""
        routed = Routed(origin=uuid4(), frame=b"MSH1abc", seq=42, kind=RouteKind.ChannelMessage, channel="c")
        parsed = flatc_json("mesh.fbs", encode_routed(routed))
        self.assertEqual(parsed["body_type"], "Routed")
        self.assertEqual((parsed["body"]["seq"], parsed["body"]["channel"]), (42, "c"))
        self.assertEqual(bytes(parsed["body"]["frame"]), b"MSH1abc")


class FramingTests(unittest.SynchronousTestCase):
    def test_split_anywhere(self) -> None:
        """Frames come out whole however the stream is cut."""
        payloads = [b"a", b"", b"x" * 1000, b"end"]
        stream = b"".join(frame(p, 4096) for p in payloads)
        for step in (1, 3, 7, 1000, len(stream)):
            d = Deframer(4096)
            out = []
            for i in range(0, len(stream), step):
                out += d.feed(stream[i : i + step])
            self.assertEqual(out, payloads)
            self.assertEqual(d.pending, 0)

    def test_limits(self) -> None:
        """Oversize frames are refused on both sides, before any body arrives."""
        self.assertRaises(FrameTooLarge, frame, b"x" * 11, 10)
        self.assertRaises(FrameTooLarge, Deframer(10).feed, struct.pack(">I", 11))


class OutboxTests(unittest.SynchronousTestCase):
    def test_ack_and_replay(self) -> None:
        """Acknowledged frames go; the rest replay in order from a cursor."""
        box = Outbox(max_bytes=1000, max_age=10)
        for seq in range(1, 6):
            box.append(seq, b"%d" % seq, now=0)
        box.ack(2)
        self.assertEqual(list(box.after(3)), [b"4", b"5"])
        self.assertEqual(list(box.after(0)), [b"3", b"4", b"5"])
        self.assertEqual((len(box), box.size), (3, 3))

    def test_bounds_while_down(self) -> None:
        """Past max_age everything waiting is dropped and counted; clear() drops past max_bytes."""
        box = Outbox(max_bytes=10, max_age=5)
        box.append(1, b"x" * 6, now=0)
        self.assertFalse(box.over)
        box.append(2, b"x" * 6, now=0)
        self.assertTrue(box.over)
        self.assertEqual(box.clear(), 2)
        self.assertEqual((len(box), box.size), (0, 0))
        box.append(3, b"y", now=10)
        self.assertEqual(box.expire(now=14), 0)
        self.assertEqual(box.expire(now=16), 1)

    def test_trim_while_up(self) -> None:
        """Written frames are trimmed to the bound and count as lost only if not acknowledged."""
        box = Outbox(max_bytes=10, max_age=5)
        for seq in range(1, 5):
            box.append(seq, b"x" * 4, now=0)
        box.trim()
        self.assertEqual((len(box), box.size), (2, 8))
        self.assertEqual(box.lost_before(1), 2, "a peer that read only seq 1 missed 2 and 3")
        self.assertEqual(box.lost_before(3), 0)
        box.ack(3)
        self.assertEqual(box.lost_before(0), 0, "acknowledged: nothing was lost")
