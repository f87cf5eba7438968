import { ErrorCode, EventType, Opcode } from './gen/meshd/fb/client.js';
import { ConnectionClosedError, MeshError, RequestTimeoutError } from './errors.js';
import { decodeFrame, encodeFrame, splitBatch, type InFrame, type OutFrame, type Position } from './frames.js';
import { jwtExpiry } from './jwt.js';

/** The WebSocket subprotocol of meshd client protocol version 1. */
export const SUBPROTOCOL = 'meshd.v1';
/** The protocol version sent in Hello. */
export const PROTOCOL_VERSION = 1;

/** A token, or a function called on every (re)connect and refresh that returns one (undefined: anonymous). */
export type TokenSource = string | (() => string | undefined | Promise<string | undefined>);

export interface ReconnectOptions {
  /** Seconds before the first reconnect attempt (default 0.5). */
  initialDelay?: number;
  /** Largest delay between attempts, in seconds (default 30). */
  maxDelay?: number;
  /** Each failed attempt multiplies the delay by this (default 2). */
  factor?: number;
  /** Random spread of each delay: 0.5 means up to +-50% (default 0.5). */
  jitter?: number;
}

/** What the client uses of a WHATWG-style WebSocket: the browser's, Node 22's, or the `ws` package's. */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol: string;
  binaryType: string;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
}

/** The constructor of a WHATWG-style WebSocket. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface MeshClientOptions {
  /** The node's URL, or several: each reconnect tries the next one in turn. */
  url: string | string[];
  /** Hello token: a string, or a function called on every (re)connect (and for Refresh). */
  token?: TokenSource;
  /** Reconnect with exponential backoff after an unexpected close (default on), or false. */
  reconnect?: ReconnectOptions | false;
  /** Seconds before a JWT's `exp` to get a new token from the callback and send Refresh (default 60). */
  refreshBefore?: number;
  /** Ask the node for Batch frames (default true); they are unpacked into events transparently. */
  batch?: boolean;
  /** The WebSocket class (default `globalThis.WebSocket`); on Node < 22 pass `WebSocket` from `ws`. Typed loosely so that any implementation fits. */
  WebSocket?: unknown;
  /** Seconds a request waits for its answer, reconnection included, before it rejects (default 30). */
  requestTimeout?: number;
  /** Send a protocol Ping this often, in seconds, and reconnect when one is not answered in time (default 0: off). */
  pingInterval?: number;
  /**
   * Recover history channels on every reconnection (default true): subscribe again with
   * `recover` and the positions received, so that the events missed come first. False: subscribe
   * again plainly (events published meanwhile are lost).
   */
  recover?: boolean;
}

export type ConnectionState = 'connecting' | 'connected' | 'disconnected' | 'closed';

export interface StateChange {
  state: ConnectionState;
  /** WebSocket close code (disconnected, closed). */
  code?: number;
  /** WebSocket close reason, or why the client gave up (disconnected, closed). */
  reason?: string;
  /** The URL being connected to (connecting, connected) or that was connected (disconnected). */
  url?: string;
  /** Connection attempt number since the last successful connection, 1 = first (connecting, disconnected). */
  attempt?: number;
  /** Seconds until the next attempt (disconnected). */
  delay?: number;
}

export interface Welcome {
  /** This session's id (a new one on every connection). */
  session: string;
  /** The node's id. */
  node: string;
  /** Who the token proves; the empty string for an anonymous session. */
  principal: string;
  /** Largest message the node accepts, in bytes. */
  maxMessageSize: number;
  /** Whether the node sends Batch frames to this session. */
  batch: boolean;
  /** The URL this session is connected to. */
  url: string;
}

export interface MeshEvent {
  /** The event type (an `EventType` value, or an application's own number). */
  type: number;
  /** `EventType[type]`, or the number as a string for types not in the enum. */
  typeName: string;
  channel?: string;
  watchable?: { kind: string; id: string };
  /** The payload. */
  data: Uint8Array;
  /** The payload decoded as UTF-8. */
  text(): string;
  /** The payload decoded as UTF-8 and parsed as JSON. */
  json(): unknown;
  /** The origin session (the publisher's session id), if any. */
  session?: string;
  /** The origin node. */
  node?: string;
  /** On a history channel: the origin node's incarnation (0n on other channels). */
  epoch: bigint;
  /** On a history channel: the event's number among its origin's events (0n on other channels). */
  seq: bigint;
  /** On a history channel: `{ node, epoch, seq }`; absent on other channels (seq 0). */
  position?: Position;
  /** True for an event replayed by a recovery (sent before the Ack of a Subscribe with `recover`), false for live events. */
  recovered: boolean;
}

/** Options of `subscribe()`. */
export interface SubscribeOptions {
  /**
   * Recover from these positions (for example stored by the application before a page reload):
   * the channel's events after them come first, flagged `recovered`, and `unrecovered` is
   * emitted when the node cannot tell that none is missing. Only used when the channel is not
   * held yet.
   */
  positions?: readonly PositionLike[];
}

