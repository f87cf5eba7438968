// The meshd demo page: chat rooms, a watch panel, a live log and a cluster view, on the
// browser client (/static/meshd-client.js). Plain DOM: every text goes in through
// textContent or an attribute, never as HTML.

const LOG_LINES = 200;
const ROOM_MESSAGES = 500;
const WATCH_EVENTS = 100;
const CLUSTER_EVERY = 2000; // ms
const FETCH_TIMEOUT = 5000; // ms

const $ = (id) => document.getElementById(id);

/** An element with attributes (`class`, `data-*`, ...) and children (strings become text nodes). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'text') node.textContent = String(value);
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clock(date = new Date()) {
  const pad = (n) => String(n).padStart(2, '0');
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function shortId(id) {
  return id ? String(id).slice(0, 8) : '–';
}

function duration(seconds) {
  let s = Math.floor(seconds);
  const d = Math.floor(s / 86400); s -= d * 86400;
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

function clip(text, max = 300) {
  return text.length > max ? `${text.slice(0, max)}…` : text;
}

function storage(key, value) {
  try {
    if (value === undefined) return window.localStorage.getItem(key);
    window.localStorage.setItem(key, value);
  } catch {
    // Storage may be off (private mode, a sandbox): the page works without it.
  }
  return null;
}

async function fetchJson(path) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT);
  try {
    const response = await fetch(path, { cache: 'no-store', signal: controller.signal });
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return await response.json();
  } catch (error) {
    if (error && error.name === 'AbortError') throw new Error(`${path}: no answer within ${FETCH_TIMEOUT / 1000} s`);
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

function describeError(error) {
  if (error && typeof error === 'object' && 'codeName' in error && error.codeName) {
    return `${error.codeName}: ${error.message}`;
  }
  return error instanceof Error ? error.message : String(error);
}

// ---- the live log --------------------------------------------------------------------------

const logList = $('log');

function log(kind, text) {
  const line = el('li', { class: `log-${kind}`, 'data-kind': kind },
    el('time', { text: clock() }), el('span', { class: 'kind', text: kind }), el('span', { class: 'text', text }));
  logList.prepend(line);
  while (logList.childElementCount > LOG_LINES) logList.lastElementChild.remove();
}

$('log-clear').addEventListener('click', () => logList.replaceChildren());

// ---- state ---------------------------------------------------------------------------------

const state = {
  client: null,
  MeshClient: null,
  urls: [],
  config: null,
  welcome: null,
  /** Every session id this page has had: its own messages are shown as such after a reconnect too. */
  mySessions: new Set(),
  /** room name -> {name, channel, handler, status, view, list, tab, unread} */
  rooms: new Map(),
  activeRoom: null,
  /** JSON [kind, id] -> {kind, id, handler, chip} */
  watches: new Map(),
  cluster: null,
};

function nodeLabel(id) {
  if (!id) return '–';
  const info = state.cluster && state.cluster.info;
  if (info && info.node && info.node.id === id && info.node.name) return info.node.name;
  if (state.config && state.config.node && state.config.node.id === id && state.config.node.name) return state.config.node.name;
  return shortId(id);
}

// ---- connection panel ----------------------------------------------------------------------

function setText(id, text, title) {
  const node = $(id);
  node.textContent = text;
  if (title !== undefined) node.title = title;
}

function showState(s) {
  const label = s.state === 'disconnected' && s.delay !== undefined
    ? `disconnected, retrying in ${s.delay.toFixed(1)} s`
    : s.state === 'connecting' && s.attempt > 1 ? `connecting (attempt ${s.attempt})` : s.state;
  for (const id of ['conn-state', 'state-badge']) {
    const node = $(id);
    node.dataset.state = s.state;
    node.textContent = id === 'state-badge' ? s.state : label;
  }
  if (s.url) setText('conn-url', s.url);
  if (s.code !== undefined || s.reason) {
    const close = $('conn-close');
    close.classList.remove('muted');
    close.textContent = `${s.code ?? ''}${s.reason ? ` ${s.reason}` : ''}`.trim();
    close.dataset.code = String(s.code ?? '');
  }
  if (s.state !== 'connected') {
    setText('conn-session', '–');
  }
  for (const room of state.rooms.values()) {
    if (s.state === 'connected' && room.status === 'rejoining') setRoomStatus(room, 'joined');
    else if (s.state === 'closed' && room.status !== 'error') setRoomStatus(room, 'rejoining', 'not connected: press Reconnect to join again');
    else if (s.state !== 'connected' && room.status === 'joined') setRoomStatus(room, 'rejoining');
  }
  updateComposer();
  highlightCluster();
}

