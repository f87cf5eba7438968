// The README's first run, in Debian's chromium: the page a node started as the README says
// (`twistd -n meshd --demo`) prints, opened as printed. tests/test_browser.py starts the node
// and runs:
//
//   node readme.test.mjs URL CHROMIUM ARTIFACTS PUBLISHED
//
// The page must connect, join room lobby by itself, show a message sent with its own input,
// and show PUBLISHED, which the test publishes with meshctl once this script prints "ready".
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { chromium } from 'playwright-core';

const [url, executablePath, artifacts, published] = process.argv.slice(2);
const STEP_MS = 15_000;
setTimeout(() => {
  console.error('FAIL: the README browser test did not finish within 60 s');
  process.exit(1);
}, 60_000).unref();

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'meshd-chromium-'));
process.on('exit', () => fs.rmSync(userDataDir, { recursive: true, force: true }));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath,
  headless: true,
  viewport: { width: 1280, height: 900 },
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
const errors = [];
try {
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on('pageerror', (error) => errors.push(`page error: ${error.message}`));
  await page.goto(url, { waitUntil: 'load' });
  await page.locator('[data-testid="conn-state"][data-state="connected"]').waitFor();
  await page.locator('[data-testid="room-tab"][data-room="lobby"][data-status="joined"]').waitFor();
  const messages = page.locator('[data-testid="room-view"][data-room="lobby"] [data-testid="message"]');
  await page.fill('[data-testid="chat-input"]', 'hello from the README');
  await page.press('[data-testid="chat-input"]', 'Enter');
  await messages.filter({ hasText: 'hello from the README' }).first().waitFor();
  console.log('ready');
  const lines = readline.createInterface({ input: process.stdin });
  await new Promise((resolve) => lines.once('line', resolve));  // the test has published
  await messages.filter({ hasText: published }).first().waitFor();
  await page.screenshot({ path: path.join(artifacts, 'readme.png') });
  if (errors.length) throw new Error(errors.join('\n'));
  console.log('ok');
} finally {
  await context.close();
}
