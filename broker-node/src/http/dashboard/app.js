// FlockMQ's dashboard: a single page over the admin API (/api/v1), routed by the
// URL's hash (#/cluster, #/clients?like=x&page=2, #/clients/{id}, ...), so the back
// button and deep links work. Every value from the broker reaches the page as text
// (textContent), never as markup. Each page sets `data-ready` on <main> once its
// first data is shown; the browser test waits for it.
'use strict';

(function () {
  const main = document.getElementById('main');
  const toast = document.getElementById('toast');

  // ---- helpers -------------------------------------------------------------------

  // el('td', {class: 'num'}, 'text', child, ...): an element with attributes and
  // children (strings become text nodes; null and false are skipped).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else if (key === 'class') node.className = value;
      else if (key === 'text') node.textContent = value;
      else if (key in node && typeof value !== 'string') node[key] = value;
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const svgNs = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(svgNs, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    return node;
  }

  async function api(path, options) {
    const response = await fetch('/api/v1' + path, Object.assign({
      credentials: 'same-origin',
      headers: { Accept: 'application/json' },
    }, options || {}));
    if (response.status === 401) {
      location.reload(); // the server answers the sign-in page
      throw new Error('signed out');
    }
    if (response.status === 204) return null;
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new Error((body && body.message) || response.status + ' ' + response.statusText);
    return body;
  }

  let toastTimer = null;
  function say(message) {
    toast.textContent = message;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { toast.textContent = ''; }, 5000);
  }

  function fmtNum(n) {
    if (n === null || n === undefined) return '–';
    return Number(n).toLocaleString('en-US', { maximumFractionDigits: 1 });
  }

  function fmtRate(n) {
    if (n === null || n === undefined) return '–';
    return Number(n).toLocaleString('en-US', { maximumFractionDigits: n < 10 ? 1 : 0 }) + '/s';
  }

  function fmtTime(ms) {
    if (!ms) return '–';
    return new Date(ms).toLocaleString();
  }

  function fmtUptime(secs) {
    if (secs === null || secs === undefined) return '–';
    const d = Math.floor(secs / 86400), h = Math.floor(secs / 3600) % 24,
      m = Math.floor(secs / 60) % 60, s = secs % 60;
    if (d) return d + 'd ' + h + 'h';
    if (h) return h + 'h ' + m + 'm';
    if (m) return m + 'm ' + s + 's';
    return s + 's';
  }

  function badge(kind, text) { return el('span', { class: 'badge ' + kind, text }); }

  function lastRate(stats) {
    const h = stats.history || [];
    return h.length ? h[h.length - 1] : { received: 0, sent: 0, dropped: 0 };
  }

  // A table: `columns` are [header, className?]; `rows` arrays of cells.
  function table(caption, columns, rows, empty) {
    const head = el('tr', null, columns.map(([name, cls]) => el('th', { scope: 'col', class: cls, text: name })));
    const body = rows.length
      ? rows.map((cells) => el('tr', null, cells.map((cell, i) => {
        const cls = columns[i] && columns[i][1];
        return cell instanceof Node && cell.tagName === 'TD' ? cell : el('td', { class: cls }, cell);
      })))
      : [el('tr', null, el('td', { colspan: columns.length, class: 'muted', text: empty || 'Nothing here.' }))];
    return el('div', { class: 'table-wrap' },
      el('table', { 'aria-label': caption }, el('thead', null, head), el('tbody', null, body)));
  }

  function field(label, input) {
    const id = input.id || ('f-' + Math.random().toString(36).slice(2));
    input.id = id;
    return el('div', { class: 'field' }, el('label', { for: id, text: label }), input);
  }

  function checkbox(label, input) {
    const id = input.id || ('f-' + Math.random().toString(36).slice(2));
    input.id = id;
    return el('div', { class: 'field inline' }, input, el('label', { for: id, text: label }));
  }

  function link(href, text, attrs) { return el('a', Object.assign({ href }, attrs || {}), text); }

  // The hash route of a page with query parameters (empty ones left out).
  function route(path, params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params || {})) if (v !== '' && v !== null && v !== undefined) q.set(k, v);
    const s = q.toString();
    return '#/' + path + (s ? '?' + s : '');
  }

  function topicPath(topic) { return topic.split('/').map(encodeURIComponent).join('/'); }

  // ---- routing ---------------------------------------------------------------------

  const pages = {};
  let generation = 0;
  let timers = [];
  let cleanups = [];

  // What a page gets: whether it is still the one shown, periodic refresh, cleanup.
  function context(gen) {
    return {
      alive: () => gen === generation,
      every(ms, fn) { timers.push(setInterval(() => { if (gen === generation) fn(); }, ms)); },
      onLeave(fn) { cleanups.push(fn); },
      ready() { if (gen === generation) main.dataset.ready = main.dataset.page; },
    };
  }

  async function render() {
    generation += 1;
    const gen = generation;
    timers.forEach(clearInterval);
    timers = [];
    cleanups.forEach((fn) => { try { fn(); } catch (e) { /* leaving anyway */ } });
    cleanups = [];
    const hash = location.hash.replace(/^#\/?/, '');
    const [path, query] = hash.split('?');
    const parts = path.split('/').filter((p) => p !== '').map(decodeURIComponent);
    const name = pages[parts[0]] ? parts[0] : 'cluster';
    const params = new URLSearchParams(query || '');
    for (const a of document.querySelectorAll('header nav a')) {
      if (a.dataset.page === name) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
    }
    delete main.dataset.ready;
    main.dataset.page = name + (parts.length > 1 ? '-detail' : '');
    main.replaceChildren();
    const ctx = context(gen);
    try {
      await pages[name](ctx, parts.slice(1), params);
    } catch (e) {
      if (!ctx.alive()) return;
      main.append(el('p', { class: 'error', role: 'alert', text: 'Could not load this page: ' + e.message }));
      ctx.ready();
    }
  }

  function go(hash) { if (location.hash !== hash) location.hash = hash; else render(); }

  // ---- cluster ---------------------------------------------------------------------

  pages.cluster = async function (ctx) {
    document.title = 'Cluster · FlockMQ';
    main.append(el('h1', { text: 'Cluster' }));
    const summary = el('div', { class: 'cards', 'aria-label': 'Cluster summary', role: 'group' });
    const nodes = el('section', { 'aria-labelledby': 'nodes-h' });
    const forwarding = el('section', { 'aria-labelledby': 'fwd-h' });
    main.append(summary, nodes, forwarding);

    async function refresh() {
      const [status, stats] = await Promise.all([api('/cluster'), api('/cluster/stats')]);
      if (!ctx.alive()) return;
      const byId = new Map(stats.data.map((s) => [s.node_id, s]));
      const answering = stats.data.filter((s) => !s.error);
      const total = (key) => answering.reduce((n, s) => n + (s[key] || 0), 0);
      const rate = (key) => answering.reduce((n, s) => n + lastRate(s)[key], 0);
      const card = (label, value) => el('div', { class: 'card' }, el('div', { class: 'label', text: label }), el('div', { class: 'value', text: value }));
      summary.replaceChildren(
        card('Leader', status.leader === null ? 'none' : 'node ' + status.leader),
        card('Term', fmtNum(status.term)),
        card('Applied index', fmtNum(status.last_applied_index)),
        card('Nodes answering', answering.length + ' of ' + stats.data.length),
        card('Sessions', fmtNum(status.sessions)),
        card('Connections', fmtNum(total('connections'))),
        card('Received', fmtRate(rate('received'))),
        card('Sent', fmtRate(rate('sent'))),
        card('Dropped', fmtRate(rate('dropped'))),
      );
      const rows = status.members.map((m) => {
        const s = byId.get(m.id) || { error: 'no answer' };
        const r = lastRate(s);
        let health;
        if (s.error) health = badge('bad', 'unreachable');
        else if (s.apply_lag > 1000) health = badge('warn', 'behind by ' + fmtNum(s.apply_lag));
        else health = badge('ok', 'healthy');
        const role = m.role === 'leader' ? badge('info', 'leader') : m.role;
        return [
          el('td', null, 'node ' + m.id, m.id === status.node_id ? el('span', { class: 'muted', text: ' (this node)' }) : null),
          el('td', { class: 'mono', text: m.addr }),
          el('td', null, role),
          health,
          s.error ? el('td', { class: 'error', text: s.error }) : el('td', { text: s.raft_state }),
          el('td', { class: 'num', text: fmtNum(s.term) }),
          el('td', { class: 'num', text: fmtNum(s.applied_index) }),
          el('td', { class: 'num', text: fmtNum(s.connections) }),
          el('td', { class: 'num', text: s.error ? '–' : fmtRate(r.received) }),
          el('td', { class: 'num', text: s.error ? '–' : fmtRate(r.sent) }),
          el('td', { class: 'num', text: s.error ? '–' : fmtRate(r.dropped) }),
          el('td', { class: 'num', text: fmtUptime(s.uptime_secs) }),
        ];
      });
      nodes.replaceChildren(el('h2', { id: 'nodes-h', text: 'Nodes' }), table('Nodes', [
        ['Node'], ['Address'], ['Role'], ['Health'], ['Raft state'], ['Term', 'num'], ['Applied', 'num'],
        ['Connections', 'num'], ['Received', 'num'], ['Sent', 'num'], ['Dropped', 'num'], ['Uptime', 'num'],
      ], rows));
      const links = [];
      for (const s of answering) {
        for (const p of s.peers || []) {
          links.push([
            'node ' + s.node_id + ' → node ' + p.node_id,
            p.up ? badge('ok', 'open') : badge('bad', 'down'),
            el('td', { class: 'num', text: fmtNum(p.sent) }),
            el('td', { class: 'num', text: fmtNum(p.dropped) }),
            el('td', { class: 'num', text: fmtNum(p.queued) }),
          ]);
        }
      }
      forwarding.replaceChildren(el('h2', { id: 'fwd-h', text: 'Forwarding between nodes' }), table('Forwarding', [
        ['Stream'], ['State'], ['Messages sent', 'num'], ['Dropped', 'num'], ['Queued', 'num'],
      ], links, 'No message has been forwarded between nodes yet.'));
      ctx.ready();
    }
    await refresh();
    ctx.every(2000, () => refresh().catch((e) => say('Refresh failed: ' + e.message)));
  };

  // ---- clients ---------------------------------------------------------------------

  async function kick(id) {
    await api('/clients/' + encodeURIComponent(id), { method: 'DELETE' });
    say('Client ' + id + ' kicked.');
  }

  pages.clients = async function (ctx, parts, params) {
    if (parts.length) return clientDetail(ctx, parts[0]);
    document.title = 'Clients · FlockMQ';
    const like = params.get('like') || '';
    const state = params.get('state') || 'connected';
    const page = Math.max(1, parseInt(params.get('page') || '1', 10) || 1);
    const limit = parseInt(params.get('limit') || '25', 10) || 25;
    const search = el('input', { type: 'search', value: like, placeholder: 'part of a client id' });
    const which = el('select', null,
      el('option', { value: 'connected', text: 'Connected' }),
      el('option', { value: 'all', text: 'All sessions' }),
      el('option', { value: 'disconnected', text: 'Disconnected' }));
    which.value = state;
    const size = el('select', null, [10, 25, 50, 100].map((n) => el('option', { value: n, text: n })));
    size.value = String(limit);
    const apply = (p) => go(route('clients', { like: search.value.trim(), state: which.value, limit: size.value, page: p }));
    const form = el('form', { class: 'toolbar', role: 'search', onsubmit: (e) => { e.preventDefault(); apply(1); } },
      field('Search clients', search), field('Show', which), field('Per page', size),
      el('button', { type: 'submit', class: 'primary', text: 'Search' }));
    which.addEventListener('change', () => apply(1));
    size.addEventListener('change', () => apply(1));
    const list = el('section', { 'aria-label': 'Clients' });
    main.append(el('h1', { text: 'Clients' }), form, list);

    async function refresh() {
      const q = new URLSearchParams({ page, limit });
      if (like) q.set('like', like);
      if (state !== 'all') q.set('connected', state === 'connected');
      const result = await api('/sessions?' + q);
      if (!ctx.alive()) return;
      const rows = result.data.map((c) => [
        link(route('clients/' + encodeURIComponent(c.clientid)), c.clientid, { class: 'mono' }),
        'node ' + c.node,
        c.connected ? badge('ok', 'connected') : badge('warn', 'disconnected'),
        c.proto_ver === 5 ? '5.0' : c.proto_ver === 4 ? '3.1.1' : String(c.proto_ver),
        el('td', { class: 'num', text: fmtNum(c.subscriptions_cnt) }),
        el('td', { class: 'num', text: fmtNum(c.mqueue_len) }),
        c.connected
          ? el('button', { class: 'danger', type: 'button', 'aria-label': 'Kick ' + c.clientid, text: 'Kick',
            onclick: () => kick(c.clientid).then(refresh).catch((e) => say('Kick failed: ' + e.message)) })
          : '',
      ]);
      const pageCount = Math.max(1, Math.ceil(result.meta.count / result.meta.limit));
      list.replaceChildren(
        table('Clients', [['Client id'], ['Node'], ['State'], ['Protocol'], ['Subscriptions', 'num'], ['Queued', 'num'], ['Action']],
          rows, like ? 'No client matches.' : 'No clients.'),
        el('nav', { class: 'pager', 'aria-label': 'Pages of clients' },
          el('button', { type: 'button', text: 'Previous', 'aria-label': 'Previous page', disabled: page <= 1, onclick: () => apply(page - 1) }),
          el('span', { text: 'Page ' + page + ' of ' + pageCount + ' · ' + fmtNum(result.meta.count) + ' in all' }),
          el('button', { type: 'button', text: 'Next', 'aria-label': 'Next page', disabled: !result.meta.hasnext, onclick: () => apply(page + 1) })));
      ctx.ready();
    }
    await refresh();
    ctx.every(3000, () => refresh().catch((e) => say('Refresh failed: ' + e.message)));
  };

  async function clientDetail(ctx, id) {
    document.title = id + ' · Clients · FlockMQ';
    main.append(el('p', null, link(route('clients'), '← All clients')), el('h1', { class: 'mono', text: id }));
    const body = el('div');
    main.append(body);
    async function refresh() {
      // Through the lists, which answer an ended session with nothing, not an error.
      const q = new URLSearchParams({ clientid: id });
      const [listed, subs] = await Promise.all([api('/sessions?' + q), api('/subscriptions?' + q + '&limit=10000')]);
      const c = listed.data[0];
      if (!ctx.alive()) return;
      if (!c) {
        body.replaceChildren(el('p', { class: 'muted', text: 'No session for this client.' }));
        ctx.ready();
        return;
      }
      const fact = (k, v) => [el('dt', { text: k }), el('dd', null, v)];
      body.replaceChildren(
        el('section', { class: 'panel', 'aria-label': 'Session' },
          el('dl', { class: 'facts' },
            fact('State', c.connected ? badge('ok', 'connected') : badge('warn', 'disconnected')),
            fact('Node', 'node ' + c.node),
            fact('Protocol', c.proto_ver === 5 ? 'MQTT 5.0' : c.proto_ver === 4 ? 'MQTT 3.1.1' : String(c.proto_ver)),
            fact('Session expiry', c.expiry_interval === 4294967295 ? 'never' : fmtNum(c.expiry_interval) + ' s'),
            fact('Disconnected at', fmtTime(c.disconnected_at)),
            fact('Queued messages', fmtNum(c.mqueue_len) + ' (' + fmtNum(c.mqueue_bytes) + ' bytes)'),
            fact('Will', c.will ? 'yes' : 'no')),
          c.connected ? el('p', null, el('button', { class: 'danger', type: 'button', 'aria-label': 'Kick ' + id, text: 'Kick this client',
            onclick: () => kick(id).then(refresh).catch((e) => say('Kick failed: ' + e.message)) })) : null),
        el('h2', { text: 'Subscriptions' }),
        table('Subscriptions', [['Topic filter'], ['QoS', 'num'], ['No local'], ['Retain as published'], ['Retain handling', 'num']],
          subs.data.map((s) => [el('td', { class: 'mono', text: s.topic }), el('td', { class: 'num', text: s.qos }),
            s.nl ? 'yes' : 'no', s.rap ? 'yes' : 'no', el('td', { class: 'num', text: s.rh })]), 'No subscriptions.'));
      ctx.ready();
    }
    await refresh();
    ctx.every(3000, () => refresh().catch((e) => say('Refresh failed: ' + e.message)));
  }

  // ---- subscriptions and shared groups ------------------------------------------------

  pages.subscriptions = async function (ctx, parts, params) {
    document.title = 'Subscriptions · FlockMQ';
    const like = params.get('like') || '';
    const page = Math.max(1, parseInt(params.get('page') || '1', 10) || 1);
    const search = el('input', { type: 'search', value: like, placeholder: 'part of a topic filter' });
    const apply = (p) => go(route('subscriptions', { like: search.value.trim(), page: p }));
    const form = el('form', { class: 'toolbar', role: 'search', onsubmit: (e) => { e.preventDefault(); apply(1); } },
      field('Search topic filters', search), el('button', { type: 'submit', class: 'primary', text: 'Search' }));
    const subs = el('section', { 'aria-labelledby': 'subs-h' });
    const groups = el('section', { 'aria-labelledby': 'groups-h' });
    main.append(el('h1', { text: 'Subscriptions' }), form, subs, groups);
    async function refresh() {
      const q = new URLSearchParams({ page, limit: 50 });
      if (like) q.set('like', like);
      const [list, shared] = await Promise.all([api('/subscriptions?' + q), api('/shared?' + (like ? new URLSearchParams({ like }) : ''))]);
      if (!ctx.alive()) return;
      subs.replaceChildren(el('h2', { id: 'subs-h', text: 'Subscriptions (' + fmtNum(list.meta.count) + ')' }),
        table('Subscriptions', [['Client id'], ['Topic filter'], ['QoS', 'num'], ['Options']],
          list.data.map((s) => [link(route('clients/' + encodeURIComponent(s.clientid)), s.clientid, { class: 'mono' }),
            el('td', { class: 'mono', text: s.topic }), el('td', { class: 'num', text: s.qos }),
            [s.nl ? 'no local' : '', s.rap ? 'retain as published' : '', s.subid ? 'id ' + s.subid : ''].filter(Boolean).join(', ') || '–']),
          'No subscriptions.'),
        el('nav', { class: 'pager', 'aria-label': 'Pages of subscriptions' },
          el('button', { type: 'button', text: 'Previous', 'aria-label': 'Previous page', disabled: page <= 1, onclick: () => apply(page - 1) }),
          el('span', { text: 'Page ' + page }),
          el('button', { type: 'button', text: 'Next', 'aria-label': 'Next page', disabled: !list.meta.hasnext, onclick: () => apply(page + 1) })));
      groups.replaceChildren(el('h2', { id: 'groups-h', text: 'Shared groups (' + fmtNum(shared.meta.count) + ')' }),
        table('Shared groups', [['Group'], ['Topic filter'], ['Members']],
          shared.data.map((g) => [el('td', { class: 'mono', text: g.group }), el('td', { class: 'mono', text: g.topic }),
            el('td', null, g.members.map((m, i) => [i ? ', ' : '', link(route('clients/' + encodeURIComponent(m.clientid)), m.clientid, { class: 'mono' }),
              ' (node ' + m.node + (m.connected ? '' : ', offline') + ')']))]),
          'No shared subscriptions.'));
      ctx.ready();
    }
    await refresh();
    ctx.every(3000, () => refresh().catch((e) => say('Refresh failed: ' + e.message)));
  };

  // ---- retained messages ----------------------------------------------------------------

  pages.retained = async function (ctx, parts, params) {
    document.title = 'Retained messages · FlockMQ';
    const prefix = params.get('prefix') || '';
    const page = Math.max(1, parseInt(params.get('page') || '1', 10) || 1);
    const input = el('input', { type: 'search', value: prefix, placeholder: 'e.g. sensors/' });
    const apply = (p, pre) => go(route('retained', { prefix: pre === undefined ? input.value : pre, page: p }));
    const form = el('form', { class: 'toolbar', role: 'search', onsubmit: (e) => { e.preventDefault(); apply(1); } },
      field('Topic prefix', input), el('button', { type: 'submit', class: 'primary', text: 'Browse' }));
    // Breadcrumbs of the prefix's levels, to go back up.
    const crumbs = el('nav', { 'aria-label': 'Topic levels', class: 'toolbar' });
    const levels = prefix.split('/').filter((l, i, all) => l !== '' || i < all.length - 1);
    crumbs.append(link(route('retained'), 'all topics'));
    let acc = '';
    for (const level of levels) {
      acc += level + '/';
      crumbs.append(' / ', link(route('retained', { prefix: acc }), level));
    }
    const list = el('section', { 'aria-label': 'Retained messages' });
    main.append(el('h1', { text: 'Retained messages' }), form, crumbs, list);
    const opened = new Set();

    async function refresh() {
      const q = new URLSearchParams({ page, limit: 50 });
      if (prefix) q.set('prefix', prefix);
      const result = await api('/retained?' + q);
      if (!ctx.alive()) return;
      // Deeper levels under the prefix, for browsing down.
      const below = new Set();
      for (const m of result.data) {
        const rest = m.topic.slice(prefix.length);
        const cut = rest.indexOf('/');
        if (cut >= 0) below.add(prefix + rest.slice(0, cut + 1));
      }
      const rows = [];
      for (const m of result.data) {
        const shown = el('td', { class: 'mono' }, m.topic);
        const view = el('button', { type: 'button', text: opened.has(m.topic) ? 'Hide' : 'View', 'aria-label': 'View retained ' + m.topic,
          'aria-expanded': opened.has(m.topic) ? 'true' : 'false',
          onclick: () => { if (opened.has(m.topic)) opened.delete(m.topic); else opened.add(m.topic); refresh().catch((e) => say(e.message)); } });
        const del = el('button', { type: 'button', class: 'danger', text: 'Delete', 'aria-label': 'Delete retained ' + m.topic,
          onclick: async () => {
            try {
              await api('/retained/' + topicPath(m.topic), { method: 'DELETE' });
              say('Retained message on ' + m.topic + ' deleted.');
              opened.delete(m.topic);
              await refresh();
            } catch (e) { say('Delete failed: ' + e.message); }
          } });
        if (opened.has(m.topic)) {
          try {
            const full = await api('/retained/' + topicPath(m.topic));
            shown.append(el('pre', { class: 'payload', text: full.payload_encoding === 'base64' ? '(base64) ' + full.payload : full.payload }));
          } catch (e) { shown.append(el('p', { class: 'error', text: e.message })); }
          if (!ctx.alive()) return;
        }
        rows.push([shown, el('td', { class: 'num', text: m.qos }), el('td', { class: 'num', text: fmtNum(m.payload_size) + ' B' }),
          fmtTime(m.publish_at), el('td', null, view, ' ', del)]);
      }
      list.replaceChildren(
        below.size ? el('p', { class: 'levels' }, 'Levels below: ', Array.from(below).sort().map((b, i) => [i ? ', ' : '', link(route('retained', { prefix: b }), b.slice(prefix.length))])) : '',
        table('Retained messages', [['Topic'], ['QoS', 'num'], ['Size', 'num'], ['Set at'], ['Actions']], rows,
          prefix ? 'No retained message under ' + prefix + '.' : 'No retained messages.'),
        el('nav', { class: 'pager', 'aria-label': 'Pages of retained messages' },
          el('button', { type: 'button', text: 'Previous', 'aria-label': 'Previous page', disabled: page <= 1, onclick: () => apply(page - 1, prefix) }),
          el('span', { text: 'Page ' + page + ' · ' + fmtNum(result.meta.count) + ' in all' }),
          el('button', { type: 'button', text: 'Next', 'aria-label': 'Next page', disabled: !result.meta.hasnext, onclick: () => apply(page + 1, prefix) })));
      ctx.ready();
    }
    await refresh();
    ctx.every(5000, () => refresh().catch((e) => say('Refresh failed: ' + e.message)));
  };

  // ---- charts ---------------------------------------------------------------------------

  // Sum the nodes' per-second samples (or take one node's), by second.
  function series(stats, node) {
    const buckets = new Map();
    for (const s of stats) {
      if (s.error || (node !== 'all' && String(s.node_id) !== node)) continue;
      for (const h of s.history || []) {
        const t = Math.round(h.at_ms / 1000);
        const b = buckets.get(t) || { t, received: 0, sent: 0, dropped: 0 };
        b.received += h.received; b.sent += h.sent; b.dropped += h.dropped;
        buckets.set(t, b);
      }
    }
    return Array.from(buckets.values()).sort((a, b) => a.t - b.t);
  }

  function niceMax(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  // An SVG line chart of `keys` of `points` ({t, ...}); drawn by hand.
  function lineChart(title, points, keys) {
    const W = 900, H = 240, L = 56, R = 12, T = 12, B = 28;
    const max = niceMax(Math.max(0, ...points.flatMap((p) => keys.map((k) => p[k]))));
    const t1 = points.length ? points[points.length - 1].t : Math.round(Date.now() / 1000);
    const t0 = Math.min(points.length ? points[0].t : t1, t1 - 60);
    const x = (t) => L + (W - L - R) * (t - t0) / Math.max(1, t1 - t0);
    const y = (v) => T + (H - T - B) * (1 - v / max);
    const summary = keys.map((k) => k + ' ' + fmtRate(points.length ? points[points.length - 1][k] : 0)).join(', ');
    const chart = svg('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', role: 'img', 'aria-label': title + ': now ' + summary },
      svg('title', null, title));
    for (let i = 0; i <= 4; i++) {
      const v = max * i / 4;
      chart.append(svg('line', { class: 'grid', x1: L, x2: W - R, y1: y(v), y2: y(v) }),
        svg('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end' }, Number(v.toPrecision(3)).toLocaleString('en-US')));
    }
    chart.append(svg('line', { class: 'axis', x1: L, x2: L, y1: T, y2: H - B }), svg('line', { class: 'axis', x1: L, x2: W - R, y1: H - B, y2: H - B }));
    const span = t1 - t0;
    const step = span > 240 ? 60 : span > 120 ? 30 : 15;
    for (let t = t1; t >= t0; t -= step) {
      chart.append(svg('text', { x: x(t), y: H - 8, 'text-anchor': 'middle' }, t === t1 ? 'now' : '−' + (t1 - t) + 's'));
    }
    for (const k of keys) {
      if (points.length < 2) continue;
      chart.append(svg('polyline', { class: 'line ' + k, points: points.map((p) => x(p.t).toFixed(1) + ',' + y(p[k]).toFixed(1)).join(' ') }));
    }
    return el('figure', { class: 'panel' }, el('figcaption', null, el('strong', { text: title })), chart,
      el('ul', { class: 'legend', 'aria-label': 'Legend' }, keys.map((k) => el('li', { class: k, text: k }))));
  }

  pages.charts = async function (ctx, parts, params) {
    document.title = 'Charts · FlockMQ';
    const node = params.get('node') || 'all';
    const which = el('select', null, el('option', { value: 'all', text: 'All nodes' }));
    const form = el('form', { class: 'toolbar', onsubmit: (e) => e.preventDefault() }, field('Nodes', which));
    which.addEventListener('change', () => go(route('charts', { node: which.value === 'all' ? '' : which.value })));
    const figures = el('div');
    main.append(el('h1', { text: 'Message rates' }), form, figures);
    let known = '';
    async function refresh() {
      const stats = await api('/cluster/stats');
      if (!ctx.alive()) return;
      const ids = stats.data.map((s) => String(s.node_id)).join(',');
      if (ids !== known) {
        known = ids;
        which.replaceChildren(el('option', { value: 'all', text: 'All nodes' }),
          stats.data.map((s) => el('option', { value: String(s.node_id), text: 'node ' + s.node_id })));
        which.value = node;
      }
      const points = series(stats.data, node);
      figures.replaceChildren(
        lineChart('Messages per second', points, ['received', 'sent']),
        lineChart('Drops per second', points, ['dropped']));
      ctx.ready();
    }
    await refresh();
    ctx.every(2000, () => refresh().catch((e) => say('Refresh failed: ' + e.message)));
  };

  // ---- topic tester -----------------------------------------------------------------------

  // The tester's connection outlives a visit to another page.
  const tester = { client: null, log: [] };

  pages.tester = async function (ctx) {
    document.title = 'Topic tester · FlockMQ';
    const stats = await api('/stats');
    if (!ctx.alive()) return;
    let url = '';
    if (stats.ws_addr) {
      const port = stats.ws_addr.slice(stats.ws_addr.lastIndexOf(':') + 1);
      url = 'ws://' + location.hostname + ':' + port + '/mqtt';
    }
    const urlIn = el('input', { type: 'url', value: url, size: 36, placeholder: 'ws://host:8083/mqtt' });
    const idIn = el('input', { type: 'text', value: 'dashboard-' + Math.random().toString(36).slice(2, 8) });
    const userIn = el('input', { type: 'text', autocomplete: 'username' });
    const passIn = el('input', { type: 'password', autocomplete: 'current-password' });
    const connectBtn = el('button', { type: 'submit', class: 'primary', text: 'Connect' });
    const disconnectBtn = el('button', { type: 'button', text: 'Disconnect' });
    const state = el('span', { role: 'status', id: 'tester-state' });
    const filterIn = el('input', { type: 'text', value: 'test/#' });
    const subQos = el('select', null, [0, 1, 2].map((q) => el('option', { value: q, text: 'QoS ' + q })));
    const topicIn = el('input', { type: 'text', value: 'test/hello' });
    const payloadIn = el('textarea', null);
    payloadIn.value = 'hello from the dashboard';
    const pubQos = el('select', null, [0, 1, 2].map((q) => el('option', { value: q, text: 'QoS ' + q })));
    const retainIn = el('input', { type: 'checkbox' });
    const log = el('ul', { class: 'log', 'aria-label': 'Received messages', 'aria-live': 'polite' });

    function showState() {
      const on = tester.client && tester.client.connected;
      state.replaceChildren(on ? badge('ok', 'connected') : badge('warn', 'not connected'));
      connectBtn.disabled = !!on;
      disconnectBtn.disabled = !on;
      for (const b of main.querySelectorAll('[data-needs-connection]')) b.disabled = !on;
    }
    function showLog() {
      log.replaceChildren(...tester.log.slice().reverse().map((m) => el('li', null,
        el('span', { class: 'topic', text: m.topic }), m.text, m.retain ? el('span', { class: 'muted', text: ' (retained)' }) : '')));
    }
    tester.onChange = () => { if (ctx.alive()) { showState(); showLog(); } };
    ctx.onLeave(() => { tester.onChange = null; });

    const connectForm = el('form', { class: 'toolbar', 'aria-label': 'Connection', onsubmit: async (e) => {
      e.preventDefault();
      const client = new window.MqttClient(urlIn.value.trim(), { clientId: idIn.value.trim(), username: userIn.value, password: passIn.value });
      client.onMessage = (topic, payload, flags) => {
        let text;
        try { text = new TextDecoder('utf-8', { fatal: true }).decode(payload); } catch (_) { text = '(' + payload.length + ' binary bytes)'; }
        tester.log.push({ topic, text, retain: flags.retain });
        if (tester.log.length > 200) tester.log.shift();
        if (tester.onChange) tester.onChange();
      };
      client.onClose = (reason) => { say('Tester disconnected: ' + reason); if (tester.onChange) tester.onChange(); };
      try {
        state.replaceChildren(badge('info', 'connecting'));
        await client.connect();
        tester.client = client;
        say('Connected to ' + urlIn.value);
      } catch (err) {
        say('Connection failed: ' + err.message);
      }
      if (ctx.alive()) showState();
    } },
    field('WebSocket URL', urlIn), field('Client id', idIn), field('User name', userIn), field('Password', passIn),
    connectBtn, disconnectBtn, state);
    disconnectBtn.addEventListener('click', () => { if (tester.client) tester.client.disconnect(); tester.client = null; showState(); });

    const subForm = el('form', { class: 'toolbar', 'aria-label': 'Subscribe', onsubmit: async (e) => {
      e.preventDefault();
      try {
        await tester.client.subscribe(filterIn.value.trim(), Number(subQos.value));
        say('Subscribed to ' + filterIn.value);
        main.dataset.subscribed = filterIn.value.trim();
      } catch (err) { say('Subscribe failed: ' + err.message); }
    } }, field('Topic filter', filterIn), field('Subscription QoS', subQos),
    el('button', { type: 'submit', 'data-needs-connection': true, text: 'Subscribe' }),
    el('button', { type: 'button', 'data-needs-connection': true, text: 'Unsubscribe', onclick: async () => {
      try { await tester.client.unsubscribe(filterIn.value.trim()); say('Unsubscribed from ' + filterIn.value); } catch (err) { say('Unsubscribe failed: ' + err.message); }
    } }));

    const pubForm = el('form', { 'aria-label': 'Publish', onsubmit: async (e) => {
      e.preventDefault();
      try {
        await tester.client.publish(topicIn.value.trim(), payloadIn.value, Number(pubQos.value), retainIn.checked);
        say('Published to ' + topicIn.value);
      } catch (err) { say('Publish failed: ' + err.message); }
    } },
    el('div', { class: 'toolbar' }, field('Topic', topicIn), field('Publish QoS', pubQos), checkbox('Retain', retainIn)),
    field('Payload', payloadIn),
    el('p', null, el('button', { type: 'submit', class: 'primary', 'data-needs-connection': true, text: 'Publish' })));

    append(main, [el('h1', { text: 'Topic tester' }),
      url ? null : el('p', { class: 'muted', text: 'This node has no WebSocket listener (ws_addr); give the URL of one.' }),
      el('section', { class: 'panel', 'aria-label': 'Connection' }, connectForm),
      el('div', { class: 'grid2' },
        el('section', { class: 'panel', 'aria-labelledby': 'sub-h' }, el('h2', { id: 'sub-h', text: 'Subscribe' }), subForm, log),
        el('section', { class: 'panel', 'aria-labelledby': 'pub-h' }, el('h2', { id: 'pub-h', text: 'Publish' }), pubForm))]);
    showState();
    showLog();
    ctx.ready();
  };

  // ---- start ------------------------------------------------------------------------------

  window.addEventListener('hashchange', render);
  api('/cluster').then((s) => {
    document.getElementById('served-by').textContent = 'served by node ' + s.node_id;
  }).catch(() => {});
  if (!location.hash) history.replaceState(null, '', '#/cluster');
  render();
})();
