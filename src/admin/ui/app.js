/* tokentap admin page: a hash router with one render function per view.
 *
 * The contract (endpoints, JSON shapes, auth/CSRF flow) is docs/admin-page.md.
 *
 * Security rule for this file: every string that comes from the API (user ids, team and model
 * names, error messages, request ids) reaches the DOM only as text (textContent, text nodes) or
 * through attribute setters (setAttribute, dataset). Nothing here parses markup: no innerHTML,
 * insertAdjacentHTML or document.write. The page runs under a CSP without 'unsafe-inline', so
 * there is no inline script or style; element.style is set from here only (CSSOM is allowed).
 *
 * Test hooks: <main id="view"> carries data-view (the view's name) and data-ready="1" once the
 * view's data is on screen. Every figure from the API carries data-field (the API field) and
 * data-value (the exact API value, "" for null).
 */
(function () {
  'use strict';

  const view = document.getElementById('view');
  const logoutButton = document.getElementById('logout');
  const versionLabel = document.getElementById('version');

  let session = null;   // GET /admin/api/session
  let gen = 0;          // route generation: a render whose generation is stale drops its result
  let leaving = [];     // cleanups (timers, charts) run when the route changes
  let statusFlash = null; // outcome of the last "Reload config", shown by the next Status render

  // What the user picked, kept across re-renders (not across page loads).
  const prefs = { top: 'month', chart: 'hourly', budgets: { q: '', sort: 'used', order: 'desc' } };

  // ---------------------------------------------------------------------------------------------
  // DOM helpers

  // h('td', {class: 'num', data: {field: 'calls', value: 3}}, 'text', node, [more]) builds an
  // element. Strings and numbers become text nodes; attributes go through setAttribute/dataset.
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'data') {
        for (const [dk, dv] of Object.entries(v)) if (dv !== undefined) el.dataset[dk] = dv === null ? '' : String(dv);
      } else if (typeof v === 'function') el.addEventListener(k.replace(/^on/, ''), v);
      else if (v === true) el[k] = true;
      else if (k === 'value') el.value = v;
      else el.setAttribute(k, String(v));
    }
    append(el, kids);
    return el;
  }

  function append(el, kids) {
    for (const kid of kids) {
      if (kid == null || kid === false) continue;
      if (Array.isArray(kid)) append(el, kid);
      else el.appendChild(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
  }

  // An element showing one API figure: data-field/data-value keep the exact value.
  function fig(tag, field, value, text, cls) {
    return h(tag, { class: cls, data: { field: field, value: value } }, text);
  }

  // Update a figure in place (Live view).
  function setFig(el, value, text) {
    el.dataset.value = value == null ? '' : String(value);
    if (el.textContent !== text) el.textContent = text;
  }

  function show(...nodes) { view.replaceChildren(); append(view, nodes); }
  function ready() { view.dataset.ready = '1'; }
  function notReady() { delete view.dataset.ready; }
  function onLeave(fn) { leaving.push(fn); }

  function userLink(name) { return h('a', { href: '#/users/' + encodeURIComponent(name) }, name); }
  function teamLink(name) { return h('a', { href: '#/teams/' + encodeURIComponent(name) }, name); }

  function select(id, options, value, onchange) {
    const el = h('select', { id: id, change: onchange },
      options.map(([v, label]) => h('option', { value: v, selected: v === value }, label)));
    el.value = value;
    return el;
  }

  // A table with a header row; `cols` are [label, className] pairs.
  function table(attrs, cols, rows) {
    return h('table', Object.assign({ class: 'data' }, attrs),
      h('thead', null, h('tr', null, cols.map(([label, cls]) => h('th', { class: cls, scope: 'col' }, label)))),
      h('tbody', null, rows));
  }

  // ---------------------------------------------------------------------------------------------
  // Formatting (display only: the exact value stays in data-value)

  const numFmt = (min, max) => new Intl.NumberFormat('en-US', { minimumFractionDigits: min, maximumFractionDigits: max });
  const NF_INT = numFmt(0, 0), NF_USD = numFmt(2, 2), NF_USD_SMALL = numFmt(2, 6), NF_1 = numFmt(0, 1);

  // "$1.23"; below $1 up to 6 decimals ("$0.000123"); never exponent notation.
  function usd(v) {
    if (v == null || v === '') return '—';
    const n = Number(v);
    if (!isFinite(n)) return String(v);
    const a = Math.abs(n);
    if (a > 0 && a < 0.000001) return (n < 0 ? '-' : '') + '<$0.000001';
    return (n < 0 ? '-$' : '$') + (a >= 1 || a === 0 ? NF_USD : NF_USD_SMALL).format(a);
  }
  function int(v) { return v == null ? '—' : NF_INT.format(Number(v)); }
  function pct(v) { return v == null ? '—' : NF_1.format(Number(v) * 100) + '%'; }
  function yesNo(v) { return v == null ? 'n/a' : v ? 'yes' : 'no'; }
  function time(s) {
    if (!s) return '—';
    const d = new Date(s);
    return isNaN(d) ? String(s) : d.toLocaleString();
  }
  // 812 ms, 1.2 s, 3 min 12 s, 2 h 5 min, 3 d 4 h
  function dur(ms) {
    if (ms == null) return '—';
    ms = Number(ms);
    if (ms < 1000) return Math.round(ms) + ' ms';
    const s = ms / 1000;
    if (s < 60) return NF_1.format(s) + ' s';
    const m = Math.floor(s / 60), hr = Math.floor(m / 60);
    if (s < 3600) return m + ' min ' + Math.floor(s % 60) + ' s';
    if (hr < 24) return hr + ' h ' + (m % 60) + ' min';
    return Math.floor(hr / 24) + ' d ' + (hr % 24) + ' h';
  }

  // ---------------------------------------------------------------------------------------------
  // API access

  class AuthError extends Error {}

  // GET a JSON endpoint. 401 throws AuthError (→ login view); other failures throw an Error whose
  // message is the API's error message (OpenAI-style {"error": {"message": ...}}) or the body.
  async function api(path) {
    const res = await fetch(path, { credentials: 'same-origin', headers: { Accept: 'application/json' } });
    if (res.status === 401) throw new AuthError('authentication required');
    const text = await res.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
    if (!res.ok) {
      const msg = (body && body.error && body.error.message) || text.trim() || res.statusText;
      throw new Error('HTTP ' + res.status + ': ' + msg);
    }
    return body;
  }

  // A state-changing POST: carries the session's CSRF token when there is one.
  function post(path) {
    const headers = {};
    if (session && session.csrf != null) headers['X-Tokentap-CSRF'] = session.csrf;
    return fetch(path, { method: 'POST', credentials: 'same-origin', headers: headers });
  }

  async function loadSession() {
    session = await api('/admin/api/session');
    updateHeader();
  }

  function needsLogin() { return !session || (session.auth === 'token' && !session.logged_in); }

  function updateHeader() {
    const inside = session && !needsLogin();
    logoutButton.hidden = !(inside && session.auth === 'token');
    versionLabel.textContent = inside && session.version ? 'v' + session.version : '';
    document.body.classList.toggle('logged-out', !inside);
  }

  // ---------------------------------------------------------------------------------------------
  // Router

  const routes = [
    [/^\/$/, 'overview', renderOverview],
    [/^\/budgets$/, 'budgets', renderBudgets],
    [/^\/users\/(.+)$/, 'user', (alive, name) => renderEntity('user', name, alive)],
    [/^\/teams\/(.+)$/, 'team', (alive, name) => renderEntity('team', name, alive)],
    [/^\/live$/, 'live', renderLive],
    [/^\/status$/, 'status', renderStatus],
  ];

  // Starts a new view: bumps the generation, runs the old view's cleanups, resets the hooks.
  function begin(name) {
    const g = ++gen;
    const cleanups = leaving;
    leaving = [];
    for (const fn of cleanups) { try { fn(); } catch (_) { /* already gone */ } }
    view.dataset.view = name;
    delete view.dataset.path;
    notReady();
    delete view.dataset.error;
    for (const a of document.querySelectorAll('#nav a')) {
      if (a.dataset.nav === name) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    return () => g === gen;
  }

  async function route() {
    if (needsLogin()) return renderLogin();
    const path = (location.hash.replace(/^#/, '') || '/').replace(/\?.*$/, '');
    for (const [re, name, render] of routes) {
      const m = re.exec(path);
      if (!m) continue;
      // Re-rendering the same address (new top period, after a reload): keep the old content
      // on screen until it is replaced, so the page does not jump.
      const same = view.dataset.view === name && view.dataset.path === path;
      const alive = begin(name);
      view.dataset.path = path;
      if (!same) show(h('p', { class: 'muted' }, 'Loading…'));
      let arg;
      try { arg = m[1] === undefined ? undefined : decodeURIComponent(m[1]); } catch (_) { arg = m[1]; }
      try { await render(alive, arg); } catch (e) { fail(alive, e); }
      return;
    }
    begin('notfound');
    show(h('h1', null, 'Not found'), h('p', null, 'No such view. ', h('a', { href: '#/' }, 'Back to the overview.')));
    ready();
  }

  // A render failed: a 401 shows the login form, anything else an error box (as text).
  function fail(alive, e) {
    if (!alive()) return;
    if (e instanceof AuthError) {
      if (session) session.logged_in = false;
      return renderLogin();
    }
    show(h('div', { class: 'alert error', role: 'alert' }, 'Could not load this view: ' + (e && e.message || e)));
    view.dataset.error = '1';
    ready();
  }

  // ---------------------------------------------------------------------------------------------
  // Login (shows no data at all)

  function renderLogin() {
    begin('login');
    updateHeader();
    const input = h('input', { name: 'token', type: 'password', id: 'login-token', autocomplete: 'current-password', required: true });
    const error = h('p', { class: 'alert error', role: 'alert', hidden: true });
    const button = h('button', { type: 'submit', class: 'primary' }, 'Log in');
    // method/action are the no-JS fallback: a POST body, never the token in a URL.
    const form = h('form', { id: 'login', class: 'card login', method: 'post', action: '/admin/login' },
      h('h1', null, 'tokentap admin'),
      h('label', { for: 'login-token' }, 'Admin token'), input, error, button);
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      button.disabled = true;
      error.hidden = true;
      let msg;
      try {
        const res = await fetch('/admin/login', {
          method: 'POST', body: new URLSearchParams({ token: input.value }), credentials: 'same-origin',
        });
        if (res.ok) {
          input.value = '';
          await loadSession();
          if (!needsLogin()) return route();
          msg = 'Logged in, but the browser did not keep the session cookie.';
        } else {
          msg = res.status === 401 ? 'Wrong token.' : 'Login failed (HTTP ' + res.status + ').';
        }
      } catch (e) {
        msg = 'Login failed: ' + (e && e.message || e);
      }
      error.textContent = msg;
      error.hidden = false;
      input.value = '';
      button.disabled = false;
      input.focus();
    });
    show(form);
    ready();
    input.focus();
  }

  logoutButton.addEventListener('click', async () => {
    logoutButton.disabled = true;
    try { await post('/admin/logout'); } catch (_) { /* the session check below decides */ }
    logoutButton.disabled = false;
    try { await loadSession(); } catch (_) { session = { auth: 'token', logged_in: false, csrf: null }; }
    updateHeader();
    route();
  });

  // ---------------------------------------------------------------------------------------------
  // Charts (uPlot)

  const PALETTE = ['#0969da', '#1a7f37', '#bf8700', '#8250df', '#cf222e', '#1b7c83', '#bc4c00', '#6e7781', '#bf3989', '#0550ae'];

  // Bars of USD per time slot, drawn into `el` (which must be in the document, for its width).
  // xs: Unix seconds; series: [{label, raw: [API decimal strings]}]; step: seconds per slot.
  // Several series are stacked: uPlot draws later series over earlier ones, so series k is drawn
  // as the running total of series 0..k, tallest first; the legend shows each one's own value.
  function spendChart(el, xs, series, step, xLabel) {
    if (typeof uPlot === 'undefined') {
      el.replaceChildren(h('p', { class: 'alert error' }, 'The chart library did not load.'));
      return;
    }
    if (el.chart) el.chart.destroy();
    const cum = [];
    series.forEach((s, i) => cum.push(s.raw.map((v, j) => (Number(v) || 0) + (i ? cum[i - 1][j] : 0))));
    const order = series.map((_, i) => series.length - 1 - i);
    const bars = uPlot.paths.bars({ size: [0.8, 64] });
    const height = 240;
    const opts = {
      width: Math.max(300, el.clientWidth || 800),
      height: height,
      cursor: { points: { show: false }, drag: { x: false, y: false } },
      scales: {
        x: { time: true, range: (u, min, max) => [min - step / 2, max + step / 2] },
        y: { range: (u, min, max) => [0, max > 0 ? max * 1.08 : 1] },
      },
      axes: [
        { stroke: '#57606a', grid: { stroke: '#eaeef2' } },
        { stroke: '#57606a', grid: { stroke: '#eaeef2' }, size: 72, values: (u, ticks) => ticks.map((v) => (v === 0 ? '$0' : usd(v))) },
      ],
      series: [{ label: 'Time', value: (u, t) => (t == null ? '—' : xLabel(t)) }].concat(order.map((i) => ({
        label: series[i].label,
        stroke: PALETTE[i % PALETTE.length],
        fill: PALETTE[i % PALETTE.length] + 'cc',
        width: 1,
        paths: bars,
        points: { show: false },
        value: (u, v, si, idx) => (idx == null ? '—' : usd(series[i].raw[idx])),
      }))),
    };
    const chart = new uPlot(opts, [xs].concat(order.map((i) => cum[i])), el);
    const ro = new ResizeObserver(() => chart.setSize({ width: Math.max(300, el.clientWidth), height: height }));
    ro.observe(el);
    el.chart = chart;
    onLeave(() => { ro.disconnect(); chart.destroy(); });
  }

  // "2026-09-10" → Unix seconds of that local midnight, so the time axis shows that date.
  function dayToX(date) {
    const [y, m, d] = date.split('-').map(Number);
    return new Date(y, m - 1, d).getTime() / 1000;
  }
  const dayLabel = (t) => new Date(t * 1000).toLocaleDateString();
  const hourLabel = (t) => new Date(t * 1000).toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });

  // ---------------------------------------------------------------------------------------------
  // Overview

  const PERIOD_LABELS = { today: 'Today', week: 'This week', month: 'This month' };

  async function renderOverview(alive) {
    const data = await api('/admin/api/overview?top=' + encodeURIComponent(prefs.top));
    if (!alive()) return;
    const scope = data.scope || {};
    // With the Redis ledger, spend is what all replicas share; the hourly chart is this
    // replica's own. A note from the server (Redis unreachable) is shown as text.
    const replicaNote = h('div', null,
      data.backend === 'redis' && scope.totals === 'shared'
        ? h('p', { class: 'note' }, 'Totals, the 90-day chart and top lists: all replicas (Redis). 48-hour chart: this replica only.') : null,
      scope.note ? h('p', { class: 'note warn' }, scope.note) : null);

    const cards = h('div', { class: 'cards' }, ['today', 'week', 'month'].map((name) => {
      const p = (data.periods || []).find((x) => x.name === name);
      return p ? periodCard(p) : null;
    }));

    // Spend chart with its 48 hours / 90 days toggle.
    const chartBox = h('div', { class: 'chart', id: 'spend-chart' });
    const toggles = [['hourly', '48 hours'], ['daily', '90 days']].map(([mode, label]) =>
      h('button', { type: 'button', class: 'toggle', data: { chart: mode }, click: () => { prefs.chart = mode; draw(); } }, label));
    function draw() {
      for (const b of toggles) b.setAttribute('aria-pressed', String(b.dataset.chart === prefs.chart));
      if (prefs.chart === 'hourly') {
        const pts = data.hourly || [];
        spendChart(chartBox, pts.map((p) => Date.parse(p.t) / 1000), [{ label: 'Spend', raw: pts.map((p) => p.cost_usd) }], 3600, hourLabel);
      } else {
        const pts = data.daily || [];
        spendChart(chartBox, pts.map((p) => dayToX(p.date)), [{ label: 'Spend', raw: pts.map((p) => p.cost_usd) }], 86400, dayLabel);
      }
    }

    const top = data.top || {};
    const topSelect = select('top-period', [['today', 'Today'], ['week', 'This week'], ['month', 'This month']],
      top.period || prefs.top, (ev) => { prefs.top = ev.target.value; route(); });

    show(
      h('div', { class: 'title-row' }, h('h1', null, 'Overview'),
        h('span', { class: 'muted' }, 'time zone ', fig('span', 'zone', data.zone, data.zone), ' · ledger ', fig('span', 'backend', data.backend, data.backend))),
      replicaNote,
      cards,
      h('section', { class: 'panel' },
        h('div', { class: 'panel-head' }, h('h2', null, 'Spend'), h('div', { class: 'toggles' }, toggles)),
        chartBox),
      h('section', { class: 'panel' },
        h('div', { class: 'panel-head' }, h('h2', null, 'Top spenders'), h('label', { class: 'inline' }, 'Period ', topSelect)),
        h('div', { class: 'tops' },
          topTable('users', 'Users', top.users, userLink),
          topTable('teams', 'Teams', top.teams, teamLink),
          topTable('models', 'Models', top.models, null))),
      exportBox(data.daily || []));
    draw();
    ready();
  }

  function periodCard(p) {
    const stat = (label, field, text, cls) => h('div', { class: 'stat' }, h('span', { class: 'label' }, label), fig('span', field, p[field], text, cls));
    const tokensTitle = 'prompt ' + int(p.prompt_tokens) + ' · completion ' + int(p.completion_tokens) +
      ' · cached ' + int(p.cached_tokens) + ' · reasoning ' + int(p.reasoning_tokens);
    const tokens = stat('Tokens', 'tokens', int(p.tokens));
    tokens.title = tokensTitle;
    return h('section', { class: 'card period', data: { period: p.name }, title: time(p.from) + ' – ' + time(p.to) },
      h('h2', null, PERIOD_LABELS[p.name] || p.name),
      fig('div', 'cost_usd', p.cost_usd, usd(p.cost_usd), 'big'),
      h('div', { class: 'stats' },
        stat('Calls', 'calls', int(p.calls)),
        tokens,
        stat('Errors', 'errors', int(p.errors), p.errors > 0 ? 'bad' : null),
        stat('Web searches', 'web_searches', int(p.web_searches))));
  }

  function topTable(kind, title, rows, link) {
    rows = rows || [];
    // Calls without a user (or model) are listed as such, with no page to link to.
    const none = '(no ' + title.toLowerCase().replace(/s$/, '') + ')';
    const body = rows.length ? rows.map((r) => h('tr', { data: { name: r.name == null ? '' : r.name } },
      h('td', { class: 'name' }, r.name == null ? h('span', { class: 'muted' }, none) : link ? link(r.name) : r.name),
      fig('td', 'calls', r.calls, int(r.calls), 'num'),
      fig('td', 'tokens', r.tokens, int(r.tokens), 'num'),
      fig('td', 'cost_usd', r.cost_usd, usd(r.cost_usd), 'num')))
      : h('tr', null, h('td', { colspan: 4, class: 'empty' }, 'No spend.'));
    return h('div', null, h('h3', null, title),
      table({ data: { top: kind } }, [[title.replace(/s$/, '')], ['Calls', 'num'], ['Tokens', 'num'], ['Cost', 'num']], body));
  }

  // Export: a plain same-origin <a download>, so the session cookie goes along.
  function exportBox(daily) {
    // "Today" in the budgets' time zone is the last daily entry; else the browser's today.
    const now = new Date();
    const local = now.getFullYear() + '-' + String(now.getMonth() + 1).padStart(2, '0') + '-' + String(now.getDate()).padStart(2, '0');
    const today = daily.length ? daily[daily.length - 1].date : local;
    const from = h('input', { type: 'date', id: 'export-from', value: today.slice(0, 8) + '01', input: update });
    const to = h('input', { type: 'date', id: 'export-to', value: today, input: update });
    const by = select('export-by', [['user', 'user'], ['team', 'team'], ['model', 'model'], ['api', 'api']], 'user', update);
    const format = select('export-format', [['csv', 'CSV'], ['json', 'JSON']], 'csv', update);
    const link = h('a', { id: 'export-link', class: 'button primary', download: '' }, 'Download');
    function update() {
      const q = new URLSearchParams({ from: from.value, to: to.value, by: by.value, format: format.value });
      link.href = '/admin/api/spend?' + q.toString();
      link.setAttribute('download', 'tokentap-spend-' + from.value + '-' + to.value + '-by-' + by.value + '.' + format.value);
    }
    update();
    return h('section', { class: 'panel export' },
      h('h2', null, 'Export spend'),
      h('div', { class: 'form-row' },
        h('label', null, 'From ', from), h('label', null, 'To ', to),
        h('label', null, 'By ', by), h('label', null, 'Format ', format), link));
  }

  // ---------------------------------------------------------------------------------------------
  // Budgets (and the caps tables of the user/team views)

  const BUDGET_SORTS = { Name: 'name', Spent: 'spent', Remaining: 'remaining', Used: 'used', 'Resets at': 'resets' };

  async function renderBudgets(alive) {
    const st = prefs.budgets;
    const holder = h('section', { class: 'panel' });
    const filter = h('input', { type: 'search', id: 'budget-filter', placeholder: 'Filter by name', value: st.q, autocomplete: 'off' });
    let seq = 0, debounce = null;

    // (Re)loads the table only, so the filter keeps its focus while typing.
    async function load() {
      const mine = ++seq;
      notReady();
      const q = new URLSearchParams({ sort: st.sort, order: st.order });
      if (st.q) q.set('q', st.q);
      const data = await api('/admin/api/budgets?' + q.toString());
      if (!alive() || mine !== seq) return;
      const rows = data.rows || [];
      holder.replaceChildren(rows.length ? budgetTable(rows, sortHeader) : h('p', { class: 'empty' }, 'No capped users or teams.'));
      ready();
    }
    const reload = () => load().catch((e) => fail(alive, e));

    // Clicking a header sorts by it; clicking it again flips the order. The handler sits on the
    // <th> (the whole cell is the target); the button inside makes it keyboard-reachable.
    function sortHeader(th, key) {
      const active = st.sort === key;
      th.setAttribute('aria-sort', active ? (st.order === 'asc' ? 'ascending' : 'descending') : 'none');
      th.classList.add('sortable');
      th.replaceChildren(h('button', { type: 'button', class: 'sort' + (active ? ' active' : '') },
        th.textContent, active ? (st.order === 'asc' ? ' ▲' : ' ▼') : ''));
      th.addEventListener('click', () => {
        if (active) st.order = st.order === 'asc' ? 'desc' : 'asc';
        else { st.sort = key; st.order = key === 'used' || key === 'spent' ? 'desc' : 'asc'; }
        reload();
      });
    }

    filter.addEventListener('input', () => {
      clearTimeout(debounce);
      debounce = setTimeout(() => { st.q = filter.value.trim(); reload(); }, 250);
    });
    onLeave(() => clearTimeout(debounce));

    const alertsHolder = h('section', { class: 'panel', id: 'alerts' });
    show(h('div', { class: 'title-row' }, h('h1', null, 'Budgets'),
      h('span', { class: 'muted' }, 'every cap of every capped user and team')),
    h('div', { class: 'toolbar' }, h('label', { for: 'budget-filter' }, 'Filter '), filter), holder,
    alertsHolder);
    // The alerts this replica raised (a threshold of a cap passed), newest first.
    const alerts = await api('/admin/api/alerts?limit=20');
    if (!alive()) return;
    const list = alerts.alerts || [];
    alertsHolder.replaceChildren(h('h2', null, 'Recent budget alerts'),
      list.length ? h('div', { class: 'scroll' }, table({ class: 'data', data: { alerts: '1' } },
        [['Raised'], ['Subject'], ['Window'], ['Threshold'], ['Spent', 'num'], ['Delivered']],
        list.map((a) => h('tr', { data: { alertId: a.id } },
          fig('td', 'at', a.at, time(a.at)),
          h('td', null, a.subject.kind + ' ', a.subject.kind === 'team' ? teamLink(a.subject.name) : userLink(a.subject.name)),
          fig('td', 'window', a.window, a.window),
          fig('td', 'threshold', a.threshold, a.threshold === 'soft' ? 'soft threshold' : Math.round(Number(a.threshold) * 100) + ' %'),
          fig('td', 'spent_usd', a.spent_usd, a.cap_tokens != null && a.cap_usd == null ? int(a.spent_tokens) + ' tokens' : usd(a.spent_usd), 'num'),
          fig('td', 'delivered', a.delivered, alerts.webhooks ? (a.delivered ? 'yes' : 'retrying') : 'no webhook')))))
        : h('p', { class: 'empty' }, 'No budget alerts raised on this replica.'));
    await load();
  }

  // `sortHeader(th, key)` (optional) makes a sortable column's header sort the table.
  function budgetTable(rows, sortHeader) {
    const cols = [['Kind'], ['Name'], ['Window'], ['Cap', 'num'], ['Spent', 'num'], ['Reserved', 'num'],
      ['Remaining', 'num'], ['Used', 'used'], ['Resets at'], ['State']];
    const t = table({ class: 'data budgets' }, cols, rows.map(budgetRow));
    if (sortHeader) {
      t.querySelectorAll('th').forEach((th) => {
        const key = BUDGET_SORTS[th.textContent];
        if (!key) return;
        th.dataset.sort = key;
        sortHeader(th, key);
      });
    }
    return h('div', { class: 'scroll' }, t);
  }

  // USD figure, plus the token figure when the cap counts tokens.
  function moneyTokens(field, usdValue, tokField, tokValue, withTokens) {
    const td = fig('td', field, usdValue, usdValue == null ? null : usd(usdValue), 'num');
    if (withTokens && tokValue != null) {
      td.appendChild(fig('span', tokField, tokValue, int(tokValue) + ' tok', 'tok'));
    } else if (usdValue == null) {
      td.textContent = '—';
    }
    return td;
  }

  function budgetRow(r) {
    const tok = r.cap_tokens != null;
    const used = Number(r.used);
    const bar = h('span', { class: 'bar' }, h('span', { class: 'fill' }));
    bar.firstChild.style.width = (isFinite(used) ? Math.max(0, Math.min(1, used)) * 100 : 0) + '%';
    const soft = [r.soft_usd != null ? usd(r.soft_usd) : null, r.soft_tokens != null ? int(r.soft_tokens) + ' tokens' : null]
      .filter(Boolean).join(' / ');
    return h('tr', { class: r.state === 'capped' || r.state === 'soft' ? r.state : null,
      data: { kind: r.kind, name: r.name, window: r.window, state: r.state } },
    h('td', null, r.kind),
    h('td', { class: 'name' }, r.kind === 'team' ? teamLink(r.name) : userLink(r.name)),
    h('td', null, r.window),
    moneyTokens('cap_usd', r.cap_usd, 'cap_tokens', r.cap_tokens, true),
    moneyTokens('spent_usd', r.spent_usd, 'spent_tokens', r.spent_tokens, tok),
    moneyTokens('reserved_usd', r.reserved_usd, 'reserved_tokens', r.reserved_tokens, tok),
    moneyTokens('remaining_usd', r.remaining_usd, 'remaining_tokens', r.remaining_tokens, tok),
    h('td', { class: 'used', data: { field: 'used', value: r.used } }, h('span', { class: 'pct' }, pct(r.used)), bar),
    fig('td', 'resets_at', r.resets_at, time(r.resets_at), 'time'),
    h('td', null, h('span', { class: 'badge ' + (r.state || ''), title: soft ? 'soft threshold ' + soft : null }, r.state)));
  }

  // ---------------------------------------------------------------------------------------------
  // User and team pages

  async function renderEntity(kind, name, alive) {
    const base = '/admin/api/' + (kind === 'user' ? 'users/' : 'teams/') + encodeURIComponent(name);
    const [d, firstPage] = await Promise.all([api(base), api(base + '/calls?limit=50')]);
    if (!alive()) return;

    const related = kind === 'user'
      ? h('p', { class: 'related' }, 'Teams: ', linkList(d.teams, teamLink, 'none'))
      : h('p', { class: 'related' }, 'Members: ', linkList(d.members, userLink, 'none'));
    const totals = d.totals || {};
    const chartBox = h('div', { class: 'chart', id: 'model-chart' });
    const models = (d.models || []).slice()
      .sort((a, b) => sum(a.cost_usd) - sum(b.cost_usd)); // smallest at the bottom of the stack
    const callsHolder = h('div');

    show(
      h('div', { class: 'title-row' },
        h('h1', { data: { field: 'name', value: d.name != null ? d.name : name } }, d.name != null ? d.name : name),
        h('span', { class: 'muted' }, kind)),
      related,
      d.note ? h('p', { class: 'note warn' }, d.note) : null,
      h('section', { class: 'card totals', data: { section: 'totals' } },
        h('h2', null, 'Last 30 days'),
        h('div', { class: 'stats' },
          h('div', { class: 'stat' }, h('span', { class: 'label' }, 'Cost'), fig('span', 'cost_usd', totals.cost_usd, usd(totals.cost_usd), 'big')),
          h('div', { class: 'stat' }, h('span', { class: 'label' }, 'Calls'), fig('span', 'calls', totals.calls, int(totals.calls))),
          h('div', { class: 'stat' }, h('span', { class: 'label' }, 'Tokens'), fig('span', 'tokens', totals.tokens, int(totals.tokens))))),
      h('section', { class: 'panel' }, h('h2', null, 'Caps'),
        d.caps && d.caps.length ? budgetTable(d.caps, null) : h('p', { class: 'empty' }, 'No caps.')),
      h('section', { class: 'panel', id: 'limits' }, h('h2', null, 'Rate limits'),
        d.limits && d.limits.length ? table({ class: 'data', data: { limits: '1' } },
          [['Held to'], ['Requests / min', 'num'], ['Tokens / min', 'num'], ['At once', 'num']],
          d.limits.map((l) => h('tr', { data: { subject: l.subject } },
            h('td', null, l.subject),
            fig('td', 'requests_per_minute', l.requests_per_minute, l.requests_per_minute == null ? '—' : int(l.requests_per_minute), 'num'),
            fig('td', 'tokens_per_minute', l.tokens_per_minute, l.tokens_per_minute == null ? '—' : int(l.tokens_per_minute), 'num'),
            fig('td', 'concurrent', l.concurrent, l.concurrent == null ? '—' : int(l.concurrent), 'num'))))
          : h('p', { class: 'empty' }, 'No rate limits.')),
      h('section', { class: 'panel' }, h('h2', null, 'Spend per model per day, last 30 days'),
        models.length ? chartBox : h('p', { class: 'empty' }, 'No spend in the last 30 days.')),
      h('section', { class: 'panel' }, h('h2', null, 'Recent calls'), callsHolder));
    if (models.length) {
      spendChart(chartBox, (d.days || []).map(dayToX), models.map((m) => ({ label: m.model, raw: m.cost_usd })), 86400, dayLabel);
    }
    renderCalls(callsHolder, base, firstPage, null, alive);
    ready();
  }

  function sum(values) { return (values || []).reduce((a, v) => a + (Number(v) || 0), 0); }

  function linkList(names, link, none) {
    if (!names || !names.length) return h('span', { class: 'muted' }, none);
    const out = [];
    names.forEach((n, i) => { if (i) out.push(', '); out.push(link(n)); });
    return h('span', null, out);
  }

  // One page of calls; `before` is the cursor this page was fetched with (null: the newest).
  function renderCalls(holder, base, page, before, alive) {
    const goTo = async (cursor) => {
      notReady();
      try {
        const q = new URLSearchParams({ limit: '50' });
        if (cursor != null) q.set('before', cursor);
        const next = await api(base + '/calls?' + q.toString());
        if (!alive()) return;
        renderCalls(holder, base, next, cursor, alive);
        ready();
      } catch (e) { fail(alive, e); }
    };
    const calls = page.calls || [];
    const cols = [['Time'], ['Model'], ['API'], ['Outcome'], ['Status', 'num'], ['Usage'], ['Prompt', 'num'],
      ['Completion', 'num'], ['Cached', 'num'], ['Reasoning', 'num'], ['Web', 'num'], ['Cost', 'num'],
      ['Duration', 'num'], ['Request id']];
    const rows = calls.map((c) => {
      const bad = c.outcome !== 'complete' || Number(c.status) >= 400;
      const cached = fig('td', 'cached_tokens', c.cached_tokens, int(c.cached_tokens), 'num');
      if (c.cache_write_tokens) cached.title = 'cache writes: ' + int(c.cache_write_tokens);
      return h('tr', { class: bad ? 'err' : null, data: { requestId: c.request_id } },
        fig('td', 'time', c.time, time(c.time), 'time'),
        fig('td', 'model', c.model, c.model),
        fig('td', 'api', c.api, c.api),
        fig('td', 'outcome', c.outcome, c.outcome),
        fig('td', 'status', c.status, c.status == null ? '—' : String(c.status), 'num'),
        fig('td', 'usage_source', c.usage_source, c.usage_source),
        fig('td', 'prompt_tokens', c.prompt_tokens, int(c.prompt_tokens), 'num'),
        fig('td', 'completion_tokens', c.completion_tokens, int(c.completion_tokens), 'num'),
        cached,
        fig('td', 'reasoning_tokens', c.reasoning_tokens, int(c.reasoning_tokens), 'num'),
        fig('td', 'web_searches', c.web_searches, int(c.web_searches), 'num'),
        fig('td', 'cost_usd', c.cost_usd, c.cost_usd == null ? 'unpriced' : usd(c.cost_usd), 'num'),
        fig('td', 'duration_ms', c.duration_ms, dur(c.duration_ms), 'num'),
        fig('td', 'request_id', c.request_id, c.request_id, 'rid'));
    });
    holder.replaceChildren(
      page.backend === 'redis' ? h('p', { class: 'note' }, 'Calls recorded by this replica (each replica keeps its own call history).') : '',
      calls.length ? h('div', { class: 'scroll' }, table({ class: 'data calls' }, cols, rows))
        : h('p', { class: 'empty' }, before == null ? 'No calls recorded.' : 'No older calls.'),
      h('div', { class: 'pager' },
        h('button', { type: 'button', id: 'calls-newest', disabled: before == null, click: () => goTo(null) }, 'Newest'),
        h('button', { type: 'button', id: 'calls-older', disabled: page.next == null, click: () => goTo(page.next) }, 'Older')));
  }

  // ---------------------------------------------------------------------------------------------
  // Live: polls every second while shown; rows are keyed by request id and updated in place.

  async function renderLive(alive) {
    const tbody = h('tbody');
    const liveTable = h('table', { class: 'data live', hidden: true },
      h('thead', null, h('tr', null, [['Request id'], ['User'], ['Model'], ['API'], ['Stream'], ['Elapsed', 'num'],
        ['Chunks', 'num'], ['Bytes', 'num']].map(([l, c]) => h('th', { class: c, scope: 'col' }, l)))), tbody);
    const empty = h('p', { class: 'empty' }, 'No calls in flight.');
    const problem = h('p', { class: 'alert error', role: 'alert', hidden: true });
    const rows = new Map(); // request id → <tr>
    let timer = null;
    onLeave(() => clearTimeout(timer));

    function rowFor(c) {
      let tr = rows.get(c.request_id);
      if (!tr) {
        tr = h('tr', { data: { requestId: c.request_id } },
          fig('td', 'request_id', c.request_id, c.request_id, 'rid'),
          h('td', { data: { field: 'user', value: c.user } }, c.user != null ? userLink(c.user) : '—'),
          fig('td', 'model', c.model, c.model),
          fig('td', 'api', c.api, c.api),
          fig('td', 'stream', c.stream, ''),
          fig('td', 'elapsed_ms', c.elapsed_ms, '', 'num'),
          fig('td', 'chunks', c.chunks, '', 'num'),
          fig('td', 'bytes', c.bytes, '', 'num'));
        rows.set(c.request_id, tr);
      }
      const cells = tr.children;
      setFig(cells[4], c.stream, yesNo(c.stream));
      setFig(cells[5], c.elapsed_ms, dur(c.elapsed_ms));
      setFig(cells[6], c.chunks, int(c.chunks));
      setFig(cells[7], c.bytes, int(c.bytes));
      return tr;
    }

    async function tick() {
      const data = await api('/admin/api/live');
      if (!alive()) return;
      const calls = data.calls || [];
      const seen = new Set();
      for (const c of calls) { seen.add(c.request_id); tbody.appendChild(rowFor(c)); } // appendChild keeps server order
      for (const [id, tr] of rows) if (!seen.has(id)) { tr.remove(); rows.delete(id); }
      liveTable.hidden = calls.length === 0;
      empty.hidden = calls.length > 0;
      problem.hidden = true;
      ready();
    }

    // The next poll starts a second after the previous one ended, so polls never overlap.
    function schedule() {
      if (!alive()) return;
      timer = setTimeout(() => {
        tick().catch((e) => {
          if (e instanceof AuthError) return fail(alive, e);
          problem.textContent = 'Update failed: ' + (e && e.message || e); // keep polling
          problem.hidden = false;
        }).then(schedule);
      }, 1000);
    }

    show(h('div', { class: 'title-row' }, h('h1', null, 'Live'),
      h('span', { class: 'muted' }, 'metered calls in flight on this replica, refreshed every second')),
    problem, h('section', { class: 'panel' }, h('div', { class: 'scroll' }, liveTable), empty));
    await tick();
    schedule();
  }

  // ---------------------------------------------------------------------------------------------
  // Status

  async function renderStatus(alive) {
    const s = await api('/admin/api/status');
    if (!alive()) return;
    const flash = statusFlash;
    statusFlash = null;
    const cfg = s.config || {}, lr = cfg.last_reload, ledger = s.ledger || {}, otlp = s.otlp || {}, up = s.upstream || {};

    // A definition list of [label, field, value, text] rows; field null: not an API figure.
    const dl = (items) => h('dl', { class: 'kv' }, items.map(([label, field, value, text, cls]) => [
      h('dt', null, label),
      field ? fig('dd', field, value, text, cls) : h('dd', { class: cls }, text)]));
    const list = (xs) => (xs && xs.length ? h('ul', { class: 'plain' }, xs.map((x) => h('li', null, x))) : 'none');

    const button = h('button', { type: 'button', id: 'reload', class: 'primary' }, 'Reload config');
    button.addEventListener('click', () => reloadConfig(button, alive));

    show(
      h('div', { class: 'title-row' }, h('h1', null, 'Status'), button),
      flash ? h('div', { id: 'reload-result', class: 'alert ' + (flash.ok ? 'ok' : 'error'), role: 'status' }, flash.text) : null,
      h('div', { class: 'grid' },
        h('section', { class: 'card' }, h('h2', null, 'Process'), dl([
          ['Version', 'version', s.version, s.version],
          ['Uptime', 'uptime_s', s.uptime_s, dur(s.uptime_s == null ? null : s.uptime_s * 1000)],
          ['Started at', 'started_at', s.started_at, time(s.started_at)],
          ['In flight', 'in_flight', s.in_flight, int(s.in_flight)]])),
        h('section', { class: 'card' }, h('h2', null, 'Config'), dl([
          ['Hash', 'hash', cfg.hash, cfg.hash, 'mono'],
          ['Files', null, null, list(cfg.files)],
          ['Restart required', null, null, list(cfg.restart_required), cfg.restart_required && cfg.restart_required.length ? 'bad' : null],
          ['Last reload', 'last_reload_at', lr ? lr.at : null, lr ? time(lr.at) : 'none yet'],
          ['Trigger', 'last_reload_trigger', lr ? lr.trigger : null, lr ? lr.trigger : '—'],
          ['Result', 'last_reload_result', lr ? lr.result : null, lr ? lr.result : '—', lr && lr.result === 'rejected' ? 'bad' : null],
          lr && lr.error != null ? ['Error', 'last_reload_error', lr.error, lr.error, 'pre bad'] : null].filter(Boolean))),
        h('section', { class: 'card' }, h('h2', null, 'Ledger'), dl([
          ['Backend', 'backend', ledger.backend, ledger.backend],
          ['Store up', 'store_up', ledger.store_up, yesNo(ledger.store_up), ledger.store_up === false ? 'bad' : null],
          ['File writable', 'file_writable', ledger.file_writable, yesNo(ledger.file_writable), ledger.file_writable === false ? 'bad' : null],
          ['Errors', 'errors', ledger.errors, int(ledger.errors), ledger.errors > 0 ? 'bad' : null],
          ['Store resets', 'store_resets', ledger.store_resets, int(ledger.store_resets)]])),
        h('section', { class: 'card' }, h('h2', null, 'OTLP export'), dl([
          ['Enabled', 'otlp_enabled', otlp.enabled, yesNo(otlp.enabled)],
          ['Queued', 'otlp_queued', otlp.queued, int(otlp.queued)],
          ['Dropped', 'otlp_dropped', otlp.dropped, int(otlp.dropped), otlp.dropped > 0 ? 'bad' : null],
          ['Exported', 'otlp_exported', otlp.exported, int(otlp.exported)]])),
        h('section', { class: 'card' }, h('h2', null, 'Upstream'), dl([
          ['URL', 'upstream_url', up.url, up.url, 'mono'],
          ['Errors (5 min)', 'upstream_errors_5m', up.errors_5m, int(up.errors_5m), up.errors_5m > 0 ? 'bad' : null]]))));
    ready();
  }

  // POST /admin/reload, remember the outcome (as text), then render the Status view again.
  async function reloadConfig(button, alive) {
    button.disabled = true;
    let flash;
    try {
      const res = await post('/admin/reload');
      if (res.status === 401) return fail(alive, new AuthError('authentication required'));
      const text = await res.text();
      let body = null;
      try { body = JSON.parse(text); } catch (_) { /* plain text */ }
      if (res.ok) {
        const parts = [(body && body.status) || 'done'];
        if (body && body.hash) parts.push('config ' + body.hash);
        if (body && Array.isArray(body.changed) && body.changed.length) parts.push('changed: ' + body.changed.join(', '));
        if (body && Array.isArray(body.restart_required) && body.restart_required.length) {
          parts.push('restart required for: ' + body.restart_required.join(', '));
        }
        flash = { ok: true, text: 'Reload (HTTP ' + res.status + '): ' + parts.join(' · ') };
      } else {
        const msg = (body && body.error && body.error.message) || text.trim() || res.statusText;
        flash = { ok: false, text: 'Reload failed (HTTP ' + res.status + '): ' + msg };
      }
    } catch (e) {
      flash = { ok: false, text: 'Reload failed: ' + (e && e.message || e) };
    }
    if (!alive()) return;
    statusFlash = flash;
    route();
  }

  // ---------------------------------------------------------------------------------------------
  // Boot

  async function boot() {
    window.addEventListener('hashchange', route);
    try {
      await loadSession();
    } catch (e) {
      begin('error');
      show(h('div', { class: 'alert error', role: 'alert' }, 'Could not reach tokentap: ' + (e && e.message || e)));
      view.dataset.error = '1';
      ready();
      return;
    }
    route();
  }

  boot();
})();
