// End-to-end test of the demo page (meshd/web/static/demo) in Debian's chromium, driven by
// playwright-core. tests/test_browser.py starts a three-node TLS mesh, each node with its
// web listener and the demo on, and runs this script with a JSON file that describes them:
//
//   node demo.test.mjs SPEC.json
//   SPEC = {"nodes": [{"name", "id", "ws", "web", "pid"}, x3], "api": {"port", "key"} (n1's API),
//           "artifacts": DIR, "chromium": PATH}
//
// Steps (each with a timeout; the whole script gives up after OVERALL_MS):
//   a. page A (served by n2, ?ws= n0 then n1: its session is on n0) and page B (served by
//      n1, its own config.json: its session is on n1) join room "lobby" and chat both ways;
//   watch: page B watches document/report 7 and gets an event sent by POST /api/notify to n1;
//   c. a screenshot of page A, chat and cluster view filled: ARTIFACTS/demo.png;
//   b. n0 is stopped (SIGTERM: it drains with close code 4007); page A reconnects to n1 and
//      keeps receiving page B's messages; ARTIFACTS/demo-failover.png.
// Prints one line per step and exits 0 when all pass, 1 on the first failure.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const OVERALL_MS = 110_000;
const STEP_MS = 15_000;

const spec = JSON.parse(fs.readFileSync(process.argv[2] ?? '', 'utf8'));
const [n0, n1, n2] = spec.nodes;
const artifacts = spec.artifacts;
fs.mkdirSync(artifacts, { recursive: true });

const watchdog = setTimeout(() => {
  console.error(`FAIL: the browser test did not finish within ${OVERALL_MS / 1000} s`);
  process.exit(1);
}, OVERALL_MS);
watchdog.unref();

const started = Date.now();
let passed = 0;

async function step(name, fn) {
  const t = Date.now();
  try {
    await fn();
  } catch (error) {
    console.error(`not ok - ${name} (${Date.now() - t} ms)`);
    throw error;
  }
  passed += 1;
  console.log(`ok - ${name} (${Date.now() - t} ms)`);
}

function assert(condition, message) {
  if (!condition) throw new Error(message);
}

/** A locator for the room view of `room` on `page`. */
const roomView = (page, room) => page.locator(`[data-testid="room-view"][data-room="${room}"]`);
const messages = (page, room) => roomView(page, room).locator('[data-testid="message"]');

async function waitMessage(page, room, text, timeout = STEP_MS) {
  await messages(page, room).filter({ hasText: text }).first().waitFor({ state: 'visible', timeout });
}

async function waitConnectedTo(page, node, timeout = STEP_MS) {
  await page.locator(`[data-testid="conn-state"][data-state="connected"]`).waitFor({ timeout });
  await page.locator(`[data-testid="conn-node"][data-node="${node.id}"]`).waitFor({ timeout });
}

async function send(page, text) {
  await page.fill('[data-testid="chat-input"]', text);
  await page.press('[data-testid="chat-input"]', 'Enter');
}

async function setName(page, name) {
  await page.fill('[data-testid="chat-name"]', name);
  await page.dispatchEvent('[data-testid="chat-name"]', 'change');
}

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'meshd-chromium-'));
const errors = [];
let context;

async function openPage(label, url) {
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on('pageerror', (error) => errors.push(`${label}: page error: ${error.message}`));
  page.on('console', (message) => {
    if (message.type() === 'error') errors.push(`${label}: console error: ${message.text()}`);
  });
  await page.goto(url, { waitUntil: 'load', timeout: STEP_MS });
  return page;
}

