// Start real meshd nodes for the tests, as child processes, and small waiting helpers.
import { execFileSync, spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { WebSocket } from 'ws';
import { MeshClient } from '../dist/index.js';

/** The repository root: clients/js/test/ is three levels down. */
export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const BIN = process.env.MESHD_PYTHON ? dirname(process.env.MESHD_PYTHON) : join(REPO, '.venv', 'bin');
const TWISTD = join(BIN, 'twistd');
const STARTED = /\] MeshServerFactory starting on (\d+)\n/;
const API_STARTED = /\] ApiSite starting on (\d+)\n/;

export const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

const nodes = new Set();
const dirs = new Set();
let counter = 0;

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** Poll `predicate` until it returns a truthy value (returned), or reject after `timeout` ms. */
export async function waitFor(predicate, what, timeout = 10000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await sleep(20);
  }
}

/** Reject if `promise` does not settle within `ms`. */
export function within(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/**
 * Start a node. `config`: TOML text (none: development mode). `port`: 0 for any free port,
 * or the port of an earlier node to restart "the same node". Resolves once it listens.
 */
export async function startNode({ config, port = 0 } = {}) {
  if (!existsSync(TWISTD)) throw new Error(`${TWISTD} is missing: create ${REPO}/.venv or set MESHD_PYTHON`);
  const dir = mkdtempSync(join(tmpdir(), 'meshd-js-test-'));
  dirs.add(dir);
  const log = join(dir, `node-${++counter}.log`);
  const args = ['-n', '--pidfile=', '--logfile', log, 'meshd'];
  if (config !== undefined) {
    writeFileSync(join(dir, 'meshd.toml'), config);
    args.push('--config', join(dir, 'meshd.toml'));
  }
  args.push('--listen', `tcp:${port}:interface=127.0.0.1`);
  const output = join(dir, `node-${counter}.out`);
  const fd = openSync(output, 'w');
  const proc = spawn(TWISTD, args, { cwd: dir, env: { ...process.env, PYTHONPATH: REPO }, stdio: ['ignore', fd, fd] });
  closeSync(fd);
  const exited = new Promise((r) => proc.once('exit', (code, signal) => r({ code, signal })));
  const node = { proc, dir, log, exited, alive: true };
  exited.then(() => {
    node.alive = false;
    nodes.delete(node);
  });
  nodes.add(node);
  const text = () => (existsSync(log) ? readFileSync(log, 'utf8') : '');
  try {
    const m = await waitFor(() => {
      if (!node.alive) throw new Error(`the node exited at start:\n${text()}${readFileSync(output, 'utf8')}`);
      return STARTED.exec(text());
    }, `the node to listen (log ${log})`, 15000);
    node.port = Number(m[1]);
    node.url = `ws://127.0.0.1:${node.port}`;
    if (config !== undefined && /^\[api\]/m.test(config)) {
      const a = await waitFor(() => API_STARTED.exec(text()), 'the HTTP API to listen', 10000);
      node.apiPort = Number(a[1]);
    }
  } catch (error) {
    proc.kill('SIGKILL');
    throw error;
  }
  node.logText = text;
  /** Send `signal` and wait for the process to exit. */
  node.kill = async (signal = 'SIGKILL') => {
    if (node.alive) proc.kill(signal);
    return within(exited, 15000, `node ${node.port} to exit on ${signal}`);
  };
  return node;
}

/** Kill every node still running and remove their folders (for after() hooks). */
export async function stopAllNodes() {
  await Promise.all([...nodes].map((n) => n.kill('SIGKILL').catch(() => {})));
  // MESHD_KEEP_LOGS=1 keeps the nodes' folders (logs) for a look after a failure.
  if (!process.env.MESHD_KEEP_LOGS) for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  dirs.clear();
}

/** Clients made by makeClient(), closed by closeAllClients(). */
const clients = new Set();

export function makeClient(options) {
  const c = new MeshClient({ WebSocket, requestTimeout: 10, ...options });
  clients.add(c);
  return c;
}

export function closeAllClients() {
  for (const c of clients) c.close();
  clients.clear();
}

/** A handler that collects events, and a way to wait for the n-th one. */
export function collector() {
  const events = [];
  const handler = (ev) => events.push(ev);
  handler.events = events;
  handler.waitFor = (n, timeout = 5000) => waitFor(() => events.length >= n && events, `${n} events`, timeout);
  return handler;
}

/** Record a client's state changes. */
export function recordStates(client) {
  const states = [];
  client.on('state', (s) => states.push(s));
  states.names = () => states.map((s) => s.state);
  return states;
}

/** An HS256 JWT signed with `secret`. */
export function makeJwt(claims, secret) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
}

/** Call the node's HTTP API. */
export async function api(node, path, body, key) {
  const res = await fetch(`http://127.0.0.1:${node.apiPort}${path}`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  const json = await res.json();
  if (!res.ok) {
    const log = node.logText().split('\n').slice(-40).join('\n');
    throw new Error(`${path}: HTTP ${res.status}: ${JSON.stringify(json)}\nthe node's log ends with:\n${log}`);
  }
  return json;
}

const MESHCTL = join(BIN, 'meshctl');

/**
 * Start `count` nodes linked in a mesh (TLS certificates made with meshctl), each with `config`
 * (TOML text without [node] and [mesh]) added. Resolves once every node is linked with the others.
 */
export async function startCluster(count, config = '') {
  const certs = mkdtempSync(join(tmpdir(), 'meshd-js-certs-'));
  dirs.add(certs);
  execFileSync(MESHCTL, ['certs', 'ca', '--dir', certs], { stdio: 'ignore' });
  const nodes = [];
  let seed;
  for (let i = 0; i < count; i++) {
    const name = `n${i}`;
    const id = execFileSync(MESHCTL, ['certs', 'node', '--dir', certs, '--san', '127.0.0.1', name], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    const text = `[node]
id = "${id}"
name = "${name}"

[mesh]
cluster = "js-test"
listen = "tcp:0:interface=127.0.0.1"
seeds = [${seed ? `"${seed}"` : ''}]
ca = "${join(certs, 'ca.pem')}"
cert = "${join(certs, `${name}.pem`)}"
key = "${join(certs, `${name}.key`)}"
heartbeat_interval = 0.2
heartbeat_timeout = 1.0
${config}`;
    const node = await startNode({ config: text });
    const m = await waitFor(() => /advertised as ([\d.]+:\d+)/.exec(node.logText()), 'the mesh to listen');
    node.id = id;
    node.meshAddress = m[1];
    seed ??= m[1];
    nodes.push(node);
  }
  await waitFor(
    () => nodes.every((n) => (n.logText().match(/Linked with/g) ?? []).length >= count - 1),
    'every node to be linked with the others',
    15000,
  );
  return nodes;
}
