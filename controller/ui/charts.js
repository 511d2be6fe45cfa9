// SVG charts drawn from numbers: lines over time, A/B bars with whiskers, paired slopes, stacked bars.
// Geometry is set with presentation attributes; colours come from style.css classes (light and dark).
// Every chart is role="img" with a <title> and aria-label that say its numbers in words.
import { h } from './dom.js';

const NS = 'http://www.w3.org/2000/svg';
const SERIES = 8; // style.css defines colours s0..s7

/** An SVG element; strings become text nodes. */
function s(tag, attrs, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs ?? {})) if (v !== null && v !== undefined && v !== false) el.setAttribute(k, String(v));
  for (const c of children.flat(Infinity)) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}

function chart(attrs, label, ...children) {
  return s('svg', { class: 'chart', role: 'img', 'aria-label': label, ...attrs }, s('title', null, label), children);
}

/**
 * The width a chart is drawn for: its usual width, or less on a phone, so that the browser does not scale
 * the chart (and its text) down to fit; 56 px are the page's and the card's padding.
 */
const fit = (usual) => Math.max(280, Math.min(usual, window.innerWidth - 56));

const lin = (d0, d1, r0, r1) => (v) => r0 + ((v - d0) * (r1 - r0)) / (d1 - d0 || 1);
const min = (xs) => xs.reduce((a, b) => Math.min(a, b), Infinity);
const max = (xs) => xs.reduce((a, b) => Math.max(a, b), -Infinity);
const median = (xs) => {
  const v = [...xs].sort((a, b) => a - b);
  return v.length ? (v[(v.length - 1) >> 1] + v[v.length >> 1]) / 2 : 0;
};

/** A number short enough for an axis: 1.2k, 345, 12.3, 0.45. */
function short(v) {
  const a = Math.abs(v);
  if (a >= 1e4) return `${(v / 1000).toFixed(0)}k`;
  if (a >= 1000) return `${(v / 1000).toFixed(1)}k`;
  return String(a >= 100 ? Math.round(v) : a >= 10 ? +v.toFixed(1) : +v.toFixed(2));
}

/** About n round values from at most lo to at least hi. */
function ticks(lo, hi, n = 4) {
  if (!(hi > lo)) hi = lo + 1;
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((x) => x >= raw);
  const out = [];
  for (let v = Math.floor(lo / step) * step; ; v += step) {
    out.push(+v.toPrecision(12));
    if (v >= hi - step * 1e-9) return out;
  }
}

const MIN = 60e3;
const HOUR = 60 * MIN;
const TIME_STEPS = [MIN, 5 * MIN, 15 * MIN, 30 * MIN, HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, 24 * HOUR, 48 * HOUR, 7 * 24 * HOUR];

/** Round times in [lo, hi] with labels: clock times within two days, days beyond. */
function timeTicks(lo, hi, most) {
  const step = TIME_STEPS.find((st) => (hi - lo) / st <= most) ?? TIME_STEPS.at(-1);
  const offset = new Date(lo).getTimezoneOffset() * MIN; // round in local time
  const fmt = hi - lo > 2 * 24 * HOUR
    ? (t) => new Date(t).toLocaleDateString([], { month: 'short', day: 'numeric' })
    : (t) => new Date(t).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  const out = [];
  for (let t = Math.ceil((lo - offset) / step) * step + offset; t <= hi; t += step) out.push([t, fmt(t)]);
  return out;
}

/**
 * Lines over time. series: [{name, points: [{x (unix ms), y, lo?, hi?}]}]; a min–max band is drawn where
 * points carry lo and hi. opts: label (words for the aria-label), unit, gap (ms: a longer pause breaks a
 * line), x0/x1 (the time range shown).
 */