/** A position as `history()` and `subscribe()` accept it: `epoch` and `seq` may be numbers. */
export interface PositionLike {
  node: string;
  epoch: bigint | number;
  seq: bigint | number;
}

export interface HistoryOptions {
  /** The latest this many events (the node sends at most 1000). */
  limit?: number;
  /** Only the events after these positions; `recovered` then says whether none is missing. */
  positions?: readonly PositionLike[];
}

export interface HistoryResult {
  /** The events, in the order the node got them (in order per origin). */
  events: MeshEvent[];
  /** Where the channel is now, as this node knows it. */
  positions: Position[];
  /** With `positions`: whether the node can tell that nothing after them is missing (false without `positions`). */
  recovered: boolean;
}

/** What the `unrecovered` listener gets: a history channel whose missed events could not be recovered. */
export interface Unrecovered {
  channel: string;
}

export type EventHandler = (event: MeshEvent) => void;

export interface CallResult {
  /** The Ack's payload (empty when it had none). */
  payload: Uint8Array;
  /** The request id the client chose. */
  requestId: bigint;
}

interface EventMap {
  state: StateChange;
  welcome: Welcome;
  error: Error;
  event: MeshEvent;
  unrecovered: Unrecovered;
}

type Listener<T> = (value: T) => void;

interface Pending {
  resolve: (frame: InFrame) => void;
  reject: (error: Error) => void;
  timer: ReturnType<typeof setTimeout>;
  /** Called synchronously when the request ends: with its Ack, or undefined (Error, timeout, connection lost). */
  onEnd: ((frame: InFrame | undefined) => void) | undefined;
}

interface Waiter {
  /** True for a connect() call, false for a request waiting for the connection. */
  connect: boolean;
  resolve: () => void;
  reject: (error: Error) => void;
}

interface WatchEntry {
  kind: string;
  id: string;
  handlers: Set<EventHandler>;
}

/** Close codes after which the client does not reconnect (see README.md; the same as the Python clients). */
const NO_RETRY_CODES = new Set([1002, 1003, 4003, 4006]);
/** The session's token expired: reconnect only when the token callback can give a new one. */
const TOKEN_EXPIRED = 4005;
/** Seconds of random wait, at most, before reconnecting after a drain (4007). */
const DRAIN_JITTER = 0.2;
/** Close codes after which the client reconnects at once (with a little jitter), to the next URL. */
const AT_ONCE_CODES = new Set([1000, 4007]);

const encoder = new TextEncoder();
const decoder = new TextDecoder();

class MeshEventImpl implements MeshEvent {
  type: number;
  typeName: string;
  channel?: string;
  watchable?: { kind: string; id: string };
  data: Uint8Array;
  session?: string;
  node?: string;
  epoch: bigint;
  seq: bigint;
  position?: Position;
  recovered = false;

  constructor(f: InFrame) {
    this.type = f.eventType;
    this.typeName = (EventType as unknown as Record<number, string | undefined>)[f.eventType] ?? String(f.eventType);
    if (f.channel !== undefined) this.channel = f.channel;
    if (f.watchable !== undefined) this.watchable = f.watchable;
    this.data = f.payload ?? new Uint8Array(0);
    if (f.session !== undefined) this.session = f.session;
    if (f.node !== undefined) this.node = f.node;
    this.epoch = f.epoch;
    this.seq = f.seq;
    if (f.seq > 0n && f.node !== undefined) this.position = { node: f.node, epoch: f.epoch, seq: f.seq };
  }

  text(): string {
    return decoder.decode(this.data);
  }

  json(): unknown {
    return JSON.parse(this.text());
  }
}

function positionKey(node: string, epoch: bigint): string {
  return `${node}/${epoch}`;
}

function toPositions(list: readonly PositionLike[]): Position[] {
  const big = (n: bigint | number, what: string): bigint => {
    // An epoch is a random 64-bit number: as a JavaScript number it has most likely lost digits.
    if (typeof n === 'number' && !Number.isSafeInteger(n)) throw new RangeError(`position: ${what} ${n} is not a safe integer: pass a bigint`);
    const v = BigInt(n);
    if (v < 0n || v >= 1n << 64n) throw new RangeError(`position: ${what} ${v} is not an unsigned 64-bit number`);
    return v;
  };
  return list.map((p) => ({ node: p.node, epoch: big(p.epoch, 'epoch'), seq: big(p.seq, 'seq') }));
}

function watchKey(kind: string, id: string): string {
  return JSON.stringify([kind, id]);
}

function toBytes(data: string | Uint8Array): Uint8Array {
  return typeof data === 'string' ? encoder.encode(data) : data;
}

/**
 * A meshd client session that reconnects by itself. See README.md for the semantics.
 */
