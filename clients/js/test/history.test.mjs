// History channels ([[channels]]): positions on events, history(), and recovery on reconnection.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { ErrorCode, MeshError } from '../dist/index.js';
import { closeAllClients, collector, makeClient, recordStates, sleep, startCluster, startNode, stopAllNodes, UUID, waitFor } from './helpers.mjs';

const FAST = { initialDelay: 0.05, maxDelay: 0.2, factor: 2, jitter: 0.2 };

export const HISTORY_CONFIG = `
[[rules]]
match = "*"
anonymous = ["subscribe", "publish"]

[[channels]]
match = "chat.*"
history_size = 2000
recover = true

[[channels]]
match = "small.*"
history_size = 5
recover = true

[[channels]]
match = "norecover.*"
history_size = 100
`;

/**
 * A token callback that blocks reconnections while `gate.closed`: the test drops the client's
 * socket, publishes while the client is away, then opens the gate.
 */
function gated() {
  let open = () => {};
  const gate = {
    closed: false,
    close() {
      gate.closed = true;
      gate.opened = new Promise((r) => (open = r));
    },
    open() {
      gate.closed = false;
      open();
    },
    token: async () => {
      if (gate.closed) await gate.opened;
      return undefined;
    },
  };
  return gate;
}

/** Drop the client's connection from its side (a dead network): the node sees it go, the client gets 1006. */
function dropConnection(client) {
  // The `ws` socket of the current connection (a private field: for tests only).
  client.ws.terminate();
}

const texts = (events) => events.map((e) => e.text());

