"""The client frame codec: round trips, agreement with the generated reader, hostile input."""

from __future__ import annotations

import struct
from uuid import UUID, uuid4

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from meshd.codec import (
    ErrorCode,
    EventType,
    Message,
    Opcode,
    ProtocolError,
    Watchable,
    decode,
    encode,
    encode_event,
    error_code_name,
    event_type_name,
    opcode_name,
)
from meshd.codec import Position, PresenceEntry
from meshd.fb.client.Frame import Frame

from meshd import flatverify as fv
from meshd.codec import FILE_IDENTIFIER, FRAME

from . import flatref
from .support import flatc_json

texts = st.text(max_size=40)


def outcome(read, *args):
    """What a reader makes of a buffer: the value, or its complaint."""
    try:
        return read(*args)
    except fv.Malformed as e:
        return ("malformed", str(e))
uuids = st.builds(UUID, int=st.integers(min_value=0, max_value=(1 << 128) - 1))
messages = st.builds(
    Message,
    opcode=st.integers(0, 0xFFFF),
    request_id=st.integers(0, (1 << 64) - 1),
    channel=st.none() | texts,
    watchable=st.none() | st.builds(Watchable, texts, texts),
    payload=st.none() | st.binary(max_size=300),
    event_type=st.integers(0, 0xFFFF),
    session=st.none() | uuids,
    node=st.none() | uuids,
    error_code=st.integers(0, 0xFFFF),
    message=st.none() | texts,
    token=st.none() | texts,
    principal=st.none() | texts,
    version=st.integers(0, 0xFFFF),
    exclude_self=st.booleans(),
    max_message_size=st.integers(0, (1 << 32) - 1),
    batch=st.booleans(),
    epoch=st.integers(0, (1 << 64) - 1),
    seq=st.integers(0, (1 << 64) - 1),
    positions=st.none() | st.lists(st.builds(Position, uuids, st.integers(0, (1 << 64) - 1),
                                             st.integers(0, (1 << 64) - 1)), max_size=5),
    recover=st.booleans(),
    recovered=st.booleans(),
    limit=st.integers(0, (1 << 32) - 1),
    info=st.none() | texts,
    presence=st.none() | st.lists(st.builds(PresenceEntry, st.none() | uuids, st.none() | uuids,
                                            st.none() | texts, st.none() | texts), max_size=4),
    sessions=st.integers(0, (1 << 32) - 1),
    principals=st.integers(0, (1 << 32) - 1),
)


def encode_message(m: Message) -> bytes:
    fields = {k: getattr(m, k) for k in Message._fields if k != "opcode"}
    return encode(m.opcode, **fields)