function showWelcome(w) {
  state.welcome = w;
  state.mySessions.add(w.session);
  setText('conn-node', nodeLabel(w.node) === shortId(w.node) ? w.node : `${w.node} (${nodeLabel(w.node)})`, w.node);
  $('conn-node').dataset.node = w.node;
  setText('conn-session', w.session, w.session);
  setText('conn-principal', w.principal || 'anonymous');
  setText('conn-url', w.url);
  highlightCluster();
  updateWatchHints();
  if (state.activeRoom !== null) selectRoom(state.activeRoom);
}

function showUrls(urls) {
  $('conn-url-count').textContent = String(urls.length);
  $('conn-urls').replaceChildren(...urls.map((url) => el('li', {}, el('code', { text: url }))));
}

function startClient() {
  if (state.client) {
    const old = state.client;
    state.client = null;
    old.close();
  }
  const tokenInput = $('token');
  const client = new state.MeshClient({
    url: state.urls,
    token: () => tokenInput.value.trim() || undefined,
  });
  state.client = client;
  client.on('state', (s) => {
    if (state.client !== client) return;
    showState(s);
    const parts = [s.state];
    if (s.url) parts.push(s.url);
    if (s.code !== undefined) parts.push(`code ${s.code}`);
    if (s.reason) parts.push(`"${s.reason}"`);
    if (s.attempt !== undefined && s.state !== 'connected') parts.push(`attempt ${s.attempt}`);
    if (s.delay !== undefined) parts.push(`next try in ${s.delay.toFixed(2)} s`);
    log('state', parts.join(' · '));
  });
  client.on('welcome', (w) => {
    if (state.client !== client) return;
    showWelcome(w);
    log('welcome', `session ${w.session} on node ${w.node}${w.principal ? ` as ${w.principal}` : ' (anonymous)'} · ${w.url}`);
  });
  client.on('error', (e) => {
    if (state.client !== client) return;
    log('error', describeError(e));
  });
  client.on('event', (ev) => {
    if (state.client !== client) return;
    const where = ev.channel !== undefined ? ev.channel : ev.watchable ? `${ev.watchable.kind}/${ev.watchable.id}` : '(broadcast)';
    let text;
    try {
      text = ev.text();
    } catch {
      text = `${ev.data.length} bytes`;
    }
    const from = ev.session ? `session ${shortId(ev.session)}` : 'server';
    log('event', `${ev.typeName} ${where} · ${from} @ ${nodeLabel(ev.node)} · ${clip(text, 200)}`);
  });
  client.connect().catch((error) => log('error', `connect: ${describeError(error)}`));
  // Rooms and watches the page holds go on with this client.
  for (const room of state.rooms.values()) subscribeRoom(room);
  for (const watch of state.watches.values()) watchOn(watch);
}

$('token-form').addEventListener('submit', (event) => {
  event.preventDefault();
  log('info', 'reconnecting with the new token');
  startClient();
});

$('disconnect').addEventListener('click', () => {
  if (state.client) state.client.close();
});

// ---- chat ----------------------------------------------------------------------------------

const nameInput = $('chat-name');
nameInput.value = storage('meshd-demo-name') || `guest-${Math.random().toString(16).slice(2, 6)}`;
nameInput.addEventListener('change', () => {
  nameInput.value = nameInput.value.trim() || 'anonymous';
  storage('meshd-demo-name', nameInput.value);
});

