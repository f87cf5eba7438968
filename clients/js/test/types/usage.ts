// Type-checked by `npm test` (tsc -p test/types): the API as an application uses it, on Node with `ws`.
import { WebSocket } from 'ws';
import {
  ConnectionClosedError,
  ErrorCode,
  EventType,
  MeshClient,
  MeshError,
  Opcode,
  type HistoryResult,
  type MeshEvent,
  type Position,
  type StateChange,
  type Unrecovered,
  type Welcome,
} from 'meshd-client';

export async function usage(): Promise<void> {
  const client = new MeshClient({
    url: ['ws://127.0.0.1:8765', 'ws://127.0.0.1:8766'],
    token: async () => 'token',
    reconnect: { initialDelay: 0.5, maxDelay: 30, factor: 2, jitter: 0.5 },
    refreshBefore: 60,
    batch: true,
    WebSocket,
    requestTimeout: 30,
  });
  const onState = (s: StateChange): void => {
    const state: 'connecting' | 'connected' | 'disconnected' | 'closed' = s.state;
    void [state, s.code, s.reason, s.url, s.attempt, s.delay];
  };
  client.on('state', onState);
  client.on('welcome', (w: Welcome) => void [w.session, w.node, w.principal, w.maxMessageSize, w.batch, w.url]);
  client.on('error', (e: Error) => void e.message);
  client.off('state', onState);
  const welcome: Welcome = await client.connect();
  void welcome;
  await client.subscribe('chat', (ev: MeshEvent) => {
    const t: number = ev.type;
    const n: string = ev.typeName;
    const d: Uint8Array = ev.data;
    void [t, n, d, ev.channel, ev.watchable?.kind, ev.session, ev.node, ev.text(), ev.json()];
  });
  await client.unsubscribe('chat');
  await client.publish('chat', 'text');
  await client.publish('chat', new Uint8Array([1]), { excludeSelf: true });
  await client.watch('document', '42', (ev) => void ev.watchable?.id);
  await client.unwatch('document', '42');
  const ack = await client.call(Opcode.UserFirst, new Uint8Array([1]));
  const payload: Uint8Array = ack.payload;
  const id: bigint = ack.requestId;
  void [payload, id];
  const rtt: number = await client.ping();
  void rtt;
  void client.state;
  void client.welcome?.session;
  const held: string[] = client.channels;
  void [held, client.watchables[0]?.kind];
  try {
    await client.publish('', 'x');
  } catch (e) {
    if (e instanceof MeshError && e.code === ErrorCode.InvalidChannel) void e.codeName;
    if (e instanceof ConnectionClosedError) void e.code;
  }
  void EventType.ChannelEvent;
  // History channels.
  client.on('unrecovered', (u: Unrecovered) => void u.channel);
  const h: HistoryResult = await client.history('chat.lobby', { limit: 10 });
  const first: MeshEvent | undefined = h.events[0];
  const epoch: bigint | undefined = first?.epoch;
  const seq: bigint | undefined = first?.seq;
  const at: Position | undefined = first?.position;
  const recovered: boolean = h.recovered || (first?.recovered ?? false);
  void [epoch, seq, at?.node, at?.epoch, at?.seq, recovered];
  const now: Position[] = h.positions;
  await client.history('chat.lobby', { positions: [{ node: now[0]!.node, epoch: now[0]!.epoch, seq: 5 }] });
  await client.subscribe('chat.lobby', (ev) => void ev.position, { positions: now });
  const held2: Position[] | undefined = client.positions('chat.lobby');
  void held2;
  new MeshClient({ url: 'ws://127.0.0.1:8765', recover: false });
  client.close();
  // The default WebSocket is globalThis.WebSocket (browsers, Node >= 22).
  new MeshClient({ url: 'ws://127.0.0.1:8765', token: 'static', reconnect: false });
}