class RoundTripTests(unittest.SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(messages)
    def test_round_trip(self, m: Message) -> None:
        """Whatever is encoded decodes to the same message."""
        self.assertEqual(decode(encode_message(m)), m)

    @settings(max_examples=100, deadline=None)
    @given(messages)
    def test_generated_reader_agrees(self, m: Message) -> None:
        """The flatc-generated reader sees the same fields as the verifying decoder."""
        buf = encode_message(m)
        self.assertTrue(Frame.FrameBufferHasIdentifier(buf, 0))
        f = Frame.GetRootAs(buf, 0)
        self.assertEqual(f.Opcode(), m.opcode)
        self.assertEqual(f.RequestId(), m.request_id)
        self.assertEqual(f.Channel(), None if m.channel is None else m.channel.encode())
        self.assertEqual(f.PayloadLength(), len(m.payload or b""))
        self.assertEqual(f.ExcludeSelf(), m.exclude_self)
        if m.session is not None:
            self.assertEqual((f.Session().Hi() << 64) | f.Session().Lo(), m.session.int)
        if m.watchable is not None:
            self.assertEqual(f.Watchable().Id(), m.watchable.id.encode())
        self.assertEqual((f.Epoch(), f.Seq(), f.Limit(), f.Recover(), f.Recovered()),
                         (m.epoch, m.seq, m.limit, m.recover, m.recovered))
        positions = [f.Positions(i) for i in range(f.PositionsLength())]
        from meshd.fb.client.Uuid import Uuid

        self.assertEqual([Position(UUID(int=(p.Node(Uuid()).Hi() << 64) | p.Node(Uuid()).Lo()), p.Epoch(), p.Seq())
                          for p in positions], m.positions or [])

    def test_uuid_layout(self) -> None:
        """A Uuid struct holds the UUID's bytes 0-7 and 8-15 as big-endian integers."""
        u = UUID("00112233-4455-6677-8899-aabbccddeeff")
        f = Frame.GetRootAs(encode(Opcode.Welcome, session=u), 0)
        self.assertEqual((f.Session().Hi(), f.Session().Lo()), (0x0011223344556677, 0x8899AABBCCDDEEFF))

    def test_names(self) -> None:
        """Enum values have readable names; user values are marked as such."""
        self.assertEqual(opcode_name(Opcode.Publish), "Publish")
        self.assertEqual(opcode_name(0), "None")
        self.assertEqual(opcode_name(1500), "User(1500)")
        self.assertEqual(event_type_name(EventType.CacheEvent), "CacheEvent")
        self.assertEqual(error_code_name(ErrorCode.PermissionDenied), "PermissionDenied")


class FastEventEncoderTests(unittest.SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        st.integers(0, 0xFFFF), st.none() | texts, st.none() | st.builds(Watchable, texts, texts),
        st.none() | st.binary(max_size=300), st.none() | uuids, st.none() | uuids,
        st.just((0, 0)) | st.tuples(st.integers(0, (1 << 64) - 1), st.integers(1, (1 << 64) - 1)),
    )
    def test_same_frame_as_the_builder(self, event_type, channel, watchable, payload, session, node,
                                       position) -> None:
        """encode_event means exactly what the generated builder's Event frame means, with a position
        (a history channel's event) or without."""
        epoch, seq = position
        fields = dict(channel=channel, watchable=watchable, payload=payload, session=session, node=node,
                      epoch=epoch, seq=seq)
        fast = encode_event(event_type, **fields)
        self.assertEqual(decode(fast), decode(encode(Opcode.Event, event_type=event_type, **fields)))
        f = Frame.GetRootAs(fast, 0)
        self.assertEqual((f.Opcode(), f.EventType(), f.Epoch(), f.Seq()), (Opcode.Event, event_type, epoch, seq))
        root = int.from_bytes(fast[:4], "little")
        self.assertEqual(root % 8, 0, "the table, its Uuid structs and its 64-bit fields are 8-byte aligned")

    def test_kept_prefixes(self) -> None:
        """Events that share type, channel, session and node, with payloads of every length mod 4, all decode."""
        from meshd import codec

        session, node = UUID(int=5), UUID(int=6)
        codec._event_prefix.cache_clear()
        for size in [0, 1, 2, 3, 4, 5, 130, 0, 7]:
            payload = bytes(range(size))
            frame = encode_event(EventType.ChannelEvent, channel="room", payload=payload, session=session, node=node)
            self.assertEqual(len(frame) % 4, 0)
            self.assertEqual(decode(frame), decode(encode(Opcode.Event, event_type=EventType.ChannelEvent,
                                                          channel="room", payload=payload, session=session,
                                                          node=node)))
        self.assertEqual(codec._event_prefix.cache_info().currsize, 1, "one prefix for them all")
        kept = codec._event_prefix.cache_info().maxsize
        for i in range(kept + 10):
            encode_event(EventType.ChannelEvent, channel=f"c{i}", payload=b"x")
        self.assertLessEqual(codec._event_prefix.cache_info().currsize, kept, "bounded")

    def test_flatc_reads_it(self) -> None:
        """flatc's C++ reader turns an encode_event frame back into the same fields."""
        session, node = UUID(int=7), UUID(int=(1 << 127) + 9)
        frame = encode_event(EventType.ResourceEvent, channel="ch/é", watchable=Watchable("doc", "42"),
                             payload=b"\x00\x01\x02", session=session, node=node)
        parsed = flatc_json("client.fbs", frame)
        self.assertEqual(parsed["opcode"], "Event")
        self.assertEqual(parsed["event_type"], "ResourceEvent")
        self.assertEqual(parsed["channel"], "ch/é")
        self.assertEqual(parsed["watchable"], {"kind": "doc", "id": "42"})
        self.assertEqual(parsed["payload"], [0, 1, 2])
        self.assertEqual((parsed["node"]["hi"] << 64) | parsed["node"]["lo"], node.int)
        positioned = flatc_json("client.fbs", encode_event(EventType.ChannelEvent, channel="c", payload=b"p",
                                                           node=node, epoch=(1 << 63) + 5, seq=123456))
        self.assertEqual((int(positioned["epoch"]), int(positioned["seq"])), ((1 << 63) + 5, 123456))


class HostileInputTests(unittest.SynchronousTestCase):
    def assertMalformed(self, buf: bytes, words: str = "malformed frame") -> None:
        with self.assertRaises(ProtocolError) as caught:
            decode(buf)
        self.assertEqual(caught.exception.code, ErrorCode.Malformed)
        self.assertIn(words, caught.exception.message)

    def test_every_field_at_the_end_of_its_table(self) -> None:
        """A field whose inline value would end one byte past its table is refused; at the end, it is read."""
        import struct

        full = encode(Opcode.Hello, request_id=1, channel="c", watchable=Watchable("k", "i"), payload=b"p",
                      event_type=1, session=UUID(int=1), node=UUID(int=2), error_code=1, message="m", token="t",
                      principal="p", version=1, exclude_self=True, max_message_size=9, batch=True,
                      epoch=1, seq=1, positions=[Position(UUID(int=3), 1, 1)], recover=True, recovered=True, limit=1,
                      info="i", presence=[PresenceEntry(UUID(int=4), UUID(int=5), "p", "i")], sessions=1,
                      principals=1)
        table = struct.unpack_from("<I", full)[0]
        vtable = table - struct.unpack_from("<i", full, table)[0]
        vt_size, t_size = struct.unpack_from("<HH", full, vtable)
        self.assertEqual(vt_size, 4 + 2 * len(FRAME.fields), "every field present")
        sizes = {fv.U8: 1, fv.BOOL: 1, fv.U16: 2, fv.U32: 4, fv.U64: 8, fv.UUID_STRUCT: 16}
        for slot, field in enumerate(FRAME.fields):
            size = sizes.get(field.kind, 4)
            for offset, refused in ((t_size - size, False), (t_size - size + 1, True)):
                buf = bytearray(full)
                struct.pack_into("<H", buf, vtable + 4 + 2 * slot, offset)
                try:
                    fv.read(bytes(buf), FILE_IDENTIFIER, FRAME)
                    complaint = None
                except fv.Malformed as e:
                    complaint = str(e)
                if refused:
                    self.assertEqual(complaint, f"field Frame.{field.name} out of bounds")
                else:
                    self.assertNotEqual(complaint, f"field Frame.{field.name} out of bounds")

    def test_short_and_wrong_identifier(self) -> None:
        """Too-short buffers and other file identifiers are refused by name."""
        self.assertMalformed(b"", "too short")
        self.assertMalformed(b"\x0c\x00\x00\x00MSH", "too short")
        frame = bytearray(encode(Opcode.Ping))
        frame[4:8] = b"MSH2"
        self.assertMalformed(bytes(frame), "file identifier")

    def test_every_truncation(self) -> None:
        """Each prefix of a valid frame is either refused as Malformed or decodes without error."""
        frame = encode(
            Opcode.Publish, request_id=9, channel="room", payload=b"p" * 20,
            watchable=Watchable("k", "i"), session=uuid4(), message="m",
        )
        for n in range(len(frame)):
            try:
                decode(frame[:n])
            except ProtocolError as e:
                self.assertEqual(e.code, ErrorCode.Malformed)

    def test_string_without_terminator(self) -> None:
        """A string whose terminating NUL byte is something else is refused."""
        frame = bytearray(encode(Opcode.Subscribe, channel="abcd"))
        frame[frame.index(b"abcd") + 4] = ord("!")
        self.assertMalformed(bytes(frame), "NUL")

    def test_invalid_utf8(self) -> None:
        """A string that is not UTF-8 is refused."""
        frame = bytearray(encode(Opcode.Subscribe, channel="abcd"))
        at = frame.index(b"abcd")
        frame[at] = 0xFF
        self.assertMalformed(bytes(frame), "UTF-8")

    def test_vtable_out_of_bounds(self) -> None:
        """A root table whose vtable lies outside the buffer is refused."""
        frame = bytearray(encode(Opcode.Ping, request_id=1))
        root = struct.unpack_from("<I", frame)[0]
        struct.pack_into("<i", frame, root, -100_000)
        self.assertMalformed(bytes(frame), "vtable")

    def test_watchable_needs_both_fields(self) -> None:
        """A Watchable without its id is refused even though FlatBuffers would read it."""
        import flatbuffers

        from meshd.fb.client import Frame as F
        from meshd.fb.client import Watchable as W

        b = flatbuffers.Builder(64)
        kind = b.CreateString("doc")
        W.Start(b)
        W.AddKind(b, kind)
        w = W.End(b)
        F.Start(b)
        F.AddOpcode(b, Opcode.Watch)
        F.AddWatchable(b, w)
        b.Finish(F.End(b), file_identifier=b"MSH1")
        self.assertMalformed(bytes(b.Output()), "Watchable.id is required")

    @settings(max_examples=2000, deadline=None)
    @given(st.binary(max_size=200))
    def test_random_bytes(self, data: bytes) -> None:
        """Random bytes never raise anything but ProtocolError."""
        try:
            decode(data)
        except ProtocolError:
            pass

    @settings(max_examples=2000, deadline=None)
    @given(messages, st.data())
    def test_mutated_frames(self, m: Message, data) -> None:
        """Valid frames with random bytes overwritten never raise anything but ProtocolError.

        The generated reader and the reference loop (tests/flatref.py) give
        the same value or the same complaint.
        """
        frame = bytearray(encode_message(m))
        for _ in range(data.draw(st.integers(1, 6))):
            at = data.draw(st.integers(0, len(frame) - 1))
            frame[at] = data.draw(st.integers(0, 255))
        try:
            decode(bytes(frame))
        except ProtocolError:
            pass
        self.assertEqual(outcome(fv.read, bytes(frame), FILE_IDENTIFIER, FRAME),
                         outcome(flatref.read, bytes(frame), FILE_IDENTIFIER, FRAME))

    def test_every_vtable_size(self) -> None:
        """Vtables of any size, shorter (an older writer's) or longer (a newer one's) than Frame's, odd or
        past the buffer: the generated reader and the reference loop agree on the value or the complaint."""
        full = encode(Opcode.Hello, request_id=1, channel="c", watchable=Watchable("k", "i"), payload=b"p",
                      event_type=1, session=UUID(int=1), node=UUID(int=2), error_code=1, message="m", token="t",
                      principal="p", version=1, exclude_self=True, max_message_size=9, batch=True,
                      epoch=1, seq=1, positions=[Position(UUID(int=3), 1, 1)], recover=True, recovered=True, limit=1,
                      info="i", presence=[PresenceEntry(UUID(int=4), UUID(int=5), "p", "i")], sessions=1,
                      principals=1)
        table = struct.unpack_from("<I", full)[0]
        vtable = table - struct.unpack_from("<i", full, table)[0]
        seen = set()
        for vt_size in range(0, 4 + 2 * len(FRAME.fields) + 8):
            buf = bytearray(full)
            struct.pack_into("<H", buf, vtable, vt_size)
            generated = outcome(fv.read, bytes(buf), FILE_IDENTIFIER, FRAME)
            self.assertEqual(generated, outcome(flatref.read, bytes(buf), FILE_IDENTIFIER, FRAME), vt_size)
            seen.add(type(generated))
        self.assertEqual(seen, {tuple, Message}, "some sizes read, some refused")

    def test_table_without_fields(self) -> None:
        """A table described with no fields reads as nothing, whatever its vtable holds."""
        empty = fv.Table("Empty", ())
        # Root -> 16; at 8 a vtable of one slot (size 6, table size 4); the table at 16 points back to it.
        buf = struct.pack("<I4sHHHxxi", 16, b"TEST", 6, 4, 4, 16 - 8)
        self.assertEqual(fv.read(buf, b"TEST", empty), {})
        self.assertEqual(flatref.read(buf, b"TEST", empty), {})