try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: spec.chromium ?? '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1440, height: 1000 },
    timeout: 30_000,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  context.setDefaultTimeout(STEP_MS);
  // Also when the watchdog exits (playwright kills chromium on exit first).
  process.on('exit', () => fs.rmSync(userDataDir, { recursive: true, force: true }));
  console.log(`# chromium ${context.browser()?.version() ?? '?'} started in ${Date.now() - started} ms`);

  const failover = [n0, n1].map((n) => `ws://127.0.0.1:${n.ws}/`).join(',');
  let pageA;
  let pageB;

  await step('both pages load and connect, A to n0 (given by ?ws=), B to n1 (from its config.json)', async () => {
    pageA = await openPage('A', `http://127.0.0.1:${n2.web}/?ws=${encodeURIComponent(failover)}`);
    pageB = await openPage('B', `http://127.0.0.1:${n1.web}/`);
    await waitConnectedTo(pageA, n0);
    await waitConnectedTo(pageB, n1);
    const urls = await pageA.locator('[data-testid="conn-urls"] li').allTextContents();
    assert(urls.length === 2, `page A should list 2 nodes to try, lists ${JSON.stringify(urls)}`);
    const bUrl = await pageB.locator('[data-testid="conn-url"]').textContent();
    assert(bUrl === `ws://127.0.0.1:${n1.ws}/`, `page B should connect to n1's listener from config.json, got ${bUrl}`);
    assert((await pageA.locator('[data-testid="page-node"]').textContent()).startsWith(n2.name), 'page A names n2 as the node that served it');
  });

  await step('both pages join room lobby, and the mesh knows both subscribers', async () => {
    await setName(pageA, 'alice');
    await setName(pageB, 'bob');
    for (const page of [pageA, pageB]) {
      await page.locator('[data-testid="room-tab"][data-room="lobby"][data-status="joined"]').waitFor();
    }
    // Each node's cluster view lists chat.lobby with subscribers on n0 and n1.
    for (const page of [pageA, pageB]) {
      await page.locator('[data-testid="channel-row"][data-channel="chat.lobby"][data-nodes="2"]').waitFor();
    }
  });

  await step('a message from A (on n0) reaches B (on n1)', async () => {
    await send(pageA, 'Hello from alice, on node n0 <b>not bold</b>');
    await waitMessage(pageB, 'lobby', 'Hello from alice, on node n0');
    const item = messages(pageB, 'lobby').filter({ hasText: 'Hello from alice' }).first();
    assert((await item.getAttribute('data-from')) === 'alice', 'B shows the message as from alice');
    assert((await item.locator('[data-testid="message-text"]').textContent()) === 'Hello from alice, on node n0 <b>not bold</b>',
      'the text is shown as text, not HTML');
    assert((await item.locator('b').count()) === 0, 'no HTML from a message is rendered');
    await waitMessage(pageA, 'lobby', 'Hello from alice');
    assert(await messages(pageA, 'lobby').filter({ hasText: 'Hello from alice' }).first().evaluate((e) => e.classList.contains('mine')),
      'A shows its own message as its own');
  });

  await step('a message from B (on n1) reaches A (on n0)', async () => {
    await send(pageB, 'Hi alice! bob here, on n1');
    await waitMessage(pageA, 'lobby', 'Hi alice! bob here, on n1');
    await send(pageA, 'Both ways across the mesh: ünïcode → fine');
    await waitMessage(pageB, 'lobby', 'Both ways across the mesh: ünïcode → fine');
  });

  await step('the watch panel of page B shows an event sent with POST /api/notify to n1', async () => {
    await pageB.fill('[data-testid="watch-kind"]', 'document');
    await pageB.fill('[data-testid="watch-id"]', 'report 7');
    await pageB.click('[data-testid="watch-add"]');
    await pageB.locator('[data-testid="watch-chip"][data-watch="document/report 7"][data-status="watching"]').waitFor();
    const hint = await pageB.locator('[data-testid="notify-hint"]').textContent();
    assert(hint.includes('"id": "report 7"') && hint.includes('/api/notify'), `the notify hint names the watchable: ${hint}`);
    const answer = await fetch(`http://127.0.0.1:${spec.api.port}/api/notify`, {
      method: 'POST',
      headers: { authorization: `Bearer ${spec.api.key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ watchable: { kind: 'document', id: 'report 7' }, data: 'saved by the backend' }),
      signal: AbortSignal.timeout(5000),
    });
    const body = await answer.json();
    assert(answer.ok && body.delivered === 1, `POST /api/notify answered ${answer.status} ${JSON.stringify(body)}`);
    const event = pageB.locator('[data-testid="watch-event"]').filter({ hasText: 'saved by the backend' });
    await event.first().waitFor();
    assert((await event.first().textContent()).includes('ResourceEvent'), 'the watch event shows its type');
  });

  await step('the cluster view shows n2 with two open links and the live log shows the events', async () => {
    await pageA.locator(`[data-testid="cluster-node"][data-node="${n2.id}"]`).waitFor();
    for (const peer of [n0, n1]) {
      await pageA.locator(`[data-testid="peer"][data-peer="${peer.id}"][data-link="open"]`).waitFor();
    }
    await pageA.locator('[data-testid="peer"].here').first().waitFor();
    assert((await pageA.locator('[data-testid="peer"].here').getAttribute('data-peer')) === n0.id,
      "page A's cluster view marks n0 as the node of its session");
    await pageA.locator('[data-testid="log"] li[data-kind="event"]').filter({ hasText: 'chat.lobby' }).first().waitFor();
    await pageA.locator('[data-testid="log"] li[data-kind="welcome"]').first().waitFor();
  });

  await step('screenshot: tests/artifacts/demo.png', async () => {
    await pageA.bringToFront();
    await pageA.screenshot({ path: path.join(artifacts, 'demo.png'), fullPage: true });
  });

  await step('n0 stops (SIGTERM, close 4007): page A reconnects to n1', async () => {
    process.kill(n0.pid, 'SIGTERM');
    await pageA.locator('[data-testid="conn-close"][data-code="4007"]').waitFor({ timeout: 20_000 });
    await waitConnectedTo(pageA, n1, 20_000);
    await pageA.locator('[data-testid="room-tab"][data-room="lobby"][data-status="joined"]').waitFor();
    await pageA.locator('[data-testid="log"] li[data-kind="state"]').filter({ hasText: '4007' }).first().waitFor();
  });

  await step('after the failover, page A keeps receiving the messages page B publishes', async () => {
    // A's new subscription is on n1, B's node: no mesh round trip is needed, but send until
    // one arrives anyway, in case the re-subscription is still on its way.
    let received = false;
    for (let i = 1; i <= 10 && !received; i += 1) {
      await send(pageB, `still here after the failover #${i}`);
      try {
        await waitMessage(pageA, 'lobby', `still here after the failover #${i}`, 1500);
        received = true;
      } catch {
        // try again
      }
    }
    assert(received, 'page A received none of 10 messages from page B after the failover');
    await send(pageA, 'alice is back, now through n1');
    await waitMessage(pageB, 'lobby', 'alice is back, now through n1');
  });

  await step('the cluster view (from n2) shows the link to n0 down; screenshot demo-failover.png', async () => {
    await pageA.locator(`[data-testid="peer"][data-peer="${n0.id}"]:not([data-link="open"])`).waitFor({ timeout: 20_000 });
    await pageA.locator(`[data-testid="peer"][data-peer="${n1.id}"].here`).waitFor();
    await pageA.screenshot({ path: path.join(artifacts, 'demo-failover.png'), fullPage: true });
  });

  await step('no page errors', async () => {
    assert(errors.length === 0, errors.join('\n'));
  });
} catch (error) {
  console.error(error instanceof Error ? error.stack || error.message : String(error));
  if (errors.length) console.error(`page errors:\n${errors.join('\n')}`);
  if (context) {
    for (const [i, page] of context.pages().entries()) {
      try {
        await page.screenshot({ path: path.join(artifacts, `failure-${i}.png`), fullPage: true, timeout: 5000 });
        const log = await page.locator('[data-testid="log"] li').allTextContents();
        console.error(`page ${i} (${page.url()}) live log, newest first:\n  ${log.slice(0, 30).join('\n  ')}`);
      } catch {
        // the page may be gone
      }
    }
  }
  process.exitCode = 1;
} finally {
  if (context) await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}

console.log(`${passed} passed, ${process.exitCode ? 1 : 0} failed (${((Date.now() - started) / 1000).toFixed(1)} s)`);
process.exit(process.exitCode ?? 0);