export function lineChart(series, { label, unit = '', gap = Infinity, x0, x1, height = 200 }) {
  const W = fit(640), H = height, L = 44, R = 12, T = 10, B = 24;
  const pts = series.flatMap((se) => se.points);
  if (!pts.length) return h('p', { class: 'muted' }, 'No data in this time range.');
  const lo = x0 ?? min(pts.map((p) => p.x));
  const hi = Math.max(x1 ?? max(pts.map((p) => p.x)), lo + MIN);
  const yt = ticks(0, max(pts.map((p) => Math.max(p.y, p.hi ?? 0))) || 1);
  const x = lin(lo, hi, L, W - R);
  const y = lin(0, yt.at(-1), H - B, T);
  const grid = yt.map((v) => s('g', null,
    s('line', { x1: L, x2: W - R, y1: y(v), y2: y(v), class: 'gridline' }),
    s('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'tick' }, short(v))));
  const xaxis = timeTicks(lo, hi, Math.floor((W - L) / 80)).map(([t, text]) => s('text', { x: x(t), y: H - 6, 'text-anchor': 'middle', class: 'tick' }, text));
  const drawn = series.map((se, i) => s('g', { class: `s${i % SERIES}` },
    band(se.points, x, y, gap), s('path', { d: path(se.points, x, y, gap, 'y'), class: 'line' }),
    sparse(se.points, x) && se.points.map((p) => s('circle', { cx: x(p.x), cy: y(p.y), r: 3, class: 'dot' }))));
  const words = series.filter((se) => se.points.length).map((se) => {
    const ys = se.points.map((p) => p.y);
    return `${se.name}: latest ${short(ys.at(-1))}${unit}, lowest ${short(min(ys))}, highest ${short(max(ys))}`;
  });
  return chart({ viewBox: `0 0 ${W} ${H}` }, `${label}. ${words.join('; ') || 'No data.'}`, grid, xaxis, drawn);
}

/** Whether the points lie far enough apart for dots to help rather than smear the line. */
const sparse = (points, x) => points.length < 2 || (x(points.at(-1).x) - x(points[0].x)) / (points.length - 1) >= 8;

/** Runs of points without a pause longer than gap. */
function runs(points, gap) {
  const out = [];
  points.forEach((p, i) => (i && p.x - points[i - 1].x <= gap ? out.at(-1).push(p) : out.push([p])));
  return out;
}

function path(points, x, y, gap, key) {
  return runs(points, gap).map((run) => run.map((p, i) => `${i ? 'L' : 'M'}${x(p.x).toFixed(1)},${y(p[key]).toFixed(1)}`).join('')).join('');
}

function band(points, x, y, gap) {
  const withBand = points.filter((p) => p.lo !== undefined && p.hi !== undefined);
  if (!withBand.length) return null;
  const d = runs(withBand, gap).map((run) => {
    const top = run.map((p, i) => `${i ? 'L' : 'M'}${x(p.x).toFixed(1)},${y(p.hi).toFixed(1)}`).join('');
    const bottom = [...run].reverse().map((p) => `L${x(p.x).toFixed(1)},${y(p.lo).toFixed(1)}`).join('');
    return `${top}${bottom}Z`;
  }).join('');
  return s('path', { d, class: 'band' });
}

/** An HTML legend whose swatches match the series colours of lineChart. */
export function legend(names) {
  return h('ul', { class: 'legend' }, names.map((n, i) => h('li', { class: `s${i % SERIES}` }, h('span', { class: 'swatch', 'aria-hidden': 'true' }), n)));
}

/**
 * A/B comparison, one row (<g data-class>) per hardware class: for tokens/s and TTFT, A's and B's median
 * as bars with min–max whiskers and the sample counts under them. The two panels sit side by side, or one
 * above the other on a phone.
 */
export function abChart(classes) {
  const narrow = fit(560) < 560;
  const P = { w: narrow ? fit(560) : 270, h: 190 };
  const W = narrow ? P.w : 2 * P.w + 20;
  const rowH = 46 + (narrow ? 2 * P.h : P.h);
  const second = narrow ? [0, 30 + P.h] : [P.w + 20, 30];
  const words = classes.map(abWords);
  if (!classes.length) {
    const none = 'No A/B measurements yet: they appear once candidate devices report benchmarks or telemetry.';
    return chart({ id: 'ab-chart', viewBox: `0 0 ${W} 40` }, none, s('text', { x: 0, y: 24, class: 'tick' }, none));
  }
  return chart({ id: 'ab-chart', viewBox: `0 0 ${W} ${classes.length * rowH}` },
    `A/B comparison per hardware class. ${words.join(' ')}`,
    classes.map((c, i) => s('g', { 'data-class': c.class, transform: `translate(0 ${i * rowH})` },
      s('title', null, words[i]),
      s('text', { x: 0, y: 18, class: 'row-title' }, c.class || '(no class)'),
      s('text', { x: W, y: 18, 'text-anchor': 'end', class: 'tick' }, `${c.paired} paired devices`),
      abPanel('Tokens/s · higher is better', c.generation_tokens_per_second, 0, 30, P),
      abPanel('TTFT ms · lower is better', c.ttft_ms, ...second, P))));
}

function abWords(c) {
  const side = (st) => (st.samples ? `median ${short(st.median)} (range ${short(st.min)}–${short(st.max)}, ${st.samples} samples)` : 'no samples');
  const metric = (label, mc) => `${label}: A ${side(mc.a)}, B ${side(mc.b)}${mc.gate_ratio ? `, B/A ${mc.gate_ratio.toFixed(2)}` : ''}`;
  return `${c.class}: ${metric('tokens/s', c.generation_tokens_per_second)}; ${metric('TTFT ms', c.ttft_ms)}.`;
}

function abPanel(title, mc, left, top, P) {
  const plotTop = top + 40, bottom = top + P.h - 36, axis = 34;
  const yt = ticks(0, Math.max(mc.a.max, mc.b.max, mc.a.median, mc.b.median) || 1, 3);
  const y = lin(0, yt.at(-1), bottom, plotTop);
  const bar = (label, st, cls, cx) => {
    const under = [
      s('text', { x: cx, y: bottom + 16, 'text-anchor': 'middle', class: 'label' }, label),
      s('text', { x: cx, y: bottom + 31, 'text-anchor': 'middle', class: 'tick' }, `n=${st.samples}`),
    ];
    if (!st.samples) return s('g', null, s('text', { x: cx, y: bottom - 8, 'text-anchor': 'middle', class: 'tick' }, 'no data'), under);
    const [lo, hi] = [st.min || st.median, st.max || st.median];
    return s('g', null,
      s('rect', { x: cx - 26, y: y(st.median), width: 52, height: Math.max(0, bottom - y(st.median)), class: `bar ${cls}` }),
      s('line', { x1: cx, x2: cx, y1: y(lo), y2: y(hi), class: 'whisker' }),
      s('line', { x1: cx - 9, x2: cx + 9, y1: y(lo), y2: y(lo), class: 'whisker' }),
      s('line', { x1: cx - 9, x2: cx + 9, y1: y(hi), y2: y(hi), class: 'whisker' }),
      s('text', { x: cx, y: y(hi) - 6, 'text-anchor': 'middle', class: 'value' }, short(st.median)),
      under);
  };
  const at = (f) => axis + (P.w - axis) * f;
  return s('g', { transform: `translate(${left} 0)` },
    s('text', { x: 0, y: top + 14, class: 'label' }, title),
    s('text', { x: 0, y: top + 30, class: 'tick' }, mc.gate_ratio ? `B/A ${mc.gate_ratio.toFixed(2)}× (what the gate reads)` : 'B/A not measured yet'),
    yt.map((v) => s('g', null,
      s('line', { x1: axis, x2: P.w, y1: y(v), y2: y(v), class: 'gridline' }),
      s('text', { x: axis - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'tick' }, short(v)))),
    bar('A (baseline)', mc.a, 'a', at(0.3)), bar('B (candidate)', mc.b, 'b', at(0.72)));
}

/** Per-device tokens/s on A (left) and on B (right), one line per device of the class. */
export function slopeChart(cls, pairs) {
  const W = 240, H = 200, L = 64, R = 184, T = 34, B = 168;
  const vals = pairs.flatMap((p) => [p.a_tokens_per_second, p.b_tokens_per_second]);
  const yt = ticks(Math.max(0, min(vals) * 0.9), max(vals) || 1, 3);
  const y = lin(yt[0], yt.at(-1), B, T);
  const ratios = pairs.filter((p) => p.a_tokens_per_second > 0).map((p) => p.b_tokens_per_second / p.a_tokens_per_second);
  const faster = pairs.filter((p) => p.b_tokens_per_second > p.a_tokens_per_second).length;
  const words = `${cls}: ${pairs.length} devices measured on A, then on B: ${faster} faster on B, ${pairs.length - faster} not; median B/A ${median(ratios).toFixed(2)}.`;
  const dots = pairs.length <= 200; // thousands of dots say no more than their lines
  return chart({ viewBox: `0 0 ${W} ${H}`, class: 'chart slope', 'data-class': cls }, words,
    s('text', { x: 0, y: 16, class: 'row-title' }, cls),
    s('text', { x: W, y: 16, 'text-anchor': 'end', class: 'tick' }, `B/A ${median(ratios).toFixed(2)}×`),
    yt.map((v) => s('g', null,
      s('line', { x1: L, x2: R, y1: y(v), y2: y(v), class: 'gridline' }),
      s('text', { x: L - 8, y: y(v) + 4, 'text-anchor': 'end', class: 'tick' }, short(v)))),
    s('text', { x: L, y: H - 8, 'text-anchor': 'middle', class: 'label' }, 'A'),
    s('text', { x: R, y: H - 8, 'text-anchor': 'middle', class: 'label' }, 'B'),
    pairs.map((p) => {
      const [ya, yb] = [y(p.a_tokens_per_second), y(p.b_tokens_per_second)];
      return s('g', { class: p.b_tokens_per_second >= p.a_tokens_per_second ? 'up' : 'down' },
        s('title', null, `${p.device_id}: ${short(p.a_tokens_per_second)} → ${short(p.b_tokens_per_second)} tokens/s`),
        s('line', { x1: L, x2: R, y1: ya, y2: yb, class: 'slope-line' }),
        dots && [s('circle', { cx: L, cy: ya, r: 3 }), s('circle', { cx: R, cy: yb, r: 3 })]);
    }));
}

/**
 * One horizontal bar per row, split by parts. rows: [{label, values}] (values in the order of keys);
 * keys: [{name, cls}]. Counts are written in the segments that have room and after each bar.
 */
export function stackedBars(rows, keys, label) {
  const W = fit(640), L = W < 480 ? 96 : 130, R = 66, BAR = 24, GAP = 14;
  const width = W - L - R;
  const words = rows.map((r) => `${r.label}: ${keys.map((k, i) => `${r.values[i]} ${k.name}`).join(', ')}`);
  return chart({ viewBox: `0 0 ${W} ${rows.length * (BAR + GAP)}`, class: 'chart bars' }, `${label}. ${words.join('; ')}.`,
    rows.map((r, ri) => {
      const total = r.values.reduce((a, b) => a + b, 0);
      const top = ri * (BAR + GAP) + GAP / 2;
      let at = L;
      const segments = keys.map((k, i) => {
        const w = total ? (r.values[i] / total) * width : 0;
        const x0 = at;
        at += w;
        if (!w) return null;
        return s('g', { class: `seg ${k.cls}` },
          s('title', null, `${r.label}: ${r.values[i]} ${k.name}`),
          s('rect', { x: x0, y: top, width: w, height: BAR }),
          w >= 26 && s('text', { x: x0 + w / 2, y: top + BAR / 2 + 4, 'text-anchor': 'middle' }, r.values[i]));
      });
      return s('g', null,
        s('text', { x: L - 8, y: top + BAR / 2 + 4, 'text-anchor': 'end', class: 'label' }, r.label),
        total ? segments : s('rect', { x: L, y: top, width, height: BAR, class: 'empty-bar' }),
        s('text', { x: W - R + 8, y: top + BAR / 2 + 4, class: 'tick' }, `${total} total`));
    }));
}
