import * as flatbuffers from 'flatbuffers';
import { Frame, Position as PositionStruct, Watchable } from './gen/meshd/fb/client.js';
import { uuidFromString, uuidToString } from './uuid.js';

/**
 * Where an event is in a history channel: its origin node, the origin's incarnation (`epoch`)
 * and its number among that origin's events (`seq`). In Subscribe, History and their Acks: for
 * each origin, the highest number received (or where the channel is).
 */
export interface Position {
  node: string;
  epoch: bigint;
  seq: bigint;
}

/** What the client puts in a frame it sends. */
export interface OutFrame {
  opcode: number;
  requestId?: bigint;
  channel?: string;
  watchable?: { kind: string; id: string };
  payload?: Uint8Array;
  token?: string;
  version?: number;
  excludeSelf?: boolean;
  batch?: boolean;
  /** History, Subscribe: from where (an empty list is sent as an empty vector, not left out). */
  positions?: readonly { node: string; epoch: bigint | number; seq: bigint | number }[];
  /** Subscribe: send the events missed since `positions` first. */
  recover?: boolean;
  /** History: at most this many events, the latest. */
  limit?: number;
}

/** A received frame, read into plain values. */
export interface InFrame {
  opcode: number;
  requestId: bigint;
  channel?: string;
  watchable?: { kind: string; id: string };
  payload?: Uint8Array;
  eventType: number;
  session?: string;
  node?: string;
  errorCode: number;
  message?: string;
  principal?: string;
  version: number;
  maxMessageSize: number;
  batch: boolean;
  /** Event of a history channel: the origin's incarnation (0n otherwise). */
  epoch: bigint;
  /** Event of a history channel: its number among the origin's events (0n otherwise). */
  seq: bigint;
  /** Ack of Subscribe or History on a history channel: where the channel is (absent: no such field). */
  positions?: Position[];
  recover: boolean;
  recovered: boolean;
  limit: number;
}

/** Encode one finished `Frame` buffer with the `MSH1` file identifier. */
export function encodeFrame(f: OutFrame): Uint8Array {
  const b = new flatbuffers.Builder(128 + (f.payload?.length ?? 0));
  // Strings, vectors and tables go before startFrame.
  const channel = f.channel !== undefined ? b.createString(f.channel) : undefined;
  let watchable: number | undefined;
  if (f.watchable !== undefined) {
    const kind = b.createString(f.watchable.kind);
    const id = b.createString(f.watchable.id);
    watchable = Watchable.createWatchable(b, kind, id);
  }
  const payload = f.payload !== undefined ? b.createByteVector(f.payload) : undefined;
  const token = f.token !== undefined ? b.createString(f.token) : undefined;
  let positions: number | undefined;
  if (f.positions !== undefined) {
    const list = f.positions.map((p) => ({ ...uuidFromString(p.node), epoch: BigInt(p.epoch), seq: BigInt(p.seq) }));
    Frame.startPositionsVector(b, list.length);
    for (let i = list.length - 1; i >= 0; i--) {
      const p = list[i]!;
      PositionStruct.createPosition(b, p.hi, p.lo, p.epoch, p.seq);
    }
    positions = b.endVector();
  }
  Frame.startFrame(b);
  Frame.addOpcode(b, f.opcode);
  if (f.requestId) Frame.addRequestId(b, f.requestId);
  if (channel !== undefined) Frame.addChannel(b, channel);
  if (watchable !== undefined) Frame.addWatchable(b, watchable);
  if (payload !== undefined) Frame.addPayload(b, payload);
  if (token !== undefined) Frame.addToken(b, token);
  if (f.version !== undefined) Frame.addVersion(b, f.version);
  if (f.excludeSelf) Frame.addExcludeSelf(b, true);
  if (f.batch) Frame.addBatch(b, true);
  if (positions !== undefined) Frame.addPositions(b, positions);
  if (f.recover) Frame.addRecover(b, true);
  if (f.limit) Frame.addLimit(b, f.limit);
  Frame.finishFrameBuffer(b, Frame.endFrame(b));
  return b.asUint8Array();
}

/** Decode one frame; throws when the buffer is too short or lacks the `MSH1` identifier. */
export function decodeFrame(data: Uint8Array): InFrame {
  if (data.length < 12) throw new Error(`not a meshd frame: ${data.length} bytes`);
  const bb = new flatbuffers.ByteBuffer(data);
  if (!Frame.bufferHasIdentifier(bb)) throw new Error('not a meshd frame: no MSH1 file identifier');
  const f = Frame.getRootAsFrame(bb);
  const w = f.watchable();
  const session = f.session();
  const node = f.node();
  const out: InFrame = {
    opcode: f.opcode(),
    requestId: f.requestId(),
    eventType: f.eventType(),
    errorCode: f.errorCode(),
    version: f.version(),
    maxMessageSize: f.maxMessageSize(),
    batch: f.batch(),
    epoch: f.epoch(),
    seq: f.seq(),
    recover: f.recover(),
    recovered: f.recovered(),
    limit: f.limit(),
  };
  const channel = f.channel();
  if (channel !== null) out.channel = channel;
  if (w !== null) out.watchable = { kind: w.kind() ?? '', id: w.id() ?? '' };
  const payload = f.payloadArray();
  if (payload !== null) out.payload = payload;
  if (session !== null) out.session = uuidToString(session.hi(), session.lo());
  if (node !== null) out.node = uuidToString(node.hi(), node.lo());
  const message = f.message();
  if (message !== null) out.message = message;
  const principal = f.principal();
  if (principal !== null) out.principal = principal;
  if (hasPositions(f)) {
    const n = f.positionsLength();
    const list: Position[] = [];
    const p = new PositionStruct();
    for (let i = 0; i < n; i++) {
      f.positions(i, p);
      const id = p.node()!;
      list.push({ node: uuidToString(id.hi(), id.lo()), epoch: p.epoch(), seq: p.seq() });
    }
    out.positions = list;
  }
  return out;
}

/** Whether the frame has a `positions` vector (possibly empty): `positions(0)` is not null then. */
function hasPositions(f: Frame): boolean {
  return f.positions(0) !== null;
}

/** Split a Batch frame's payload into its entries: each a 4-byte little-endian length and one Event frame buffer. */
export function splitBatch(payload: Uint8Array): Uint8Array[] {
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  const out: Uint8Array[] = [];
  let at = 0;
  while (at < payload.length) {
    if (at + 4 > payload.length) throw new Error('truncated Batch entry length');
    const n = view.getUint32(at, true);
    at += 4;
    if (at + n > payload.length) throw new Error('truncated Batch entry');
    out.push(payload.subarray(at, at + n));
    at += n;
  }
  return out;
}