export class MeshClient {
  private readonly urls: string[];
  private readonly tokenSource?: TokenSource;
  private readonly reconnectOptions: Required<ReconnectOptions> | false;
  private readonly refreshBefore: number;
  private readonly wantBatch: boolean;
  private readonly WS: WebSocketConstructor;
  private readonly requestTimeout: number;
  private readonly pingInterval: number;
  private readonly recover: boolean;

  private readonly listeners = new Map<keyof EventMap, Set<Listener<never>>>();
  private readonly subscriptions = new Map<string, Set<EventHandler>>();
  private readonly watches = new Map<string, WatchEntry>();
  private readonly pending = new Map<bigint, Pending>();
  /**
   * Per history channel held (its last Subscribe Ack had `positions`): per origin node and
   * epoch, the highest position received (or where the channel was at the Ack).
   */
  private readonly positionsOf = new Map<string, Map<string, Position>>();
  /** Channels whose Subscribe with `recover` is waiting for its Ack: their events meanwhile are the replay. */
  private readonly replaying = new Set<string>();
  private waiters: Waiter[] = [];

  private ws: WebSocketLike | undefined;
  /** Bumped whenever a connection is abandoned, so late callbacks of old sockets are ignored. */
  private generation = 0;
  private started = false;
  /** The current connection has been welcomed (its subscriptions may be being restored). */
  private welcomed = false;
  private failures = 0;
  private urlIndex = -1;
  private nextRequestId = 1n;
  private currentUrl: string | undefined;
  private _state: ConnectionState = 'disconnected';
  private _welcome: Welcome | undefined;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private pingTimer: ReturnType<typeof setInterval> | undefined;

  constructor(options: MeshClientOptions) {
    this.urls = Array.isArray(options.url) ? [...options.url] : [options.url];
    if (this.urls.length === 0 || !this.urls.every((u) => typeof u === 'string' && u.length > 0)) {
      throw new TypeError('MeshClient: url must be a URL or a non-empty list of URLs');
    }
    this.tokenSource = options.token;
    this.reconnectOptions =
      options.reconnect === false
        ? false
        : {
            initialDelay: options.reconnect?.initialDelay ?? 0.5,
            maxDelay: options.reconnect?.maxDelay ?? 30,
            factor: options.reconnect?.factor ?? 2,
            jitter: options.reconnect?.jitter ?? 0.5,
          };
    this.refreshBefore = options.refreshBefore ?? 60;
    this.wantBatch = options.batch ?? true;
    const WS = (options.WebSocket ?? (globalThis as { WebSocket?: unknown }).WebSocket) as WebSocketConstructor | undefined;
    if (typeof WS !== 'function') {
      throw new TypeError("MeshClient: no WebSocket class: on Node < 22 pass { WebSocket } from the 'ws' package");
    }
    this.WS = WS;
    this.requestTimeout = options.requestTimeout ?? 30;
    this.pingInterval = options.pingInterval ?? 0;
    this.recover = options.recover ?? true;
  }

  /** The connection state. */
  get state(): ConnectionState {
    return this._state;
  }

  /** The last Welcome received (it stays after a disconnect), or undefined. */
  get welcome(): Welcome | undefined {
    return this._welcome;
  }

  /** The channels the client holds (subscribed, or being subscribed), restored on every reconnection. */
  get channels(): string[] {
    return [...this.subscriptions.keys()];
  }

  /**
   * The positions held for a history channel (per origin node and epoch, the highest received),
   * as a reconnection would send them; undefined for a channel that is not held or keeps no history.
   */
  positions(channel: string): Position[] | undefined {
    const at = this.positionsOf.get(channel);
    return at ? [...at.values()].map((p) => ({ ...p })) : undefined;
  }

  /** The watchables the client holds, restored on every reconnection. */
  get watchables(): { kind: string; id: string }[] {
    return [...this.watches.values()].map((w) => ({ kind: w.kind, id: w.id }));
  }

  on<K extends keyof EventMap>(name: K, fn: Listener<EventMap[K]>): this {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(fn as Listener<never>);
    return this;
  }

  off<K extends keyof EventMap>(name: K, fn: Listener<EventMap[K]>): this {
    this.listeners.get(name)?.delete(fn as Listener<never>);
    return this;
  }

