import * as flatbuffers from 'flatbuffers';
import { Frame, Watchable } from './gen/meshd/fb/client.js';
import { uuidToString } from './uuid.js';

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
  return out;
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
