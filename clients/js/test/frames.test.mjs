// Encoding and decoding without a node: the test vectors of docs/protocol.md section 2.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { decodeFrame, encodeFrame, ErrorCode, EventType, jwtExpiry, Opcode, splitBatch, uuidFromString, uuidToString } from '../dist/index.js';

const hex = (s) => new Uint8Array(Buffer.from(s.replace(/\s+/g, ''), 'hex'));

const HELLO = hex(`28000000 4d534831 00001e00 18001600 08000000 00000000 00000000 00000000
00000000 00000600 1e000000 00000100 01000000 00000000 00000000 00000100`);
const WELCOME = hex(`2c000000 4d534831 00002200 3c003a00 2c000000 00000000 00001c00 0c000000
00000000 00000a00 00000400 22000000 00000100 00000100 00000000 00000000
01000000 00000000 d3129be8 67453e12 00401714 664256a4 01000000 00000000
00000000 00000200`);

test('the Hello test vector decodes, and encoding it gives a frame that reads the same', () => {
  const f = decodeFrame(HELLO);
  assert.equal(f.opcode, Opcode.Hello);
  assert.equal(f.requestId, 1n);
  assert.equal(f.version, 1);
  assert.equal(f.token, undefined);
  const mine = decodeFrame(encodeFrame({ opcode: Opcode.Hello, requestId: 1n, version: 1 }));
  assert.deepEqual(mine, f);
});

test('the Welcome test vector decodes', () => {
  const f = decodeFrame(WELCOME);
  assert.equal(f.opcode, Opcode.Welcome);
  assert.equal(f.requestId, 1n);
  assert.equal(f.session, '123e4567-e89b-12d3-a456-426614174000');
  assert.equal(f.node, '00000000-0000-0000-0000-000000000001');
  assert.equal(f.version, 1);
  assert.equal(f.maxMessageSize, 65536);
  assert.equal(f.principal, undefined);
  assert.equal(f.batch, false);
});

test('every field a client sends round-trips', () => {
  const out = {
    opcode: Opcode.Publish,
    requestId: 2n ** 64n - 1n,
    channel: 'chät',
    watchable: { kind: 'document', id: '4/2' },
    payload: new Uint8Array([0, 255, 7]),
    token: 't',
    version: 1,
    excludeSelf: true,
    batch: true,
  };
  const bytes = encodeFrame(out);
  assert.equal(Buffer.from(bytes.subarray(4, 8)).toString(), 'MSH1');
  const f = decodeFrame(bytes);
  assert.equal(f.opcode, Opcode.Publish);
  assert.equal(f.requestId, out.requestId);
  assert.equal(f.channel, 'chät');
  assert.deepEqual(f.watchable, out.watchable);
  assert.deepEqual([...f.payload], [0, 255, 7]);
  assert.equal(f.batch, true);
  // An empty string and an empty payload are present, not absent.
  const empty = decodeFrame(encodeFrame({ opcode: Opcode.Subscribe, channel: '', payload: new Uint8Array(0) }));
  assert.equal(empty.channel, '');
  assert.equal(empty.payload.length, 0);
  assert.equal(empty.requestId, 0n);
});

test('frames that are not meshd frames are refused', () => {
  assert.throws(() => decodeFrame(new Uint8Array(8)), /not a meshd frame/);
  const wrong = HELLO.slice();
  wrong[4] = 0x58;
  assert.throws(() => decodeFrame(wrong), /MSH1/);
});

test('UUIDs: the worked example of section 2', () => {
  const { hi, lo } = uuidFromString('123e4567-e89b-12d3-a456-426614174000');
  assert.equal(hi, 1314564453825188563n);
  assert.equal(lo, 11841725276408463360n);
  assert.equal(uuidToString(hi, lo), '123e4567-e89b-12d3-a456-426614174000');
  assert.equal(uuidToString(0n, 1n), '00000000-0000-0000-0000-000000000001');
});

test('Batch payloads split into their entries', () => {
  const a = encodeFrame({ opcode: Opcode.Event, channel: 'a' });
  const b = encodeFrame({ opcode: Opcode.Event, channel: 'b' });
  const payload = new Uint8Array(8 + a.length + b.length);
  const view = new DataView(payload.buffer);
  view.setUint32(0, a.length, true);
  payload.set(a, 4);
  view.setUint32(4 + a.length, b.length, true);
  payload.set(b, 8 + a.length);
  const entries = splitBatch(payload);
  assert.deepEqual(entries.map((e) => decodeFrame(e).channel), ['a', 'b']);
  assert.deepEqual(splitBatch(new Uint8Array(0)), []);
  assert.throws(() => splitBatch(payload.subarray(0, payload.length - 1)), /truncated/);
});

test('jwtExpiry reads exp from a JWT and nothing from other tokens', () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  assert.equal(jwtExpiry(`${b64({ alg: 'HS256' })}.${b64({ sub: 'a', exp: 1767225600 })}.sig`), 1767225600);
  assert.equal(jwtExpiry(`${b64({ alg: 'HS256' })}.${b64({ sub: 'a' })}.sig`), undefined);
  assert.equal(jwtExpiry('s3cret'), undefined);
  assert.equal(jwtExpiry('a.b.c'), undefined);
});

test('the enums are the schema\'s', () => {
  assert.equal(Opcode.Refresh, 14);
  assert.equal(Opcode.UserFirst, 1024);
  assert.equal(EventType.ResourceEvent, 5);
  assert.equal(ErrorCode.RateLimited, 15);
});

test('positions, recover, recovered and limit round-trip; an absent positions vector differs from an empty one', () => {
  const positions = [
    { node: '123e4567-e89b-12d3-a456-426614174000', epoch: 0xfedcba9876543210n, seq: 42n },
    { node: '00000000-0000-0000-0000-000000000001', epoch: 7n, seq: 1n },
  ];
  const sub = decodeFrame(encodeFrame({ opcode: Opcode.Subscribe, requestId: 3n, channel: 'chat.a', recover: true, positions }));
  assert.deepEqual(sub.positions, positions);
  assert.equal(sub.recover, true);
  const hist = decodeFrame(encodeFrame({ opcode: Opcode.History, requestId: 4n, channel: 'chat.a', limit: 10 }));
  assert.equal(hist.limit, 10);
  assert.equal(hist.positions, undefined);
  assert.deepEqual(decodeFrame(encodeFrame({ opcode: Opcode.Subscribe, positions: [] })).positions, []);
  const plain = decodeFrame(encodeFrame({ opcode: Opcode.Subscribe, channel: 'x' }));
  assert.equal(plain.recover, false);
  assert.equal(plain.recovered, false);
  assert.equal(plain.epoch, 0n);
  assert.equal(plain.seq, 0n);
});
