// A node with a configuration file: rules, static tokens, JWTs and the HTTP API.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { ConnectionClosedError, ErrorCode, EventType, MeshError } from '../dist/index.js';
import { api, closeAllClients, collector, makeClient, makeJwt, recordStates, sleep, startNode, stopAllNodes, waitFor } from './helpers.mjs';

const SECRET = 'a-test-secret-of-at-least-32-bytes!';
const API_KEY = 'test-api-key';
const CONFIG = `
[node]
drain_seconds = 0

[api]
listen = "tcp:0:interface=127.0.0.1"
keys = { test = "${API_KEY}" }

[auth.tokens]
alice = "alice-secret"

[auth.jwt]
secret = "${SECRET}"
algorithms = ["HS256"]

[[rules]]
match = "public.*"
anonymous = ["subscribe", "publish"]

[[rules]]
match = "document/*"
anonymous = ["watch"]

[[rules]]
match = "private.*"
authenticated = ["subscribe", "publish"]
`;

describe('a node with a configuration file', () => {
  let node;
  before(async () => {
    node = await startNode({ config: CONFIG });
  });
  after(async () => {
    closeAllClients();
    await stopAllNodes();
  });

  test('a static token authenticates; the rules are applied', async () => {
    const alice = makeClient({ url: node.url, token: 'alice-secret' });
    const anon = makeClient({ url: node.url });
    const [wa, wn] = await Promise.all([alice.connect(), anon.connect()]);
    assert.equal(wa.principal, 'alice');
    assert.equal(wn.principal, '');
    await assert.rejects(anon.subscribe('private.x', () => {}), (e) => {
      assert.ok(e instanceof MeshError);
      assert.equal(e.code, ErrorCode.PermissionDenied);
      assert.equal(e.codeName, 'PermissionDenied');
      return true;
    });
    await assert.rejects(anon.publish('elsewhere', 'x'), { code: ErrorCode.PermissionDenied });
    const h = collector();
    await alice.subscribe('private.x', h);
    await alice.publish('private.x', 'secret');
    await h.waitFor(1);
    assert.equal(h.events[0].text(), 'secret');
  });

  test('a refused token rejects connect() and does not reconnect', async () => {
    const c = makeClient({ url: node.url, token: 'wrong', reconnect: { initialDelay: 0.05 } });
    const states = recordStates(c);
    const errors = [];
    c.on('error', (e) => errors.push(e));
    await assert.rejects(c.connect(), { name: 'MeshError', code: ErrorCode.AuthenticationFailed, codeName: 'AuthenticationFailed' });
    assert.equal(c.state, 'closed');
    await sleep(300);
    assert.deepEqual(states.names(), ['connecting', 'closed']);
    assert.deepEqual(errors, [], 'the error went to the connect() promise');
  });

  test('watch receives the events of POST /api/notify; unwatch stops them', async () => {
    const c = makeClient({ url: node.url });
    await c.connect();
    const h = collector();
    await c.watch('document', '42', h);
    const answer = await api(node, '/api/notify', { watchable: { kind: 'document', id: '42' }, data: 'saved' }, API_KEY);
    assert.equal(answer.delivered, 1);
    await h.waitFor(1);
    const ev = h.events[0];
    assert.equal(ev.type, EventType.ResourceEvent);
    assert.equal(ev.typeName, 'ResourceEvent');
    assert.deepEqual(ev.watchable, { kind: 'document', id: '42' });
    assert.equal(ev.channel, undefined);
    assert.equal(ev.text(), 'saved');
    assert.equal(ev.session, undefined, 'no origin session');
    assert.equal(ev.node, c.welcome.node);

    await api(node, '/api/notify', { watchable: { kind: 'document', id: '42' }, data: { b64: 'AAEC' }, type: 1030 }, API_KEY);
    await h.waitFor(2);
    assert.equal(h.events[1].type, 1030);
    assert.equal(h.events[1].typeName, '1030');
    assert.deepEqual([...h.events[1].data], [0, 1, 2]);

    await c.unwatch('document', '42');
    const after = await api(node, '/api/notify', { watchable: { kind: 'document', id: '42' }, data: 'again' }, API_KEY);
    assert.equal(after.delivered, 0);
    await c.ping();
    assert.equal(h.events.length, 2);
  });

  test('close code 4006 (disconnected by the server): stop, and connect() again when the application wants', async () => {
    const c = makeClient({ url: node.url, token: 'alice-secret', reconnect: { initialDelay: 0.05, maxDelay: 0.1 } });
    const states = recordStates(c);
    const errors = [];
    c.on('error', (e) => errors.push(e));
    const w = await c.connect();
    const h = collector();
    await c.subscribe('private.kick', h);
    await api(node, '/api/disconnect', { session: w.session }, API_KEY);
    await waitFor(() => c.state === 'closed', 'the client to stop');
    assert.deepEqual(states.names(), ['connecting', 'connected', 'closed']);
    assert.equal(states[2].code, 4006);
    assert.deepEqual(errors.map((e) => [e.name, e.code]), [['ConnectionClosedError', 4006]]);
    const again = await c.connect();
    assert.notEqual(again.session, w.session);
    await c.publish('private.kick', 'back');  // subscribed again by connect()
    await h.waitFor(1);
  });

  test('Refresh before the JWT expires keeps the session open; without it the node closes with 4005', async () => {
    const now = () => Math.floor(Date.now() / 1000);
    let calls = 0;
    const token = () => {
      calls += 1;
      return makeJwt({ sub: 'carol', exp: now() + 3 }, SECRET);
    };
    const refreshed = makeClient({ url: node.url, token, refreshBefore: 2 });
    // A static token cannot be refreshed: that session is closed with 4005, and the client
    // stops, since it has no other token to reconnect with.
    const expiring = makeClient({ url: node.url, token: makeJwt({ sub: 'dave', exp: now() + 3 }, SECRET), reconnect: { initialDelay: 0.05 } });
    const rs = recordStates(refreshed);
    const es = recordStates(expiring);
    const errors = [];
    refreshed.on('error', (e) => errors.push(e));
    expiring.on('error', () => {});
    const [w, wd] = await Promise.all([refreshed.connect(), expiring.connect()]);
    assert.equal(w.principal, 'carol');
    assert.equal(wd.principal, 'dave');
    const h = collector();
    await refreshed.subscribe('public.jwt', h);

    await waitFor(() => expiring.state === 'closed', 'the static-token session to be closed', 8000);
    assert.deepEqual(es.names(), ['connecting', 'connected', 'closed']);
    assert.equal(es.at(-1).code, 4005);
    await sleep(1500); // past the first token's exp for the refreshed session too
    assert.ok(calls >= 2, `the token callback was called ${calls} times`);
    assert.deepEqual(rs.names(), ['connecting', 'connected'], 'the refreshed session never closed: ' + JSON.stringify(rs) + errors.map(String));
    assert.equal(refreshed.welcome.session, w.session);
    await refreshed.publish('public.jwt', 'still here');
    await h.waitFor(1);
    assert.deepEqual(errors, []);
  });

  test('a refused Refresh goes to the error event; after 4005 the token callback gives a token for the new session', async () => {
    const now = () => Math.floor(Date.now() / 1000);
    const tokens = [
      makeJwt({ sub: 'erin', exp: now() + 2 }, SECRET),
      makeJwt({ sub: 'mallory', exp: now() + 60 }, SECRET), // another principal: Refresh refused
      makeJwt({ sub: 'erin', exp: now() + 60 }, SECRET),
    ];
    let calls = 0;
    const c = makeClient({ url: node.url, token: () => tokens[Math.min(calls++, 2)], refreshBefore: 1, reconnect: { initialDelay: 0.05 } });
    const states = recordStates(c);
    const errors = [];
    c.on('error', (e) => errors.push(e));
    const w = await c.connect();
    await waitFor(() => c.state === 'connected' && c.welcome.session !== w.session, 'a new session', 8000);
    assert.equal(calls, 3);
    assert.deepEqual(states.names(), ['connecting', 'connected', 'disconnected', 'connecting', 'connected']);
    assert.equal(states[2].code, 4005);
    assert.equal(c.welcome.principal, 'erin');
    assert.equal(errors.length, 1);
    assert.ok(errors[0] instanceof MeshError);
    assert.equal(errors[0].code, ErrorCode.AuthenticationFailed);
    assert.match(errors[0].message, /refresh/);
  });
});