function setRoomStatus(room, status, detail) {
  room.status = status;
  room.tab.dataset.status = status;
  room.statusLine.textContent = detail || {
    joining: `joining ${room.channel}…`,
    joined: `subscribed to ${room.channel}`,
    rejoining: 'waiting for the connection: the client subscribes again when it is back',
    error: 'not subscribed',
  }[status] || status;
  room.statusLine.dataset.status = status;
  updateComposer();
}

function chatHandler(room) {
  return (ev) => {
    let from = null;
    let text;
    let raw = false;
    try {
      const message = ev.json();
      if (message && typeof message === 'object' && typeof message.text === 'string') {
        text = message.text;
        from = typeof message.from === 'string' && message.from ? message.from : 'anonymous';
      }
    } catch {
      // Not JSON: shown as it is.
    }
    if (text === undefined) {
      raw = true;
      try {
        text = ev.text();
      } catch {
        text = `(${ev.data.length} bytes)`;
      }
    }
    addMessage(room, { from: from || (ev.session ? 'someone' : 'server'), text, raw, ev });
  };
}

function addMessage(room, { from, text, raw, ev }) {
  const mine = ev.session !== undefined && state.mySessions.has(ev.session);
  const list = room.list;
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const item = el('li', { class: `message${mine ? ' mine' : ''}${raw ? ' raw' : ''}`, 'data-testid': 'message', 'data-from': from },
    el('div', { class: 'meta' },
      el('span', { class: 'from', text: from }),
      el('span', { class: 'where', text: `via ${nodeLabel(ev.node)}`, title: `node ${ev.node || '?'} · session ${ev.session || 'none (server)'}` }),
      el('time', { text: clock() })),
    el('div', { class: 'text', 'data-testid': 'message-text', text }));
  list.append(item);
  while (list.childElementCount > ROOM_MESSAGES) list.firstElementChild.remove();
  room.empty.hidden = true;
  if (nearBottom || mine) list.scrollTop = list.scrollHeight;
  if (state.activeRoom !== room.name) {
    room.unread += 1;
    room.badge.textContent = String(room.unread);
    room.badge.hidden = false;
  }
}

function subscribeRoom(room) {
  const client = state.client;
  if (!client) return;
  setRoomStatus(room, 'joining');
  client.subscribe(room.channel, room.handler).then(
    () => {
      if (state.client !== client || state.rooms.get(room.name) !== room) return;
      setRoomStatus(room, client.state === 'connected' ? 'joined' : 'rejoining');
      log('info', `joined ${room.channel}`);
    },
    (error) => {
      if (state.client !== client || state.rooms.get(room.name) !== room) return;
      setRoomStatus(room, 'error', `could not join: ${describeError(error)}`);
      log('error', `subscribe ${room.channel}: ${describeError(error)}`);
    },
  );
}

function joinRoom(name) {
  name = name.trim();
  if (!name) return;
  if (state.rooms.has(name)) {
    selectRoom(name);
    return;
  }
  const room = { name, channel: `chat.${name}`, status: 'joining', unread: 0 };
  room.handler = chatHandler(room);
  room.badge = el('span', { class: 'unread', hidden: true });
  room.tab = el('button', { type: 'button', class: 'tab', role: 'tab', 'data-testid': 'room-tab', 'data-room': name },
    el('span', { class: 'dot', 'aria-hidden': 'true' }), el('span', { text: name }), room.badge);
  room.tab.addEventListener('click', () => selectRoom(name));
  const leave = el('button', { type: 'button', class: 'link small', 'data-testid': 'room-leave', text: 'Leave room' });
  leave.addEventListener('click', () => leaveRoom(name));
  room.statusLine = el('span', { class: 'room-status', 'data-testid': 'room-status' });
  room.list = el('ol', { class: 'messages', 'data-testid': 'messages' });
  room.empty = el('p', { class: 'empty', text: `No messages in ${name} yet. Say hello!` });
  room.view = el('div', { class: 'room-view', role: 'tabpanel', 'data-testid': 'room-view', 'data-room': name, hidden: true },
    el('div', { class: 'room-head' }, room.statusLine, leave), room.empty, room.list);
  $('room-tabs').append(room.tab);
  $('room-views').append(room.view);
  state.rooms.set(name, room);
  saveRooms();
  selectRoom(name);
  subscribeRoom(room);
}

