// The trends page: the fleet's serving telemetry over time (5-minute buckets), one line per class or bundle.
import * as api from '../api.js';
import * as notice from '../notice.js';
import { h, replace, field, select, setOptions, section } from '../dom.js';
import { lineChart, legend } from '../charts.js';
import { bundleLabel, shortDigest } from '../format.js';

export const title = 'Trends';
const HOUR = 3600e3;
const RANGES = [['1h', '1 hour', HOUR], ['6h', '6 hours', 6 * HOUR], ['24h', '24 hours', 24 * HOUR], ['7d', '7 days', 168 * HOUR]];
const BUCKET = 5 * 60e3;

export function mount(main, route) {
  const q = route.query;
  const state = { range: RANGES.some(([k]) => k === q.get('range')) ? q.get('range') : '6h', class: q.get('class') ?? '', bundle: q.get('bundle') ?? '', by: q.get('by') === 'bundle' ? 'bundle' : 'class' };
  const sel = {
    class: select('class', [['', 'All classes']], state.class),
    bundle: select('bundle', [['', 'All bundles']], state.bundle),
    range: select('range', RANGES.map(([k, t]) => [k, t]), state.range),
    by: select('by', [['class', 'Hardware class'], ['bundle', 'Bundle']], state.by),
  };
  const form = h('form', { class: 'filters', 'aria-label': 'Trend filters' },
    field('Hardware class', sel.class), field('Bundle', sel.bundle), field('Time range', sel.range), field('One line per', sel.by));
  const body = h('div');
  main.append(h('h1', null, 'Trends'), form, body);
  let seq = 0;

  form.addEventListener('change', () => {
    for (const k of Object.keys(sel)) state[k] = sel[k].value;
    const p = new URLSearchParams(Object.entries(state).filter(([, v]) => v));
    history.replaceState(null, '', `#/trends?${p}`);
    refresh().then(notice.clear, notice.report);
  });
  form.addEventListener('submit', (e) => e.preventDefault());

  async function refresh() {
    const mine = ++seq;
    const span = RANGES.find(([k]) => k === state.range)[2];
    const now = Date.now();
    const [summary, bundles, buckets] = await Promise.all([
      api.summary(), api.bundles().catch(() => []), api.trends({ since: now - span, class: state.class, bundle: state.bundle }),
    ]);
    if (mine !== seq) return;
    const names = new Map(bundles.map((b) => [b.digest, bundleLabel(b)]));
    setOptions(sel.class, [['', 'All classes'], ...Object.keys(summary.by_class).sort().map((c) => [c, c])], state.class);
    const digests = [...new Set([...Object.keys(summary.by_bundle), ...bundles.map((b) => b.digest)])].filter(Boolean);
    setOptions(sel.bundle, [['', 'All bundles'], ...digests.map((d) => [d, names.get(d) || shortDigest(d)])], state.bundle);
    replace(body, ...charts(series(buckets, state.by, names), now - span, now));
  }

  return { refresh };
}

/** Buckets → one series per class (or bundle); buckets of variants and of the other key are pooled. */
function series(buckets, by, names) {
  const out = new Map();
  for (const b of buckets) {
    const key = by === 'bundle' ? b.bundle_digest : b.class;
    if (!out.has(key)) out.set(key, new Map());
    const points = out.get(key);
    if (!points.has(b.bucket_unix_ms)) points.set(b.bucket_unix_ms, { x: b.bucket_unix_ms, tps: 0, tpsW: 0, lo: Infinity, hi: 0, ttft: 0, ttftW: 0, ttftMax: 0, requests: 0, errors: 0 });
    const p = points.get(b.bucket_unix_ms);
    const w = b.reports || 1; // means are weighted by the reports behind them
    if (b.tokens_per_second_mean) {
      p.tps += b.tokens_per_second_mean * w;
      p.tpsW += w;
      p.lo = Math.min(p.lo, b.tokens_per_second_min || b.tokens_per_second_mean);
      p.hi = Math.max(p.hi, b.tokens_per_second_max || b.tokens_per_second_mean);
    }
    if (b.ttft_ms_mean) {
      p.ttft += b.ttft_ms_mean * w;
      p.ttftW += w;
    }
    p.requests += b.requests;
    p.errors += b.errors;
  }
  const label = (k) => (by === 'bundle' ? names.get(k) || shortDigest(k) || '(nothing)' : k || '(no class)');
  return [...out].sort(([a], [b]) => label(a).localeCompare(label(b)))
    .map(([k, points]) => ({ name: label(k), points: [...points.values()].sort((a, b) => a.x - b.x) }));
}

function charts(all, x0, x1) {
  if (!all.length) return [h('p', { class: 'muted' }, 'No telemetry in this time range.')];
  const pick = (f) => all.map((se) => ({ name: se.name, points: se.points.map(f).filter(Boolean) }));
  const opts = { x0, x1, gap: 2 * BUCKET };
  const chart = (heading, series, label, unit = '') => section(heading, lineChart(series, { ...opts, label, unit }));
  return [
    legend(all.map((se) => se.name)),
    h('div', { class: 'charts' },
    chart('Generation tokens/s (mean, band: min–max)', pick((p) => p.tpsW && { x: p.x, y: p.tps / p.tpsW, lo: p.lo, hi: p.hi }), 'Mean generation tokens per second'),
    chart('Time to first token, ms (mean)', pick((p) => p.ttftW && { x: p.x, y: p.ttft / p.ttftW }), 'Mean time to first token', ' ms'),
    chart('Requests per 5 minutes', pick((p) => ({ x: p.x, y: p.requests })), 'Requests per 5 minutes'),
    chart('Errors per 5 minutes', pick((p) => ({ x: p.x, y: p.errors })), 'Errors per 5 minutes')),
  ];
}
