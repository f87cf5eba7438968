// A development node (no configuration file): every operation is allowed, any token accepted.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { WebSocket } from 'ws';
import { ConnectionClosedError, decodeFrame, ErrorCode, EventType, MeshError, Opcode } from '../dist/index.js';
import { closeAllClients, collector, makeClient, recordStates, REPO, startNode, stopAllNodes, UUID, waitFor } from './helpers.mjs';

describe('a development node', () => {
  let node;
  before(async () => {
    node = await startNode();
  });
  after(async () => {
    closeAllClients();
    await stopAllNodes();
  });

  test('connect() resolves with the Welcome', async () => {
    const c = makeClient({ url: node.url, token: 'alice' });
    const states = recordStates(c);
    const welcomes = [];
    c.on('welcome', (w) => welcomes.push(w));
    assert.equal(c.state, 'disconnected');
    assert.equal(c.welcome, undefined);
    const w = await c.connect();
    assert.match(w.session, UUID);
    assert.match(w.node, UUID);
    assert.equal(typeof w.principal, 'string');
    assert.equal(w.principal, 'dev', 'a development node accepts any token as principal dev');
    assert.equal(w.maxMessageSize, 65536);
    assert.equal(w.batch, true);
    assert.equal(w.url, node.url);
    assert.equal(c.state, 'connected');
    assert.deepEqual(c.welcome, w);
    assert.deepEqual(welcomes, [w]);
    assert.deepEqual(states.names(), ['connecting', 'connected']);
    assert.equal(states[0].url, node.url);
    assert.equal(states[0].attempt, 1);
    // connect() again while connected gives the same Welcome.
    assert.deepEqual(await c.connect(), w);

    const anon = makeClient({ url: node.url, batch: false });
    const wa = await anon.connect();
    assert.equal(wa.principal, '', 'an anonymous session has no principal');
    assert.equal(wa.batch, false);
    assert.equal(wa.node, w.node);
    assert.notEqual(wa.session, w.session);
  });

  test('publish and receive text, binary and JSON; excludeSelf', async () => {
    const a = makeClient({ url: node.url });
    const b = makeClient({ url: node.url });
    await Promise.all([a.connect(), b.connect()]);
    const ea = collector();
    const eb = collector();
    await a.subscribe('chat', ea);
    await b.subscribe('chat', eb);

    await b.publish('chat', 'hi ✓');
    await ea.waitFor(1);
    // The publisher's own Event arrives before its Ack.
    assert.equal(eb.events.length, 1);
    const ev = ea.events[0];
    assert.equal(ev.type, EventType.ChannelEvent);
    assert.equal(ev.typeName, 'ChannelEvent');
    assert.equal(ev.channel, 'chat');
    assert.equal(ev.watchable, undefined);
    assert.equal(ev.text(), 'hi ✓');
    assert.ok(ev.data instanceof Uint8Array);
    assert.equal(ev.session, b.welcome.session);
    assert.equal(ev.node, b.welcome.node);

    await a.publish('chat', new Uint8Array([0, 1, 2, 255]));
    await ea.waitFor(2);
    await eb.waitFor(2);
    assert.deepEqual([...ea.events[1].data], [0, 1, 2, 255]);
    assert.deepEqual([...eb.events[1].data], [0, 1, 2, 255]);
    assert.equal(eb.events[1].session, a.welcome.session);

    await a.publish('chat', JSON.stringify({ n: 1 }));
    await eb.waitFor(3);
    assert.deepEqual(eb.events[2].json(), { n: 1 });

    await a.publish('chat', 'not to me', { excludeSelf: true });
    await eb.waitFor(4);
    assert.equal(eb.events[3].text(), 'not to me');
    await a.ping(); // everything sent to `a` before the Pong has arrived
    assert.equal(ea.events.length, 3, 'excludeSelf: the publisher does not get its own event');
  });

  test('unsubscribe stops events', async () => {
    const a = makeClient({ url: node.url });
    const b = makeClient({ url: node.url });
    await Promise.all([a.connect(), b.connect()]);
    const ea = collector();
    await a.subscribe('news', ea);
    await b.publish('news', 'one');
    await ea.waitFor(1);
    await a.unsubscribe('news');
    await b.publish('news', 'two');
    await b.ping();
    await a.ping();
    assert.deepEqual(ea.events.map((e) => e.text()), ['one']);
    // Unsubscribing from a channel one does not hold is fine.
    await a.unsubscribe('never-subscribed');
  });

  test('errors reject with MeshError and leave the session usable', async () => {
    const c = makeClient({ url: node.url });
    await c.connect();
    const errors = [];
    c.on('error', (e) => errors.push(e));
    await assert.rejects(c.publish('', 'x'), (e) => {
      assert.ok(e instanceof MeshError);
      assert.equal(e.code, ErrorCode.InvalidChannel);
      assert.equal(e.codeName, 'InvalidChannel');
      assert.ok(e.message.length > 0);
      return true;
    });
    await assert.rejects(c.subscribe('bad\u0000channel', () => {}), { name: 'MeshError', code: ErrorCode.InvalidChannel });
    await assert.rejects(c.watch('doc/x', '1', () => {}), { code: ErrorCode.InvalidWatchable, codeName: 'InvalidWatchable' });
    await assert.rejects(c.call(1024), { code: ErrorCode.UnknownOpcode, codeName: 'UnknownOpcode' });
    await assert.rejects(c.call(20, new Uint8Array([1])), { code: ErrorCode.UnknownOpcode });
    assert.equal(c.state, 'connected');
    assert.ok((await c.ping()) >= 0);
    assert.deepEqual(errors, []);
  });

  test('a message over Welcome.maxMessageSize is refused before it is sent', async () => {
    const c = makeClient({ url: node.url });
    await c.connect();
    await assert.rejects(c.publish('big', new Uint8Array(70000)), RangeError);
    assert.equal(c.state, 'connected');
    await c.publish('big', new Uint8Array(60000));
  });

  test('watch and unwatch are acknowledged', async () => {
    const c = makeClient({ url: node.url });
    await c.connect();
    await c.watch('document', '42', () => {});
    await c.unwatch('document', '42');
  });

  test('Batch frames are unpacked into events, in order', async () => {
    // Count the raw messages the subscriber receives, to see that Batch frames were used.
    const opcodes = [];
    class CountingWebSocket extends WebSocket {
      constructor(...args) {
        super(...args);
        this.addEventListener('message', (m) => opcodes.push(decodeFrame(new Uint8Array(m.data)).opcode));
      }
    }
    const sub = makeClient({ url: node.url, WebSocket: CountingWebSocket });
    const plain = makeClient({ url: node.url, batch: false });
    const pub = makeClient({ url: node.url });
    await Promise.all([sub.connect(), plain.connect(), pub.connect()]);
    const es = collector();
    const ep = collector();
    await sub.subscribe('burst', es);
    await plain.subscribe('burst', ep);
    const n = 200;
    // Sent in one go, so that the node reads many of them in one turn.
    await Promise.all(Array.from({ length: n }, (_, i) => pub.publish('burst', `m${i}`)));
    await es.waitFor(n);
    await ep.waitFor(n);
    const want = Array.from({ length: n }, (_, i) => `m${i}`);
    assert.deepEqual(es.events.map((e) => e.text()), want);
    assert.deepEqual(ep.events.map((e) => e.text()), want);
    assert.ok(opcodes.includes(Opcode.Batch), `expected a Batch frame, got opcodes ${[...new Set(opcodes)]}`);
    for (const e of es.events) assert.equal(e.session, pub.welcome.session);
  });

  test('the event listener sees every event', async () => {
    const c = makeClient({ url: node.url });
    await c.connect();
    const all = [];
    c.on('event', (e) => all.push(e));
    const h = collector();
    await c.subscribe('everything', h);
    await c.publish('everything', 'x');
    await waitFor(() => all.length === 1, 'the event');
    assert.equal(all[0], h.events[0]);
  });

  test('requests before connect() or after close() reject with ConnectionClosedError', async () => {
    const c = makeClient({ url: node.url });
    await assert.rejects(c.publish('chat', 'x'), ConnectionClosedError);
    await c.connect();
    const pending = c.ping();
    c.close();
    await assert.rejects(pending, ConnectionClosedError);
    assert.equal(c.state, 'closed');
    await assert.rejects(c.subscribe('chat', () => {}), ConnectionClosedError);
    // A closed client may connect again.
    const w = await c.connect();
    assert.equal(c.state, 'connected');
    assert.match(w.session, UUID);
  });

  test('the browser bundle (meshd/web/static/meshd-client.js) works the same', async () => {
    const bundle = await import(new URL(`file://${REPO}/meshd/web/static/meshd-client.js`).href);
    assert.equal(typeof bundle.MeshClient, 'function');
    assert.equal(bundle.Opcode.Refresh, 14);
    const c = new bundle.MeshClient({ url: node.url, WebSocket });
    try {
      const w = await c.connect();
      assert.match(w.session, UUID);
      const got = [];
      await c.subscribe('bundle', (e) => got.push(e.text()));
      await c.publish('bundle', 'from the bundle');
      await waitFor(() => got.length === 1, 'the event');
      await assert.rejects(c.call(1024), (e) => e instanceof bundle.MeshError && e.code === bundle.ErrorCode.UnknownOpcode);
    } finally {
      c.close();
    }
  });
});