describe('history channels', () => {
  let node;
  before(async () => {
    node = await startNode({ config: HISTORY_CONFIG });
  });
  after(async () => {
    closeAllClients();
    await stopAllNodes();
  });

  test('events of a history channel carry their position; others none', async () => {
    const c = makeClient({ url: node.url });
    const w = await c.connect();
    const chat = collector();
    const plain = collector();
    await c.subscribe('chat.pos', chat);
    await c.subscribe('plain', plain);
    assert.deepEqual(c.positions('chat.pos'), [], 'a history channel with nothing published yet');
    assert.equal(c.positions('plain'), undefined, 'not a history channel');
    for (const channel of ['chat.pos', 'plain', 'chat.pos']) await c.publish(channel, channel);
    await chat.waitFor(2);
    await plain.waitFor(1);
    const [a, b] = chat.events;
    for (const ev of [a, b]) {
      assert.equal(typeof ev.epoch, 'bigint');
      assert.ok(ev.epoch > 0n);
      assert.deepEqual(ev.position, { node: w.node, epoch: ev.epoch, seq: ev.seq });
      assert.match(ev.position.node, UUID);
      assert.equal(ev.recovered, false);
    }
    assert.equal(a.epoch, b.epoch);
    assert.ok(0n < a.seq && a.seq < b.seq, `${a.seq} < ${b.seq}`);
    const [p] = plain.events;
    assert.equal(p.position, undefined);
    assert.equal(p.epoch, 0n);
    assert.equal(p.seq, 0n);
    assert.deepEqual(c.positions('chat.pos'), [b.position], 'the highest received, per origin');
    await c.unsubscribe('chat.pos');
    assert.equal(c.positions('chat.pos'), undefined, 'unsubscribe forgets the positions');
  });

  test('history(): the latest N, those after positions, and InvalidArgument for a channel without history', async () => {
    const c = makeClient({ url: node.url });
    const w = await c.connect();
    for (let i = 0; i < 10; i++) await c.publish('chat.hist', `m${i}`);
    const latest = await c.history('chat.hist', { limit: 3 });
    assert.deepEqual(texts(latest.events), ['m7', 'm8', 'm9']);
    assert.equal(latest.recovered, false, 'no positions given');
    assert.equal(latest.positions.length, 1);
    const [now] = latest.positions;
    assert.equal(now.node, w.node);
    assert.deepEqual(latest.events[2].position, now);
    const all = await c.history('chat.hist');
    assert.deepEqual(texts(all.events), Array.from({ length: 10 }, (_, i) => `m${i}`));
    assert.ok(all.events.every((e) => e.channel === 'chat.hist' && e.session === w.session && e.position));
    // After the 7th event (numbers as plain numbers are accepted too).
    const seventh = all.events[6].position;
    const since = await c.history('chat.hist', { positions: [{ node: seventh.node, epoch: seventh.epoch, seq: Number(seventh.seq) }] });
    assert.deepEqual(texts(since.events), ['m7', 'm8', 'm9']);
    assert.equal(since.recovered, true);
    const empty = await c.history('chat.nothing-here');
    assert.deepEqual(empty, { events: [], positions: [], recovered: false });
    await assert.rejects(c.history('plain'), (e) => e instanceof MeshError && e.code === ErrorCode.InvalidArgument);
  });

  for (const batch of [true, false]) test(`a dropped connection recovers the 1000 events published meanwhile, once and in order, then live ones (batch ${batch})`, async () => {
    const gate = gated();
    const room = `chat.room-${batch}`;
    const sub = makeClient({ url: node.url, reconnect: FAST, token: gate.token, batch });
    const states = recordStates(sub);
    const errors = [];
    sub.on('error', (e) => errors.push(e));
    const unrecovered = [];
    sub.on('unrecovered', (u) => unrecovered.push(u));
    await sub.connect();
    const h = collector();
    await sub.subscribe(room, h);
    const pub = makeClient({ url: node.url });
    await pub.connect();
    await pub.publish(room, 'before');
    await h.waitFor(1);

    gate.close();
    dropConnection(sub);
    await waitFor(() => sub.state === 'connecting', 'the client to try again');
    const missed = Array.from({ length: 1000 }, (_, i) => `missed ${i}`);
    await Promise.all(missed.map((m) => pub.publish(room, m)));
    assert.equal(h.events.length, 1, 'nothing arrives while away');
    let connectedAt;
    sub.on('state', (s) => {
      if (s.state === 'connected') connectedAt = h.events.length;
    });
    gate.open();
    await waitFor(() => sub.state === 'connected', 'connected again');
    // The replay came before the Ack, so before `connected`.
    assert.equal(connectedAt, 1001);
    await pub.publish(room, 'live 1');
    await pub.publish(room, 'live 2');
    await h.waitFor(1003);
    await sleep(100);
    assert.deepEqual(texts(h.events), ['before', ...missed, 'live 1', 'live 2']);
    assert.deepEqual(h.events.map((e) => e.recovered), [false, ...missed.map(() => true), false, false]);
    const seqs = h.events.map((e) => e.seq);
    assert.ok(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), 'in the order of their numbers');
    assert.deepEqual(sub.positions(room), [h.events.at(-1).position]);
    assert.deepEqual(unrecovered, []);
    assert.deepEqual(errors, []);
    assert.ok(states.some((s) => s.state === 'disconnected' && s.code === 1006));
  });

  test('positions older than the history: unrecovered fires, nothing is replayed, the subscription goes on', async () => {
    const gate = gated();
    const sub = makeClient({ url: node.url, reconnect: FAST, token: gate.token });
    const unrecovered = [];
    const order = [];
    sub.on('unrecovered', (u) => {
      unrecovered.push(u);
      order.push('unrecovered');
    });
    await sub.connect();
    const h = collector();
    await sub.subscribe('small.room', (ev) => {
      order.push(ev.text());
      h(ev);
    });
    const pub = makeClient({ url: node.url });
    await pub.connect();
    await pub.publish('small.room', 'first');
    await h.waitFor(1);
    gate.close();
    dropConnection(sub);
    await waitFor(() => sub.state === 'connecting', 'the client to try again');
    for (let i = 0; i < 20; i++) await pub.publish('small.room', `gone ${i}`); // history_size 5
    gate.open();
    await waitFor(() => sub.state === 'connected', 'connected again');
    assert.deepEqual(unrecovered, [{ channel: 'small.room' }]);
    assert.equal(h.events.length, 1, 'nothing replayed');
    // Positions start again from the Ack: where the channel is now.
    const [now] = sub.positions('small.room');
    const { positions } = await pub.history('small.room', { limit: 1 });
    assert.deepEqual([now], positions);
    await pub.publish('small.room', 'live');
    await h.waitFor(2);
    assert.deepEqual(order, ['first', 'unrecovered', 'live']);
    assert.equal(h.events[1].recovered, false);
    // The next cut is recovered again from the new positions.
    gate.close();
    dropConnection(sub);
    await waitFor(() => sub.state === 'connecting', 'the client to try again');
    await pub.publish('small.room', 'missed');
    gate.open();
    await h.waitFor(3);
    await waitFor(() => sub.state === 'connected', 'connected again');
    assert.deepEqual(texts(h.events), ['first', 'live', 'missed']);
    assert.equal(h.events[2].recovered, true);
    assert.equal(unrecovered.length, 1);
  });

  test('a channel without recover in its options: unrecovered on reconnection', async () => {
    const gate = gated();
    const sub = makeClient({ url: node.url, reconnect: FAST, token: gate.token });
    const unrecovered = [];
    sub.on('unrecovered', (u) => unrecovered.push(u));
    await sub.connect();
    const h = collector();
    await sub.subscribe('norecover.x', h);
    const pub = makeClient({ url: node.url });
    await pub.connect();
    await pub.publish('norecover.x', 'a');
    await h.waitFor(1);
    gate.close();
    dropConnection(sub);
    await waitFor(() => sub.state === 'connecting', 'the client to try again');
    await pub.publish('norecover.x', 'b');
    gate.open();
    await waitFor(() => sub.state === 'connected', 'connected again');
    assert.deepEqual(unrecovered, [{ channel: 'norecover.x' }]);
    await sleep(50);
    assert.deepEqual(texts(h.events), ['a']);
  });

  test('recover: false subscribes again plainly: what was published meanwhile is lost', async () => {
    const gate = gated();
    const sub = makeClient({ url: node.url, reconnect: FAST, token: gate.token, recover: false });
    const unrecovered = [];
    sub.on('unrecovered', (u) => unrecovered.push(u));
    await sub.connect();
    const h = collector();
    await sub.subscribe('chat.plainly', h);
    const pub = makeClient({ url: node.url });
    await pub.connect();
    await pub.publish('chat.plainly', 'a');
    await h.waitFor(1);
    gate.close();
    dropConnection(sub);
    await waitFor(() => sub.state === 'connecting', 'the client to try again');
    await pub.publish('chat.plainly', 'lost');
    gate.open();
    await waitFor(() => sub.state === 'connected', 'connected again');
    await pub.publish('chat.plainly', 'live');
    await h.waitFor(2);
    assert.deepEqual(texts(h.events), ['a', 'live']);
    assert.deepEqual(unrecovered, []);
  });

  test('subscribe() with stored positions (a page reload): the missed events first', async () => {
    const first = makeClient({ url: node.url });
    await first.connect();
    const h1 = collector();
    await first.subscribe('chat.reload', h1);
    await first.publish('chat.reload', 'seen');
    await h1.waitFor(1);
    const stored = first.positions('chat.reload');
    first.close();
    const pub = makeClient({ url: node.url });
    await pub.connect();
    for (const m of ['m1', 'm2']) await pub.publish('chat.reload', m);
    const second = makeClient({ url: node.url });
    await second.connect();
    const h2 = collector();
    await second.subscribe('chat.reload', h2, { positions: stored });
    assert.deepEqual(texts(h2.events), ['m1', 'm2'], 'before subscribe() resolves');
    assert.ok(h2.events.every((e) => e.recovered));
    await pub.publish('chat.reload', 'live');
    await h2.waitFor(3);
    assert.equal(h2.events[2].recovered, false);
  });
});

