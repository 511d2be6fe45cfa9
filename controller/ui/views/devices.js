// The fleet page: summary tiles, filters kept in the hash (so a filtered page is a link), and one page of
// the devices table.
import * as api from '../api.js';
import * as notice from '../notice.js';
import { h, table, field, select, setOptions } from '../dom.js';
import { PHASES, name, phaseBadge, bundleCell, time, measured, shortDigest, bundleLabel, deviceHref, rolloutHref } from '../format.js';

export const title = 'Fleet';
const PAGE = 100;
const FILTERS = ['selector', 'class', 'phase', 'bundle', 'connected', 'q'];
const HEAD = ['Device', 'Class', 'Status', 'Phase', 'Running', 'Cohort', 'Rollout', { text: 'Tokens/s', class: 'num' }, 'Last seen'];

export function mount(main, route) {
  const state = Object.fromEntries(FILTERS.map((k) => [k, route.query.get(k) ?? '']));
  state.offset = Math.max(0, Number.parseInt(route.query.get('offset'), 10) || 0);
  const tiles = h('ul', { class: 'tiles', 'aria-label': 'Fleet summary' });
  const results = table({ id: 'devices', label: 'Devices', head: HEAD, rows: [], empty: 'Loading…' });
  const tbody = results.querySelector('tbody');
  let rows = new Map(); // device id → {sig, tr}, to keep the rows a refresh did not change
  const form = filters(state, () => { state.offset = 0; commit(); });
  const pager = { prev: button('Previous', -PAGE), next: button('Next', PAGE), total: h('span', { id: 'devices-total', 'aria-live': 'polite' }) };
  let names = new Map(); // bundle digest → repository:tag, for the bundle filter
  let summary = null;
  // Names only label the bundle filter: the page does not wait for them.
  api.bundles().then((bs) => {
    names = new Map(bs.map((b) => [b.digest, bundleLabel(b)]));
    if (summary) form.options(summary, names);
  }, () => {});
  let seq = 0;

  main.append(h('h1', null, 'Fleet'), tiles, form.el, results,
    h('nav', { class: 'pager', 'aria-label': 'Device pages' }, pager.prev, pager.total, pager.next));

  function button(text, delta) {
    return h('button', { type: 'button', on: { click: () => { state.offset = Math.max(0, state.offset + delta); commit(); } } }, text);
  }

  // The hash changes without a hashchange (replaceState), so the page is not rebuilt and focus stays put.
  function commit() {
    const q = new URLSearchParams();
    for (const k of FILTERS) if (state[k]) q.set(k, state[k]);
    if (state.offset) q.set('offset', state.offset);
    history.replaceState(null, '', `#/devices${q.toString() ? `?${q}` : ''}`);
    // The notice goes once the new filters worked: clearing it earlier would move the page under the pointer.
    refresh().then(notice.clear, notice.report); // e.g. a selector that is not key=value
  }

  async function refresh() {
    const mine = ++seq;
    const params = { ...Object.fromEntries(FILTERS.map((k) => [k, state[k]])), limit: PAGE, offset: state.offset };
    const [fleet, page] = await Promise.all([api.summary(), api.devices(params)]);
    if (mine !== seq) return; // a newer refresh is on its way
    summary = fleet;
    tiles.replaceChildren(...summaryTiles(summary));
    form.options(summary, names);
    const kept = new Map();
    tbody.replaceChildren(...page.devices.map((d) => reuse(d, rows, kept)));
    if (!page.devices.length) tbody.append(h('tr', null, h('td', { colspan: HEAD.length, class: 'empty' }, 'No device matches these filters.')));
    rows = kept;
    const first = page.total ? state.offset + 1 : 0;
    pager.total.textContent = `${first}–${state.offset + page.devices.length} of ${page.total}`;
    pager.prev.disabled = state.offset === 0;
    pager.next.disabled = state.offset + PAGE >= page.total;
  }

  return { refresh, wants: (ev) => ev.type.startsWith('device.') || ev.type.startsWith('rollout.') };
}

function summaryTiles(s) {
  const phases = Object.keys(s.by_phase).map(Number).sort((a, b) => a - b);
  return [
    tile('Devices', s.devices, '#/devices'),
    tile('Online', s.online, '#/devices?connected=true'),
    tile('Offline', s.devices - s.online, '#/devices?connected=false'),
    ...phases.map((p) => tile(name(PHASES, p), s.by_phase[p], `#/devices?phase=${p}`)),
    tile('Active rollouts', s.rollouts_active, '#/rollouts'),
  ];
}