function leaveRoom(name) {
  const room = state.rooms.get(name);
  if (!room) return;
  state.rooms.delete(name);
  room.tab.remove();
  room.view.remove();
  saveRooms();
  if (state.client) {
    state.client.unsubscribe(room.channel, room.handler).then(
      () => log('info', `left ${room.channel}`),
      (error) => log('error', `unsubscribe ${room.channel}: ${describeError(error)}`),
    );
  }
  if (state.activeRoom === name) {
    const next = state.rooms.keys().next();
    state.activeRoom = null;
    if (!next.done) selectRoom(next.value);
  }
  updateComposer();
}

function selectRoom(name) {
  state.activeRoom = name;
  for (const room of state.rooms.values()) {
    const active = room.name === name;
    room.view.hidden = !active;
    room.tab.classList.toggle('active', active);
    room.tab.setAttribute('aria-selected', String(active));
    if (active) {
      room.unread = 0;
      room.badge.hidden = true;
      room.list.scrollTop = room.list.scrollHeight;
    }
  }
  const room = state.rooms.get(name);
  if (room) {
    $('pub-hint').textContent = `meshctl pub ${room.channel} '{"from": "cli", "text": "hi"}'${wsFlag()}`;
  }
  updateComposer();
}

function saveRooms() {
  storage('meshd-demo-rooms', JSON.stringify([...state.rooms.keys()]));
}

function updateComposer() {
  const room = state.activeRoom !== null ? state.rooms.get(state.activeRoom) : undefined;
  const usable = Boolean(room && state.client && state.client.state !== 'closed' && room.status !== 'error');
  $('chat-input').disabled = !usable;
  $('chat-send').disabled = !usable;
  $('no-rooms').hidden = state.rooms.size > 0;
  $('chat-input').placeholder = room ? `Message ${room.name} (Enter to send)` : 'Join a room first';
}

$('join-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const input = $('room-input');
  joinRoom(input.value || input.placeholder);
  input.value = '';
});

$('send-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const input = $('chat-input');
  const text = input.value;
  const room = state.activeRoom !== null ? state.rooms.get(state.activeRoom) : undefined;
  if (!text.trim() || !room || !state.client) return;
  const name = nameInput.value.trim() || 'anonymous';
  input.value = '';
  try {
    await state.client.publish(room.channel, JSON.stringify({ from: name, text }));
  } catch (error) {
    log('error', `publish to ${room.channel}: ${describeError(error)}`);
    if (!input.value) input.value = text; // give it back to send again
  }
});

// ---- watch ---------------------------------------------------------------------------------

function watchOn(watch) {
  const client = state.client;
  if (!client) return;
  watch.chip.dataset.status = 'pending';
  client.watch(watch.kind, watch.id, watch.handler).then(
    () => {
      if (state.client !== client) return;
      watch.chip.dataset.status = 'watching';
      log('info', `watching ${watch.kind}/${watch.id}`);
    },
    (error) => {
      if (state.client !== client) return;
      watch.chip.dataset.status = 'error';
      watch.chip.title = describeError(error);
      log('error', `watch ${watch.kind}/${watch.id}: ${describeError(error)}`);
    },
  );
}

function addWatch(kind, id) {
  kind = kind.trim();
  id = id.trim();
  if (!kind || !id) return;
  const key = JSON.stringify([kind, id]);
  if (state.watches.has(key)) return;
  const remove = el('button', { type: 'button', class: 'chip-x', title: 'Unwatch', 'aria-label': `Unwatch ${kind}/${id}`, text: '×' });
  const chip = el('li', { class: 'chip', 'data-testid': 'watch-chip', 'data-watch': `${kind}/${id}` },
    el('span', { class: 'dot', 'aria-hidden': 'true' }), el('span', { text: `${kind}/${id}` }), remove);
  const watch = {
    kind, id, chip,
    handler: (ev) => {
      let text;
      try {
        text = ev.text();
      } catch {
        text = `(${ev.data.length} bytes)`;
      }
      const list = $('watch-events');
      list.prepend(el('li', { 'data-testid': 'watch-event' },
        el('time', { text: clock() }),
        el('span', { class: 'tag', text: ev.typeName }),
        el('code', { text: `${kind}/${id}` }),
        el('span', { class: 'text', text: clip(text) })));
      while (list.childElementCount > WATCH_EVENTS) list.lastElementChild.remove();
    },
  };
  remove.addEventListener('click', () => {
    state.watches.delete(key);
    chip.remove();
    if (state.client) {
      state.client.unwatch(kind, id, watch.handler).then(
        () => log('info', `stopped watching ${kind}/${id}`),
        (error) => log('error', `unwatch ${kind}/${id}: ${describeError(error)}`),
      );
    }
  });
  state.watches.set(key, watch);
  $('watch-list').append(chip);
  watchOn(watch);
}

