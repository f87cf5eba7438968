// The committed browser bundle in a real browser (headless Chromium), when one is installed:
// a page imports /static/meshd-client.js, uses the browser's own WebSocket against a
// development node, and posts what it saw back to the test's HTTP server.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { REPO, startNode, stopAllNodes, within } from './helpers.mjs';

const CHROMIUM = [process.env.MESHD_CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser', '/usr/bin/google-chrome'].find(
  (p) => p && existsSync(p),
);
const BUNDLE = join(REPO, 'meshd', 'web', 'static', 'meshd-client.js');

const PAGE = (wsUrl) => `<!doctype html>
<meta charset="utf-8">
<script type="module">
import { MeshClient, ErrorCode } from '/static/meshd-client.js';
const seen = {};
try {
  const client = new MeshClient({ url: ${JSON.stringify(wsUrl)}, requestTimeout: 5 });
  const states = [];
  client.on('state', (s) => states.push(s.state));
  const w = await client.connect();
  seen.welcome = w;
  const events = [];
  await client.subscribe('chat', (ev) => events.push({ text: ev.text(), bytes: [...ev.data], type: ev.typeName, session: ev.session }));
  await client.publish('chat', 'from the browser ✓');
  await client.publish('chat', new Uint8Array([0, 255]));
  try {
    await client.subscribe('', () => {});
  } catch (e) {
    seen.error = { name: e.name, code: e.code, isInvalidChannel: e.code === ErrorCode.InvalidChannel };
  }
  seen.rtt = await client.ping();
  client.close();
  seen.events = events;
  seen.states = states;
} catch (e) {
  seen.failed = String(e);
}
await fetch('/result', { method: 'POST', body: JSON.stringify(seen) });
</script>`;

after(async () => {
  await stopAllNodes();
});

test('the bundle works in Chromium', { skip: CHROMIUM ? false : 'no Chromium installed (set MESHD_CHROMIUM)' }, async () => {
  const node = await startNode();
  let resolveResult;
  const result = new Promise((r) => (resolveResult = r));
  const server = createServer((req, res) => {
    if (req.url === '/static/meshd-client.js') {
      res.setHeader('content-type', 'text/javascript');
      res.end(readFileSync(BUNDLE));
    } else if (req.url === '/result' && req.method === 'POST') {
      let body = '';
      req.on('data', (d) => (body += d));
      req.on('end', () => {
        res.end('ok');
        resolveResult(JSON.parse(body));
      });
    } else {
      res.setHeader('content-type', 'text/html; charset=utf-8');
      res.end(PAGE(node.url));
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const profile = mkdtempSync(join(tmpdir(), 'meshd-js-chromium-'));
  const browser = spawn(
    CHROMIUM,
    ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', `--user-data-dir=${profile}`, `http://127.0.0.1:${server.address().port}/`],
    // Its own process group, so that its helper processes end with it.
    { stdio: 'ignore', detached: true },
  );
  const exited = new Promise((r) => browser.once('exit', r));
  try {
    const seen = await within(result, 30000, 'the page to post its result');
    assert.equal(seen.failed, undefined);
    assert.match(seen.welcome.session, /^[0-9a-f-]{36}$/);
    assert.equal(seen.welcome.batch, true);
    assert.deepEqual(seen.events.map((e) => e.text ?? null).slice(0, 1), ['from the browser ✓']);
    assert.deepEqual(seen.events[1].bytes, [0, 255]);
    assert.equal(seen.events[0].type, 'ChannelEvent');
    assert.equal(seen.events[0].session, seen.welcome.session);
    assert.deepEqual(seen.error, { name: 'MeshError', code: 9, isInvalidChannel: true });
    assert.equal(typeof seen.rtt, 'number');
    assert.deepEqual(seen.states, ['connecting', 'connected', 'closed']);
  } finally {
    try {
      process.kill(-browser.pid, 'SIGKILL');
    } catch {
      browser.kill('SIGKILL');
    }
    await within(exited, 10000, 'Chromium to exit').catch(() => {});
    server.close();
    try {
      rmSync(profile, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 });
    } catch {
      // A helper process may still be writing; the folder is in the temporary directory.
    }
  }
});
