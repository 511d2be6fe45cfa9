// Formatting for people: names of the API's enum numbers, times, sizes, numbers, digests and bundle names.
import { h, badge } from './dom.js';

// Enum names indexed by their proto numbers.
export const PHASES = ['Unknown', 'Idle', 'Pulling', 'Verifying', 'Starting', 'Active', 'Failed'];
export const STATES = ['Unknown', 'Pending', 'Progressing', 'Paused', 'Completed', 'Aborted'];
const VERDICTS = ['Unknown', 'Not sampled', 'Waiting', 'Pass', 'Inconclusive', 'Fail', 'Halted'];
export const PAUSE_REASONS = ['', 'paused by an operator', 'held: a gate was inconclusive'];
export const GATE_STATES = ['Unknown', 'Asking', 'Passed', 'Failed', 'Retry later'];
export const TRIGGERS = ['', 'activation', 'on demand', 'calibration'];
export const ERROR_CODES = ['Error', 'Digest mismatch', 'Pull failed', 'Bundle invalid', 'No variant fits',
  'Start failed', 'Disk full', 'I/O error', 'Signature missing', 'Signature untrusted', 'Signature invalid', 'Crash loop'];

/** The name of enum value n, never undefined (a newer back end may send numbers we do not know). */
export const name = (names, n) => names[n] ?? `Unknown (${n})`;

// Colour classes; every badge also says its word, so colour is never the only signal.
const PHASE_KIND = ['idle', 'idle', 'busy', 'busy', 'busy', 'ok', 'bad'];
const STATE_KIND = ['idle', 'busy', 'busy', 'warn', 'ok', 'bad'];
const VERDICT_KIND = ['idle', 'idle', 'busy', 'ok', 'warn', 'bad', 'bad'];
export const phaseBadge = (p) => badge(name(PHASES, p), PHASE_KIND[p] ?? 'idle');
export const stateBadge = (s) => badge(name(STATES, s), STATE_KIND[s] ?? 'idle');
export const verdictBadge = (v) => badge(name(VERDICTS, v), VERDICT_KIND[v] ?? 'idle');

/** "3 min ago" / "in 2 h"; "never" for 0 (an unset timestamp). */
export function ago(ms, now = Date.now()) {
  if (!ms) return 'never';
  const s = Math.round((now - ms) / 1000);
  const a = Math.abs(s);
  if (a < 10) return 'just now';
  const [n, unit] = a < 60 ? [a, 's'] : a < 5400 ? [Math.round(a / 60), 'min'] : a < 129600 ? [Math.round(a / 3600), 'h'] : [Math.round(a / 86400), 'd'];
  return s > 0 ? `${n} ${unit} ago` : `in ${n} ${unit}`;
}

const absolute = (ms) => new Date(ms).toLocaleString();

/** A relative time with the absolute one in its title; app.js keeps the words current. */
export function time(ms) {
  if (!ms) return h('span', { class: 'muted' }, 'never');
  return h('time', { datetime: new Date(ms).toISOString(), title: absolute(ms), data: { ms } }, ago(ms));
}

/** Bytes as KiB/MiB/GiB; "—" for 0, which the API sends when a size is unknown. */
export function bytes(n) {
  if (!n) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${units[i]}`;
}

/** A measurement; 0 is the API's "not measured" and shows as "—". */
export const measured = (x, digits = 1) => (x ? fixed(x, digits) : '—');
export const fixed = (x, digits = 1) => (Number.isFinite(x) ? x.toFixed(digits) : '—');
export const ratio = (x) => (x ? `${x.toFixed(2)}×` : '—');
export const percent = (x) => `${Math.round(x * 100)}%`;
export const count = (n, one, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;

/** "sha256:7bd054d71139…" → "7bd054d71139": enough to tell bundles apart; the title holds the whole. */
export const shortDigest = (d) => (d ?? '').replace(/^sha256:/, '').slice(0, 12);

/**
 * A BundleRef for people: repository:tag, or repository@short-digest; '' when it names nothing. The
 * registry host is left to bundleCell's title: most bundles live in the controller's own registry.
 */
export function bundleName(ref) {
  if (!ref || (!ref.digest && !ref.repository)) return '';
  if (!ref.repository) return shortDigest(ref.digest);
  return ref.tag ? `${ref.repository}:${ref.tag}` : `${ref.repository}@${shortDigest(ref.digest)}`;
}

/** A Bundle (the registry's listing, with tags[]) named like a BundleRef, by its first tag. */
export const bundleLabel = (b) => bundleName({ ...b, tag: b.tags?.[0] ?? '' });

/** The full reference: registry/repository@digest. */
export const bundleRef = (ref) => [ref.registry, ref.repository].filter(Boolean).join('/') + (ref.digest ? `@${ref.digest}` : '');

/** The bundle cell of a table: its name, the full reference in the title. */
export const bundleCell = (ref) => h('span', { title: bundleRef(ref) || null }, bundleName(ref) || '—');

/** Hash links: ids are data, so they are always encoded. */
export const deviceHref = (id) => `#/devices/${encodeURIComponent(id)}`;
export const rolloutHref = (id) => `#/rollouts/${encodeURIComponent(id)}`;