function wsFlag() {
  const url = (state.welcome && state.welcome.url) || state.urls[0];
  return url ? ` --url ${url.replace(/\/$/, '')}` : '';
}

function updateWatchHints() {
  const kind = $('watch-kind').value.trim() || 'document';
  const id = $('watch-id').value.trim() || '42';
  const body = `{"watchable": {"kind": ${JSON.stringify(kind)}, "id": ${JSON.stringify(id)}},\n       "data": "saved"}`;
  const quoted = `'${body.replace(/'/g, "'\\''")}'`;
  $('notify-hint').textContent = [
    'curl -s \\',
    '  -H "Authorization: Bearer $MESHD_API_KEY" \\',
    `  -d ${quoted} \\`,
    '  http://127.0.0.1:API_PORT/api/notify',
  ].join('\n');
  const shellArg = (s) => (/^[\w./:@-]+$/.test(s) ? s : `'${s.replace(/'/g, "'\\''")}'`);
  $('watch-hint').textContent = `meshctl watch ${shellArg(kind)} ${shellArg(id)}${wsFlag()}`;
}

$('watch-form').addEventListener('submit', (event) => {
  event.preventDefault();
  addWatch($('watch-kind').value, $('watch-id').value);
});
$('watch-kind').addEventListener('input', updateWatchHints);
$('watch-id').addEventListener('input', updateWatchHints);

// ---- cluster view --------------------------------------------------------------------------

function linkBadge(link) {
  const name = link || 'down';
  return el('span', { class: `linkstate ls-${name.replace(/[^a-z]/gi, '')}`, 'data-link': name, text: name });
}

function renderCluster(cluster) {
  state.cluster = cluster;
  const info = cluster.info || {};
  const node = info.node || {};
  setText('cluster-node-name', node.name || 'this node');
  setText('cluster-node-id', node.id || '', node.id);
  $('cluster-node').dataset.node = node.id || '';
  setText('cluster-node-meta', `meshd ${node.version || '?'} · up ${duration(node.uptime || 0)}`);
  setText('count-sessions', String(info.sessions ?? '–'));
  setText('count-members', String(info.members ?? '–'));
  setText('count-channels', String(info.channels ?? '–'));
  const mesh = info.mesh;
  const peers = mesh ? mesh.peers || [] : [];
  setText('count-links', mesh ? String(peers.filter((p) => p.link === 'open').length) : '–');
  setText('mesh-name', mesh ? `cluster “${mesh.cluster}” · mesh address ${mesh.advertise}` : 'no mesh');
  const peerRows = peers.map((peer) => el('tr', { 'data-testid': 'peer', 'data-peer': peer.id, 'data-link': peer.link || 'down' },
    el('td', { class: 'nowrap' },
      peer.name ? el('strong', { class: 'peer-name', text: `${peer.name} ` }) : false,
      el('code', { class: 'id', title: peer.id, text: shortId(peer.id) }), el('span', { class: 'here-tag', text: 'your session' })),
    el('td', { class: 'nowrap' }, el('code', { text: peer.address || '?' })),
    el('td', { class: 'nowrap', title: peer.link ? `link ${peer.link}` : peer.linked_once ? 'no link now; it was linked before' : 'never linked yet' },
      linkBadge(peer.link))));
  if (!mesh) {
    peerRows.push(el('tr', {}, el('td', { colspan: 3, class: 'empty', text: 'no mesh: this node runs alone (no [mesh] section)' })));
  } else if (peers.length === 0) {
    peerRows.push(el('tr', {}, el('td', { colspan: 3, class: 'empty', text: 'no peers known yet' })));
  }
  $('cluster-peers').replaceChildren(...peerRows);
  const channels = cluster.channels || [];
  const channelRows = channels.map((c) => el('tr', { 'data-testid': 'channel-row', 'data-channel': c.channel, 'data-nodes': (c.cluster || []).length },
    el('td', {}, el('code', { text: c.channel })),
    el('td', { class: 'num-cell', text: String(c.subscribers) }),
    el('td', {}, ...(c.cluster || []).map((id) => el('span', { class: 'node-chip', title: id, text: nodeLabel(id) })))));
  if (channels.length === 0) channelRows.push(el('tr', {}, el('td', { colspan: 3, class: 'empty', text: 'no channel has subscribers' })));
  $('cluster-channels').replaceChildren(...channelRows);
  highlightCluster();
}

