// The Node example of README.md, run as written (only its URL changed) against a development node.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { startNode, stopAllNodes } from './helpers.mjs';

const PKG = resolve(dirname(fileURLToPath(import.meta.url)), '..');

let node;
let dir;
before(async () => {
  node = await startNode();
  // Inside the package, so that 'meshd-client' and 'ws' resolve as they would for a user.
  dir = mkdtempSync(join(PKG, '.tmp-readme-'));
});
after(async () => {
  rmSync(dir, { recursive: true, force: true });
  await stopAllNodes();
});

test('the Node example of README.md runs', async () => {
  const readme = readFileSync(join(PKG, 'README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('## Node'));
  const code = /```js\n([\s\S]*?)```/.exec(section)[1];
  assert.ok(code.includes("'ws://127.0.0.1:8765'"));
  const file = join(dir, 'example.mjs');
  writeFileSync(file, code.replace("'ws://127.0.0.1:8765'", `'${node.url}'`));
  const { stdout } = await promisify(execFile)(process.execPath, [file], { timeout: 20000 });
  const lines = stdout.split('\n');
  assert.equal(lines[0], 'state: connecting  ');
  assert.equal(lines[1], 'state: connected  ');
  assert.match(lines[2], /^session [0-9a-f-]{36} on node [0-9a-f-]{36} as anonymous$/);
  assert.ok(lines.includes('chat <- hello (from ' + lines[2].split(' ')[1] + ')'), stdout);
  assert.ok(!stdout.includes('not to me'), stdout);
  assert.ok(lines.some((l) => l.startsWith('refused: InvalidChannel ')), stdout);
  assert.ok(lines.some((l) => /^ping: \d+ ms$/.test(l)), stdout);
  assert.equal(lines.at(-2), 'state: closed 1000 closed by the client');
});

test('the History example of README.md runs', async () => {
  const readme = readFileSync(join(PKG, 'README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('## History and recovery'));
  const toml = /```toml\n([\s\S]*?)```/.exec(section)[1];
  const code = /```js\n([\s\S]*?)```/.exec(section)[1];
  assert.ok(code.includes("'ws://127.0.0.1:8765'"));
  const history = await startNode({ config: `[[rules]]\nmatch = "*"\nanonymous = ["subscribe", "publish"]\n\n${toml}` });
  const file = join(dir, 'history.mjs');
  writeFileSync(file, code.replace("'ws://127.0.0.1:8765'", `'${history.url}'`));
  const { stdout } = await promisify(execFile)(process.execPath, [file], { timeout: 20000 });
  const lines = stdout.trim().split('\n');
  assert.equal(lines.length, 4, stdout);
  assert.match(lines[0], /^earlier: two \(seq \d+\)$/);
  assert.match(lines[1], /^earlier: three \(seq \d+\)$/);
  assert.deepEqual(lines.slice(2), ['live: hello', 'positions held: 1']);
});