describe('history channels in a mesh', () => {
  after(async () => {
    closeAllClients();
    await stopAllNodes();
  });

  test("the subscriber's node is killed: it fails over to the publisher's node and recovers there", async () => {
    const [a, b] = await startCluster(2, HISTORY_CONFIG);
    const gate = gated();
    const sub = makeClient({ url: [a.url, b.url], reconnect: FAST, token: gate.token });
    const errors = [];
    sub.on('error', (e) => errors.push(e));
    const unrecovered = [];
    sub.on('unrecovered', (u) => unrecovered.push(u));
    await sub.connect();
    assert.equal(sub.welcome.url, a.url);
    const h = collector();
    await sub.subscribe('chat.mesh', h);
    const pub = makeClient({ url: b.url });
    await pub.connect();
    // Publish until the subscription has reached b (the mesh spreads interest asynchronously).
    await waitFor(async () => {
      await pub.publish('chat.mesh', 'probe');
      await sleep(20);
      return h.events.length > 0;
    }, 'an event from b');
    await pub.publish('chat.mesh', 'before');
    await waitFor(() => h.events.at(-1)?.text() === 'before', "'before'");
    const seen = h.events.length;
    assert.ok(h.events.every((e) => e.node === b.id && !e.recovered));

    gate.close();
    await a.kill('SIGKILL');
    await waitFor(() => sub.state === 'connecting', 'the client to try again');
    const missed = Array.from({ length: 1000 }, (_, i) => `missed ${i}`);
    await Promise.all(missed.map((m) => pub.publish('chat.mesh', m)));
    gate.open();
    await waitFor(() => sub.state === 'connected' && sub.welcome.url === b.url, 'connected to b', 15000);
    await pub.publish('chat.mesh', 'live');
    await h.waitFor(seen + 1001);
    await sleep(100);
    const after = h.events.slice(seen);
    assert.deepEqual(texts(after), [...missed, 'live']);
    assert.deepEqual(after.map((e) => e.recovered), [...missed.map(() => true), false]);
    assert.deepEqual(unrecovered, []);
    assert.deepEqual(errors, []);
  });
});