/** Mark the node this page's session is on, in the cluster view. */
function highlightCluster() {
  const connected = state.client && state.client.state === 'connected' && state.welcome ? state.welcome.node : '';
  $('cluster-node').classList.toggle('here', Boolean(connected) && $('cluster-node').dataset.node === connected);
  for (const row of $('cluster-peers').querySelectorAll('tr[data-peer]')) {
    row.classList.toggle('here', row.dataset.peer === connected);
  }
}

async function pollCluster() {
  try {
    const cluster = await fetchJson('/demo/cluster.json');
    renderCluster(cluster);
    $('cluster-error').hidden = true;
    setText('cluster-updated', `· updated ${clock()}`);
  } catch (error) {
    const note = $('cluster-error');
    note.textContent = `Cannot reach this page's node (${describeError(error)}). The view shows what it last knew; `
      + 'the chat goes on through the other nodes.';
    note.hidden = false;
  } finally {
    setTimeout(pollCluster, CLUSTER_EVERY);
  }
}

// ---- start ---------------------------------------------------------------------------------

function fatal(message) {
  const note = $('fatal');
  note.textContent = message;
  note.hidden = false;
  log('error', message);
}

function websocketUrls(config) {
  const override = new URLSearchParams(location.search).get('ws');
  if (override) {
    return override.split(',').map((u) => u.trim()).filter(Boolean);
  }
  return (config.websocket || []).map((l) => `${l.tls ? 'wss' : 'ws'}://${location.hostname}:${l.port}/`);
}

async function main() {
  updateWatchHints();
  updateComposer();
  pollCluster();
  let config;
  try {
    config = await fetchJson('/demo/config.json');
  } catch (error) {
    fatal(`Cannot load /demo/config.json: ${describeError(error)}`);
    return;
  }
  state.config = config;
  const node = config.node || {};
  setText('page-node', node.name ? `${node.name} · ${shortId(node.id)}` : shortId(node.id), node.id);
  state.urls = websocketUrls(config);
  showUrls(state.urls);
  if (state.urls.length === 0) {
    fatal('This node has no WebSocket listener the page can reach (and no ?ws= was given).');
    return;
  }
  try {
    const mod = await import('/static/meshd-client.js');
    state.MeshClient = mod.MeshClient;
  } catch (error) {
    fatal(`Cannot load the browser client /static/meshd-client.js: ${describeError(error)}`);
    return;
  }
  log('info', `page served by ${node.name || shortId(node.id)}; nodes to try: ${state.urls.join(', ')}`);
  startClient();
  let rooms = ['lobby'];
  try {
    const saved = JSON.parse(storage('meshd-demo-rooms') || 'null');
    if (Array.isArray(saved)) rooms = saved.filter((r) => typeof r === 'string' && r);
  } catch {
    // keep the default
  }
  for (const room of rooms) joinRoom(room);
  if (rooms.length) selectRoom(rooms[0]);
  updateWatchHints();
}

// For a look from the developer tools; the page does not need it.
window.meshdDemo = state;

main().catch((error) => fatal(`The page failed: ${describeError(error)}`));