  private emit<K extends keyof EventMap>(name: K, value: EventMap[K]): void {
    const set = this.listeners.get(name);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        (fn as Listener<EventMap[K]>)(value);
      } catch (error) {
        if (name !== 'error') this.emit('error', error instanceof Error ? error : new Error(String(error)));
      }
    }
  }

  private setState(change: StateChange): void {
    this._state = change.state;
    this.emit('state', change);
  }

  /**
   * Connect (if not connected or connecting already) and resolve with the Welcome once the
   * session is ready. Rejects when the client gives up: the Hello is refused
   * (AuthenticationFailed, UnsupportedVersion), a close code that stops reconnecting, a
   * failure with `reconnect: false`, or `close()`.
   */
  connect(): Promise<Welcome> {
    if (this._state === 'connected' && this._welcome) return Promise.resolve(this._welcome);
    const ready = new Promise<Welcome>((resolve, reject) => {
      this.waiters.push({ connect: true, resolve: () => resolve(this._welcome!), reject });
    });
    if (!this.started) {
      this.started = true;
      this.failures = 0;
      void this.open();
    }
    return ready;
  }

  /** Close the connection and stop reconnecting. Pending requests reject with ConnectionClosedError. */
  close(): void {
    const wasOpen = this.started || this.ws !== undefined;
    this.stop(new ConnectionClosedError('closed by the client', 1000, 'closed by the client'));
    this.dropSocket(1000, 'client closing');
    if (wasOpen || this._state !== 'closed') this.setState({ state: 'closed', code: 1000, reason: 'closed by the client' });
  }

  /** Subscribe to `channel` and call `handler` with its events; resolves on the node's Ack. */
  async subscribe(channel: string, handler: EventHandler, options: SubscribeOptions = {}): Promise<void> {
    if (typeof channel !== 'string') throw new TypeError('subscribe: channel must be a string');
    if (typeof handler !== 'function') throw new TypeError('subscribe: handler must be a function');
    const positions = options.positions !== undefined ? toPositions(options.positions) : undefined;
    let set = this.subscriptions.get(channel);
    const out: OutFrame = { opcode: Opcode.Subscribe, channel };
    if (!set) {
      this.subscriptions.set(channel, (set = new Set()));
      if (positions !== undefined) {
        out.recover = true;
        out.positions = positions;
      }
    }
    set.add(handler);
    const held = set;
    try {
      await this.request(out, (f) => {
        if (f && this.subscriptions.get(channel) === held) this.subscribed(channel, f, out.recover === true);
      });
    } catch (error) {
      const now = this.subscriptions.get(channel);
      if (now) {
        now.delete(handler);
        if (now.size === 0) this.forget(channel);
      }
      throw error;
    }
  }

  /**
   * Read what a history channel keeps on the node, without subscribing: the latest `limit`
   * events, or those after `positions`. Rejects with MeshError `InvalidArgument` when the channel
   * keeps no history.
   */
  async history(channel: string, options: HistoryOptions = {}): Promise<HistoryResult> {
    if (typeof channel !== 'string') throw new TypeError('history: channel must be a string');
    const out: OutFrame = { opcode: Opcode.History, channel };
    if (options.limit !== undefined) {
      if (!Number.isInteger(options.limit) || options.limit < 1 || options.limit > 0xffffffff) {
        throw new RangeError('history: limit must be a positive integer');
      }
      out.limit = options.limit;
    }
    if (options.positions !== undefined) out.positions = toPositions(options.positions);
    const f = await this.request(out);
    const events = splitBatch(f.payload ?? new Uint8Array(0)).map((entry) => new MeshEventImpl(decodeFrame(entry)));
    return { events, positions: f.positions ?? [], recovered: f.recovered };
  }

  /** A Subscribe of `channel` was acknowledged (synchronously, before any later frame is handled). */
  private subscribed(channel: string, f: InFrame, recovering: boolean): void {
    const unrecovered = recovering && !f.recovered;
    if (f.positions === undefined) {
      this.positionsOf.delete(channel); // the channel keeps no history (here)
    } else {
      let at = this.positionsOf.get(channel);
      if (!at || unrecovered) this.positionsOf.set(channel, (at = new Map()));
      for (const p of f.positions) {
        const key = positionKey(p.node, p.epoch);
        const had = at.get(key);
        if (!had || had.seq < p.seq) at.set(key, p);
      }
    }
    if (unrecovered) this.emit('unrecovered', { channel });
  }

  /** The channel is no longer held: no handlers, no positions. */
  private forget(channel: string): void {
    this.subscriptions.delete(channel);
    this.positionsOf.delete(channel);
  }

  /**
   * Stop receiving `channel`'s events: with `handler`, only that handler is removed (the
   * channel stays subscribed while it has others). Resolves at once when not connected.
   */
  async unsubscribe(channel: string, handler?: EventHandler): Promise<void> {
    const set = this.subscriptions.get(channel);
    if (set && handler) {
      set.delete(handler);
      if (set.size > 0) return;
    }
    this.forget(channel);
    if (!this.welcomed) return;
    await this.send({ opcode: Opcode.Unsubscribe, channel }, Date.now() + this.requestTimeout * 1000);
  }

  /** Publish `data` (a string is sent as UTF-8) on `channel`; resolves on the node's Ack. */
  async publish(channel: string, data: string | Uint8Array, options: { excludeSelf?: boolean } = {}): Promise<void> {
    if (typeof channel !== 'string') throw new TypeError('publish: channel must be a string');
    await this.request({ opcode: Opcode.Publish, channel, payload: toBytes(data), excludeSelf: options.excludeSelf === true });
  }

  /** Watch the resource `kind`/`id` and call `handler` with its events; resolves on the node's Ack. */
  async watch(kind: string, id: string, handler: EventHandler): Promise<void> {
    if (typeof kind !== 'string' || typeof id !== 'string') throw new TypeError('watch: kind and id must be strings');
    if (typeof handler !== 'function') throw new TypeError('watch: handler must be a function');
    const key = watchKey(kind, id);
    let entry = this.watches.get(key);
    if (!entry) this.watches.set(key, (entry = { kind, id, handlers: new Set() }));
    entry.handlers.add(handler);
    try {
      await this.request({ opcode: Opcode.Watch, watchable: { kind, id } });
    } catch (error) {
      const now = this.watches.get(key);
      if (now) {
        now.handlers.delete(handler);
        if (now.handlers.size === 0) this.watches.delete(key);
      }
      throw error;
    }
  }

  /** Stop watching `kind`/`id` (or remove only `handler`); resolves at once when not connected. */
  async unwatch(kind: string, id: string, handler?: EventHandler): Promise<void> {
    const key = watchKey(kind, id);
    const entry = this.watches.get(key);
    if (entry && handler) {
      entry.handlers.delete(handler);
      if (entry.handlers.size > 0) return;
    }
    this.watches.delete(key);
    if (!this.welcomed) return;
    await this.send({ opcode: Opcode.Unwatch, watchable: { kind, id } }, Date.now() + this.requestTimeout * 1000);
  }

  /**
   * Send a request with a user opcode (1024..65535, handled by a server extension) and resolve
   * with the Ack's payload; rejects with MeshError (e.g. UnknownOpcode when no extension handles it).
   */
  async call(
    opcode: number,
    payload?: Uint8Array,
    fields: { channel?: string; watchable?: { kind: string; id: string } } = {},
  ): Promise<CallResult> {
    if (!Number.isInteger(opcode) || opcode < 0 || opcode > 0xffff) throw new RangeError('call: opcode must be an integer 0..65535');
    const out: OutFrame = { opcode };
    if (payload !== undefined) out.payload = payload;
    if (fields.channel !== undefined) out.channel = fields.channel;
    if (fields.watchable !== undefined) out.watchable = fields.watchable;
    const f = await this.request(out);
    return { payload: f.payload ?? new Uint8Array(0), requestId: f.requestId };
  }

  /** Send a protocol Ping and resolve with the round-trip time in milliseconds when the Pong arrives. */
  async ping(payload?: Uint8Array): Promise<number> {
    const started = Date.now();
    const out: OutFrame = { opcode: Opcode.Ping };
    if (payload !== undefined) out.payload = payload;
    await this.request(out);
    return Date.now() - started;
  }

  // ---- requests -------------------------------------------------------------------------

  /** Send a user request once connected (waiting for a reconnection if need be) and wait for its answer. */
  private async request(out: OutFrame, onEnd?: (frame: InFrame | undefined) => void): Promise<InFrame> {
    const deadline = Date.now() + this.requestTimeout * 1000;
    if (this._state !== 'connected') await this.whenConnected(deadline, out.opcode);
    return this.send(out, deadline, onEnd);
  }

  private whenConnected(deadline: number, opcode: number): Promise<void> {
    if (!this.started) {
      return Promise.reject(new ConnectionClosedError(this._state === 'closed' ? 'the client is closed' : 'not connected: call connect() first'));
    }
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        reject(new RequestTimeoutError(`${opcodeName(opcode)}: not connected within ${this.requestTimeout} s`));
      }, Math.max(0, deadline - Date.now()));
      const waiter: Waiter = {
        connect: false,
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      };
      this.waiters.push(waiter);
    });
  }

  /** Send one request on the current socket and wait for the answer with its request id. */
  private send(out: OutFrame, deadline: number, onEnd?: (frame: InFrame | undefined) => void): Promise<InFrame> {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) return Promise.reject(new ConnectionClosedError('not connected'));
    // The events of a recovering channel that arrive before the Ack are the replay.
    const replay = out.opcode === Opcode.Subscribe && out.recover === true && out.channel !== undefined ? out.channel : undefined;
    if (replay !== undefined) {
      const inner = onEnd;
      this.replaying.add(replay);
      onEnd = (f) => {
        this.replaying.delete(replay);
        inner?.(f);
      };
    }
    const requestId = this.nextRequestId++;
    const bytes = encodeFrame({ ...out, requestId });
    const limit = this._welcome?.maxMessageSize;
    if (limit && bytes.length > limit) {
      onEnd?.(undefined);
      return Promise.reject(new RangeError(`${opcodeName(out.opcode)}: a message of ${bytes.length} bytes is over the node's limit of ${limit} bytes`));
    }
    return new Promise<InFrame>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(requestId);
        onEnd?.(undefined);
        reject(new RequestTimeoutError(`${opcodeName(out.opcode)}: no answer within ${this.requestTimeout} s`));
      }, Math.max(0, deadline - Date.now()));
      this.pending.set(requestId, { resolve, reject, timer, onEnd });
      try {
        ws.send(bytes);
      } catch (error) {
        clearTimeout(timer);
        this.pending.delete(requestId);
        onEnd?.(undefined);
        reject(new ConnectionClosedError(`send failed: ${String(error)}`));
      }
    });
  }

  private rejectPending(error: Error): void {
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.onEnd?.(undefined);
      p.reject(error);
    }
  }

  // ---- connection -----------------------------------------------------------------------

  private async resolveToken(): Promise<string | undefined> {
    const source = this.tokenSource;
    return typeof source === 'function' ? await source() : source;
  }

  private async open(): Promise<void> {
    const generation = ++this.generation;
    this.urlIndex = (this.urlIndex + 1) % this.urls.length;
    const url = this.urls[this.urlIndex]!;
    this.currentUrl = url;
    this.failures += 1;
    this.setState({ state: 'connecting', url, attempt: this.failures });
    let token: string | undefined;
    try {
      token = await this.resolveToken();
    } catch (error) {
      if (generation !== this.generation) return;
      this.emit('error', new Error(`the token callback failed: ${String(error)}`));
      this.lost(generation, 1006, 'the token callback failed');
      return;
    }
    if (generation !== this.generation) return;
    let ws: WebSocketLike;
    try {
      ws = new this.WS(url, [SUBPROTOCOL]);
    } catch (error) {
      // An invalid URL: retrying cannot help.
      this.fail(error instanceof Error ? error : new Error(String(error)), undefined, `cannot connect to ${url}`);
      return;
    }
    this.ws = ws;
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => {
      if (generation !== this.generation) return;
      if (ws.protocol !== SUBPROTOCOL) {
        this.dropSocket(1000, 'wrong subprotocol');
        this.lost(generation, 1006, `the server did not select the ${SUBPROTOCOL} subprotocol`);
        return;
      }
      void this.hello(generation, url, token);
    };
    ws.onmessage = (event) => {
      if (generation === this.generation) this.onMessage(event.data);
    };
    ws.onclose = (event) => {
      if (generation !== this.generation) return;
      this.ws = undefined;
      this.lost(generation, event.code, event.reason);
    };
    ws.onerror = () => {
      // A close event follows.
    };
  }

  private async hello(generation: number, url: string, token: string | undefined): Promise<void> {
    const out: OutFrame = { opcode: Opcode.Hello, version: PROTOCOL_VERSION, batch: this.wantBatch };
    if (token !== undefined) out.token = token;
    let f: InFrame;
    try {
      f = await this.send(out, Date.now() + this.requestTimeout * 1000);
    } catch (error) {
      if (generation !== this.generation) return;
      if (error instanceof MeshError && (error.code === ErrorCode.AuthenticationFailed || error.code === ErrorCode.UnsupportedVersion)) {
        this.fail(error, undefined, `Hello refused: ${error.codeName}: ${error.message}`);
      } else if (!(error instanceof ConnectionClosedError)) {
        // No Welcome in time, or another error: try again.
        this.dropSocket(1000, 'no Welcome');
        this.lost(generation, 1006, `Hello failed: ${error instanceof Error ? error.message : String(error)}`);
      }
      return;
    }
    if (generation !== this.generation) return;
    const welcome: Welcome = {
      session: f.session ?? '',
      node: f.node ?? '',
      principal: f.principal ?? '',
      maxMessageSize: f.maxMessageSize,
      batch: f.batch,
      url,
    };
    this._welcome = welcome;
    this.welcomed = true;
    this.emit('welcome', welcome);
    if (token !== undefined) this.scheduleRefresh(generation, token);
    if (this.pingInterval > 0) {
      this.pingTimer = setInterval(() => this.keepAlive(generation), this.pingInterval * 1000);
    }
    await this.restore(generation);
    if (generation !== this.generation) return;
    this.failures = 0;
    this.setState({ state: 'connected', url });
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w.resolve();
  }

  /** Subscribe and watch again everything that was active, after a new Welcome. */
  private async restore(generation: number): Promise<void> {
    const deadline = Date.now() + this.requestTimeout * 1000;
    const jobs: Promise<void>[] = [];
    for (const [channel, handlers] of this.subscriptions) {
      const out: OutFrame = { opcode: Opcode.Subscribe, channel };
      const at = this.recover ? this.positionsOf.get(channel) : undefined;
      if (at) {
        // A history channel: ask for what was missed since the positions received.
        out.recover = true;
        out.positions = [...at.values()];
      }
      const onAck = (f: InFrame | undefined): void => {
        if (f && generation === this.generation && this.subscriptions.get(channel) === handlers) this.subscribed(channel, f, at !== undefined);
      };
      jobs.push(
        this.send(out, deadline, onAck).then(
          () => undefined,
          (error: Error) => {
            if (generation !== this.generation || error instanceof ConnectionClosedError) return;
            if (this.subscriptions.get(channel) === handlers) this.forget(channel);
            this.emit('error', wrap(error, `resubscribing to channel ${JSON.stringify(channel)} failed`));
          },
        ),
      );
    }
    for (const [key, entry] of this.watches) {
      jobs.push(
        this.send({ opcode: Opcode.Watch, watchable: { kind: entry.kind, id: entry.id } }, deadline).then(
          () => undefined,
          (error: Error) => {
            if (generation !== this.generation || error instanceof ConnectionClosedError) return;
            if (this.watches.get(key) === entry) this.watches.delete(key);
            this.emit('error', wrap(error, `watching ${entry.kind}/${entry.id} again failed`));
          },
        ),
      );
    }
    await Promise.all(jobs);
  }

  /** The connection `generation` is gone (closed by the node, or failed): reconnect or give up. */
  private lost(generation: number, code: number, reason: string): void {
    if (generation !== this.generation) return;
    this.generation++;
    this.endSession();
    const url = this.currentUrl;
    this.rejectPending(new ConnectionClosedError(`the connection closed (${code}${reason ? ` ${reason}` : ''})`, code, reason));
    if (!this.started) return;
    if (NO_RETRY_CODES.has(code) || (code === TOKEN_EXPIRED && typeof this.tokenSource !== 'function')) {
      this.fail(new ConnectionClosedError(`the node closed the connection with ${code}${reason ? ` (${reason})` : ''}: not reconnecting`, code, reason), code, reason);
      return;
    }
    const options = this.reconnectOptions;
    if (options === false) {
      this.fail(new ConnectionClosedError(`the connection closed (${code}${reason ? ` ${reason}` : ''}) and reconnect is off`, code, reason), code, reason);
      return;
    }
    let delay: number;
    if (AT_ONCE_CODES.has(code)) {
      // The node is draining: go to the next node now, with a little jitter.
      delay = Math.random() * Math.min(DRAIN_JITTER, options.maxDelay);
    } else {
      const base = Math.min(options.maxDelay, options.initialDelay * Math.pow(options.factor, this.failures));
      delay = Math.max(0, base * (1 + options.jitter * (2 * Math.random() - 1)));
    }
    const change: StateChange = { state: 'disconnected', code, reason, attempt: this.failures + 1, delay };
    if (url !== undefined) change.url = url;
    this.setState(change);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      if (this.started) void this.open();
    }, delay * 1000);
  }

  /** Give up: state `closed`; connect() promises reject with `error`. */
  private fail(error: Error, code: number | undefined, reason: string): void {
    const hadWaiters = this.waiters.some((w) => w.connect);
    this.stop(error);
    this.dropSocket(1000, 'client giving up');
    const change: StateChange = { state: 'closed', reason };
    if (code !== undefined) change.code = code;
    this.setState(change);
    if (!hadWaiters) this.emit('error', error);
  }

  private stop(error: Error): void {
    this.started = false;
    this.generation++;
    this.endSession();
    if (this.reconnectTimer !== undefined) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    this.rejectPending(error instanceof ConnectionClosedError ? error : new ConnectionClosedError(error.message));
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w.reject(w.connect ? error : new ConnectionClosedError(error.message));
  }

  private dropSocket(code: number, reason: string): void {
    const ws = this.ws;
    this.ws = undefined;
    if (!ws) return;
    ws.onopen = null;
    ws.onmessage = null;
    ws.onclose = null;
    ws.onerror = () => {};
    try {
      ws.close(code, reason);
    } catch {
      // Already closed or closing.
    }
  }

  /** The current session is over: no more refresh or keep-alive for it. */
  private endSession(): void {
    this.welcomed = false;
    this.replaying.clear();
    if (this.refreshTimer !== undefined) clearTimeout(this.refreshTimer);
    if (this.pingTimer !== undefined) clearInterval(this.pingTimer);
    this.refreshTimer = undefined;
    this.pingTimer = undefined;
  }

  private keepAlive(generation: number): void {
    if (generation !== this.generation || this._state !== 'connected') return;
    this.send({ opcode: Opcode.Ping }, Date.now() + this.requestTimeout * 1000).catch((error: unknown) => {
      if (generation !== this.generation || !(error instanceof RequestTimeoutError)) return;
      this.dropSocket(1000, 'ping timeout');
      this.lost(generation, 1006, 'no Pong in time');
    });
  }

  // ---- token refresh ----------------------------------------------------------------------

  /**
   * Refresh `refreshBefore` seconds before the token's `exp`, or halfway through what is left
   * of a shorter token's life. `minDelay` keeps a token source that returns a token expiring
   * no later than the last one from making a tight loop.
   */
  private scheduleRefresh(generation: number, token: string, minDelay = 0): void {
    if (typeof this.tokenSource !== 'function') return;
    const exp = jwtExpiry(token);
    if (exp === undefined) return;
    const left = exp - Date.now() / 1000;
    const delay = Math.max(minDelay, left - Math.min(this.refreshBefore, left / 2));
    if (this.refreshTimer !== undefined) clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = undefined;
      void this.refresh(generation, exp);
    }, delay * 1000);
  }

  private async refresh(generation: number, oldExp: number): Promise<void> {
    let token: string | undefined;
    try {
      token = await this.resolveToken();
    } catch (error) {
      if (generation === this.generation) this.emit('error', new Error(`token refresh: the token callback failed: ${String(error)}`));
      return;
    }
    if (generation !== this.generation) return;
    if (token === undefined) {
      this.emit('error', new Error('token refresh: the token callback returned no token'));
      return;
    }
    try {
      await this.send({ opcode: Opcode.Refresh, token }, Date.now() + this.requestTimeout * 1000);
    } catch (error) {
      if (generation === this.generation && !(error instanceof ConnectionClosedError)) {
        this.emit('error', wrap(error as Error, 'token refresh failed'));
      }
      return;
    }
    if (generation !== this.generation) return;
    const exp = jwtExpiry(token);
    // Not a JWT: the new token does not expire, nothing more to do. A token that expires no
    // later than the old one is refreshed again after a second at the earliest.
    if (exp !== undefined) this.scheduleRefresh(generation, token, exp > oldExp ? 0 : 1);
  }

  // ---- incoming -------------------------------------------------------------------------

  private onMessage(data: unknown): void {
    let bytes: Uint8Array;
    if (data instanceof ArrayBuffer) bytes = new Uint8Array(data);
    else if (ArrayBuffer.isView(data)) bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    else return; // text messages are not part of meshd.v1
    let f: InFrame;
    try {
      f = decodeFrame(bytes);
    } catch (error) {
      this.emit('error', wrap(error as Error, 'undecodable message from the node'));
      return;
    }
    switch (f.opcode) {
      case Opcode.Event:
        this.deliver(f);
        break;
      case Opcode.Batch:
        try {
          for (const entry of splitBatch(f.payload ?? new Uint8Array(0))) {
            const e = decodeFrame(entry);
            if (e.opcode === Opcode.Event) this.deliver(e);
          }
        } catch (error) {
          this.emit('error', wrap(error as Error, 'bad Batch frame'));
        }
        break;
      case Opcode.Welcome:
      case Opcode.Ack:
      case Opcode.Pong: {
        const p = this.pending.get(f.requestId);
        if (p) {
          this.pending.delete(f.requestId);
          clearTimeout(p.timer);
          p.onEnd?.(f);
          p.resolve(f);
        }
        break;
      }
      case Opcode.Error: {
        const error = new MeshError(f.errorCode, f.message ?? '', f.requestId);
        const p = f.requestId !== 0n ? this.pending.get(f.requestId) : undefined;
        if (p) {
          this.pending.delete(f.requestId);
          clearTimeout(p.timer);
          p.onEnd?.(undefined);
          p.reject(error);
        } else {
          this.emit('error', error);
        }
        break;
      }
      default:
        break; // frames with other opcodes are ignored
    }
  }

  private deliver(f: InFrame): void {
    const event = new MeshEventImpl(f);
    const channel = event.channel;
    if (channel !== undefined) {
      if (this.replaying.has(channel)) event.recovered = true;
      const position = event.position;
      const at = position ? this.positionsOf.get(channel) : undefined;
      if (position && at) {
        const key = positionKey(position.node, position.epoch);
        const had = at.get(key);
        if (!had || had.seq < position.seq) at.set(key, position);
      }
    }
    const handlers = new Set<EventHandler>();
    if (event.channel !== undefined) for (const h of this.subscriptions.get(event.channel) ?? []) handlers.add(h);
    if (event.watchable !== undefined) {
      for (const h of this.watches.get(watchKey(event.watchable.kind, event.watchable.id))?.handlers ?? []) handlers.add(h);
    }
    for (const h of handlers) {
      try {
        h(event);
      } catch (error) {
        this.emit('error', error instanceof Error ? error : new Error(String(error)));
      }
    }
    this.emit('event', event);
  }
}

function opcodeName(opcode: number): string {
  return (Opcode as unknown as Record<number, string | undefined>)[opcode] ?? `opcode ${opcode}`;
}

function wrap(error: Error, context: string): Error {
  if (error instanceof MeshError) {
    return new MeshError(error.code, `${context}: ${error.codeName}: ${error.message}`, error.requestId);
  }
  const wrapped = new Error(`${context}: ${error.message}`);
  (wrapped as { cause?: unknown }).cause = error;
  return wrapped;
}