const tile = (label, n, href) => h('li', null, h('a', { class: 'tile', href }, h('span', { class: 'n' }, n), h('span', null, label)));

/** The filter form; options() fills the selects from the summary once it has arrived. */
function filters(state, changed) {
  const sel = {
    class: select('class', [['', 'Any class']], state.class),
    phase: select('phase', [['', 'Any phase'], ...PHASES.slice(1).map((p, i) => [String(i + 1), p])], state.phase),
    bundle: select('bundle', [['', 'Any bundle']], state.bundle),
    connected: select('connected', [['', 'Online or offline'], ['true', 'Online'], ['false', 'Offline']], state.connected),
  };
  const text = {
    selector: h('input', { name: 'selector', type: 'text', value: state.selector, placeholder: 'site=berlin,tier=edge', list: 'label-pairs', autocomplete: 'off', spellcheck: 'false' }),
    q: h('input', { name: 'q', type: 'search', value: state.q, placeholder: 'part of an id', autocomplete: 'off', spellcheck: 'false' }),
  };
  const pairs = h('datalist', { id: 'label-pairs' });
  let typing = null;
  const read = () => {
    clearTimeout(typing);
    const fields = Object.entries({ ...sel, ...text }).map(([k, el]) => [k, el.value.trim()]);
    if (fields.every(([k, v]) => state[k] === v)) return; // e.g. the change event after the typing pause
    for (const [k, v] of fields) state[k] = v;
    changed();
  };
  const clear = h('button', { type: 'reset' }, 'Clear');
  const el = h('form', { class: 'filters', role: 'search', 'aria-label': 'Filter devices' },
    field('Labels (key=value, …)', text.selector), pairs, field('Hardware class', sel.class), field('Phase', sel.phase),
    field('Running bundle', sel.bundle), field('Status', sel.connected), field('Device id contains', text.q), clear);
  el.addEventListener('change', read);
  // Typing waits for a pause, so each keystroke does not cost a request.
  el.addEventListener('input', (e) => { if (e.target.tagName === 'INPUT') { clearTimeout(typing); typing = setTimeout(read, 300); } });
  el.addEventListener('submit', (e) => { e.preventDefault(); read(); });
  el.addEventListener('reset', () => setTimeout(read)); // after the form has reset its fields

  function options(summary, names) {
    setOptions(sel.class, [['', 'Any class'], ...Object.keys(summary.by_class).sort().map((c) => [c, c || '(none)'])], state.class);
    const digests = Object.keys(summary.by_bundle).filter(Boolean).sort();
    setOptions(sel.bundle, [['', 'Any bundle'], ...digests.map((d) => [d, names.get(d) || shortDigest(d)])], state.bundle);
    const labels = Object.entries(summary.labels).flatMap(([k, vs]) => (Array.isArray(vs) ? vs : []).map((v) => `${k}=${v}`));
    pairs.replaceChildren(...labels.sort().map((v) => h('option', { value: v })));
  }
  return { el, options };
}

function tokensPerSecond(d) {
  return d.latest_telemetry?.generation_tokens_per_second || d.latest_benchmark?.generation_tokens_per_second.median || 0;
}

/**
 * The device's row: the one already shown when nothing but its last-seen time changed, so a live refresh
 * does not replace elements the user (or a test) holds.
 */
function reuse(d, rows, kept) {
  const sig = JSON.stringify([d.inventory.hardware_class, d.connected, d.phase, d.running, d.cohort, d.rollout_id, tokensPerSecond(d), d.decommissioned]);
  const old = rows.get(d.id);
  const tr = old?.sig === sig ? old.tr : row(d);
  if (tr === old?.tr) tr.lastChild.replaceChildren(time(d.last_seen_unix_ms));
  kept.set(d.id, { sig, tr });
  return tr;
}

function row(d) {
  return h('tr', { data: { deviceId: d.id } },
    h('th', { scope: 'row' }, h('a', { href: deviceHref(d.id) }, d.id), d.decommissioned && h('span', { class: 'badge bad' }, 'decommissioned')),
    h('td', null, d.inventory.hardware_class || '—'),
    h('td', { class: ['connected', d.connected ? 'on' : 'off'] }, d.connected ? 'online' : 'offline'),
    h('td', null, phaseBadge(d.phase)),
    h('td', null, bundleCell(d.running)),
    h('td', null, d.cohort || '—'),
    h('td', null, d.rollout_id ? h('a', { href: rolloutHref(d.rollout_id) }, d.rollout_id) : '—'),
    h('td', { class: 'num' }, measured(tokensPerSecond(d))),
    h('td', null, time(d.last_seen_unix_ms)));
}
