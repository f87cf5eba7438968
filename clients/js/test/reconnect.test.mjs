// Reconnection: nodes killed, restarted, drained; URL lists; close().
import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import { ConnectionClosedError } from '../dist/index.js';
import { closeAllClients, collector, makeClient, recordStates, sleep, startNode, stopAllNodes, waitFor } from './helpers.mjs';

const FAST = { initialDelay: 0.1, maxDelay: 0.4, factor: 2, jitter: 0.2 };

/** A port with no listener: start a node, note its port, kill it. */
async function deadPort() {
  const n = await startNode();
  await n.kill('SIGKILL');
  return n.port;
}

describe('reconnecting', () => {
  after(async () => {
    closeAllClients();
    await stopAllNodes();
  });

  test('a killed node restarted on its port: disconnected, connecting, connected, subscription resumed', async () => {
    const first = await startNode();
    const tokens = [];
    const c = makeClient({
      url: first.url,
      reconnect: FAST,
      token: async () => {
        tokens.push(Date.now());
        return 'tok';
      },
    });
    const states = recordStates(c);
    const welcomes = [];
    c.on('welcome', (w) => welcomes.push(w));
    const errors = [];
    c.on('error', (e) => errors.push(e));
    const w1 = await c.connect();
    const h = collector();
    await c.subscribe('room', h);
    await c.watch('document', '7', () => {});
    assert.equal(tokens.length, 1);

    await first.kill('SIGKILL');
    await waitFor(() => states.some((s) => s.state === 'disconnected'), 'disconnected');
    const lost = states.find((s) => s.state === 'disconnected');
    assert.equal(lost.code, 1006);
    assert.equal(lost.url, first.url);
    assert.equal(lost.attempt, 1);
    assert.ok(lost.delay >= 0.08 && lost.delay <= 0.12 + 1e-9, `delay ${lost.delay}`);
    // Requests made meanwhile wait for the connection.
    const later = c.ping();

    await sleep(500); // a few attempts fail while the node is down
    const second = await startNode({ port: first.port });
    await waitFor(() => c.state === 'connected', 'connected again', 10000);
    await later;

    const names = states.names();
    assert.equal(names[0], 'connecting');
    assert.equal(names[1], 'connected');
    assert.equal(names.at(-1), 'connected');
    const middle = names.slice(2, -1);
    assert.ok(middle.length >= 4, `several failed attempts: ${names}`);
    for (let i = 0; i < middle.length; i += 2) assert.deepEqual(middle.slice(i, i + 2), ['disconnected', 'connecting']);
    const delays = states.filter((s) => s.state === 'disconnected').map((s) => s.delay);
    assert.ok(delays.every((d) => d <= 0.4 * 1.2 + 1e-9), `delays within maxDelay: ${delays}`);
    assert.ok(delays.at(-1) > delays[0], `backoff grows: ${delays}`);

    assert.equal(welcomes.length, 2);
    assert.notEqual(c.welcome.session, w1.session, 'a new session');
    assert.equal(tokens.length, names.filter((n) => n === 'connecting').length, 'the token callback is called on every attempt');
    assert.deepEqual(errors, []);

    // The subscription was made again before `connected`: a publish on the new node arrives.
    const pub = makeClient({ url: second.url });
    await pub.connect();
    await pub.publish('room', 'after restart');
    await h.waitFor(1);
    assert.equal(h.events[0].text(), 'after restart');
    c.close();
    await second.kill();
  });

  test('a URL list: the next URL is tried when the first node is down', async () => {
    const port = await deadPort();
    const b = await startNode();
    const dead = `ws://127.0.0.1:${port}`;
    const c = makeClient({ url: [dead, b.url], reconnect: FAST });
    const states = recordStates(c);
    const w = await c.connect();
    assert.equal(w.url, b.url);
    assert.deepEqual(states.names(), ['connecting', 'disconnected', 'connecting', 'connected']);
    assert.deepEqual(states.map((s) => s.url), [dead, dead, b.url, b.url]);
    assert.deepEqual(states.map((s) => s.attempt), [1, 2, 2, undefined]);
    c.close();
    await b.kill();
  });

  test('close code 4007 (node draining): at once to the next node, subscriptions restored', async () => {
    const config = `
[node]
drain_seconds = 0
[[rules]]
match = "*"
anonymous = ["subscribe", "publish"]
`;
    const [a, b] = await Promise.all([startNode({ config }), startNode({ config })]);
    // A long backoff: only the 4007 rule can reconnect within the test's time.
    const c = makeClient({ url: [a.url, b.url], reconnect: { initialDelay: 20, maxDelay: 30 } });
    const states = recordStates(c);
    await c.connect();
    assert.equal(c.welcome.url, a.url);
    const h = collector();
    await c.subscribe('drain', h);
    const t0 = Date.now();
    await a.kill('SIGTERM');
    await waitFor(() => c.state === 'connected' && c.welcome.url === b.url, 'connected to the second node', 5000);
    assert.ok(Date.now() - t0 < 3000, 'reconnected at once');
    const lost = states.find((s) => s.state === 'disconnected');
    assert.equal(lost.code, 4007);
    assert.ok(lost.delay <= 0.25, `delay ${lost.delay}`);
    const pub = makeClient({ url: b.url });
    await pub.connect();
    await pub.publish('drain', 'on b');
    await h.waitFor(1);
    c.close();
    await b.kill();
  });

  test('close() stops reconnecting and rejects waiting requests', async () => {
    const n = await startNode();
    const c = makeClient({ url: n.url, reconnect: FAST });
    const states = recordStates(c);
    await c.connect();
    await n.kill('SIGKILL');
    await waitFor(() => states.filter((s) => s.state === 'connecting').length >= 3, 'a few attempts');
    const waiting = c.publish('x', 'y');
    c.close();
    await assert.rejects(waiting, ConnectionClosedError);
    assert.equal(c.state, 'closed');
    const count = states.length;
    await sleep(800); // twice maxDelay
    assert.equal(states.length, count, 'no attempt after close()');
    assert.equal(states.at(-1).state, 'closed');
  });

  test('reconnect: false gives up at the first failure', async () => {
    const port = await deadPort();
    const c = makeClient({ url: `ws://127.0.0.1:${port}`, reconnect: false });
    const states = recordStates(c);
    await assert.rejects(c.connect(), ConnectionClosedError);
    assert.deepEqual(states.names(), ['connecting', 'closed']);
  });

  test('pingInterval: a node that stops answering is left, and the client comes back when it answers again', async () => {
    const n = await startNode();
    const c = makeClient({ url: n.url, reconnect: FAST, pingInterval: 0.2, requestTimeout: 0.5 });
    const states = recordStates(c);
    await c.connect();
    await sleep(500);
    assert.deepEqual(states.names(), ['connecting', 'connected'], 'pings answered: still connected');
    n.proc.kill('SIGSTOP');
    try {
      await waitFor(() => c.state !== 'connected', 'the client to notice', 5000);
    } finally {
      n.proc.kill('SIGCONT');
    }
    const lost = states.find((s) => s.state === 'disconnected');
    assert.equal(lost.code, 1006);
    assert.match(lost.reason, /Pong/);
    await waitFor(() => c.state === 'connected', 'connected again', 10000);
  });

  test('a subscription the new session refuses goes to the error event and is forgotten', async () => {
    const open = '[[rules]]\nmatch = "*"\nanonymous = ["subscribe", "publish", "watch"]\n';
    const strict = '[[rules]]\nmatch = "kept"\nanonymous = ["subscribe", "publish"]\n';
    const first = await startNode({ config: open });
    const c = makeClient({ url: first.url, reconnect: FAST });
    const states = recordStates(c);
    const errors = [];
    c.on('error', (e) => errors.push(e));
    await c.connect();
    const kept = collector();
    await c.subscribe('kept', kept);
    await c.subscribe('dropped', () => {});
    await c.watch('document', '1', () => {});
    assert.deepEqual(c.channels, ['kept', 'dropped']);
    assert.deepEqual(c.watchables, [{ kind: 'document', id: '1' }]);
    await first.kill('SIGKILL');
    const second = await startNode({ config: strict, port: first.port });
    await waitFor(() => states.filter((s) => s.state === 'connected').length === 2, 'connected again');
    assert.equal(errors.length, 2, errors.map(String).join('; '));
    const messages = errors.map((e) => e.message).sort();
    assert.match(messages[0], /channel "dropped"/);
    assert.match(messages[1], /document\/1/);
    for (const e of errors) assert.equal(e.codeName, 'PermissionDenied');
    // Forgotten: not tried again at the next reconnection.
    assert.deepEqual(c.channels, ['kept']);
    assert.deepEqual(c.watchables, []);
    await c.publish('kept', 'still subscribed');
    await kept.waitFor(1);
    c.close();
    await second.kill();
  });
});
