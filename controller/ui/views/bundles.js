// The bundles page: what the registry holds, whether it is signed, and who uses it (devices, rollouts).
import * as api from '../api.js';
import { h, table, badge } from '../dom.js';
import { bundleLabel, shortDigest, bytes, time, count, rolloutHref, name, STATES } from '../format.js';

export const title = 'Bundles';

export function mount(main) {
  const body = h('div');
  const open = new Set(); // digests whose variants the user expanded, kept across refreshes
  main.append(h('h1', null, 'Bundles'), body);
  let seq = 0;

  async function refresh() {
    const mine = ++seq;
    const [bundles, summary, rollouts] = await Promise.all([api.bundles(), api.summary(), api.rollouts()]);
    if (mine !== seq) return;
    bundles.sort((a, b) => b.pushed_unix_ms - a.pushed_unix_ms);
    const rows = bundles.flatMap((b, i) => rowsOf(b, i, summary.by_bundle[b.digest] ?? 0, rollouts.filter((r) => r.candidate.digest === b.digest), open));
    body.replaceChildren(table({
      id: 'bundles', label: 'Bundles, newest first',
      head: ['Repository', 'Tags', 'Digest', { text: 'Size', class: 'num' }, 'Pushed', 'Signature', 'Used by'],
      rows, empty: 'No bundles yet: push one with “alkictl bundle push”.',
    }));
  }

  const wants = (ev) => ['rollout.created', 'rollout.completed', 'rollout.aborted', 'device.activated'].includes(ev.type);
  return { refresh, wants };
}

/** The bundle's row, and the row of its variants that its button shows and hides. */
function rowsOf(b, i, devices, rollouts, open) {
  const detailId = `bundle-detail-${i}`;
  const expanded = open.has(b.digest);
  const detail = h('tr', { id: detailId, class: 'detail', hidden: !expanded }, h('td', { colspan: 7 }, variants(b), signatures(b)));
  const toggle = h('button', { type: 'button', class: 'expand', 'aria-expanded': String(expanded), 'aria-controls': detailId }, repository(b));
  toggle.addEventListener('click', () => {
    const now = !open.has(b.digest);
    if (now) open.add(b.digest); else open.delete(b.digest);
    toggle.setAttribute('aria-expanded', String(now));
    detail.hidden = !now;
  });
  const main = h('tr', { data: { digest: b.digest } },
    h('th', { scope: 'row' }, toggle),
    h('td', null, b.tags.length ? b.tags.join(', ') : h('span', { class: 'muted' }, 'untagged')),
    h('td', { title: b.digest }, h('code', null, shortDigest(b.digest))),
    h('td', { class: 'num' }, bytes(b.total_size)),
    h('td', null, time(b.pushed_unix_ms)),
    h('td', null, signature(b)),
    h('td', null, usedBy(b.digest, devices, rollouts)));
  return [main, detail];
}

const repository = (b) => (b.registry ? `${b.registry}/${b.repository}` : b.repository);

function signature(b) {
  const good = b.signatures.find((s) => s.verified);
  if (good) return h('span', { class: 'ok-text', title: good.key_fingerprint ? `key ${good.key_fingerprint}` : null }, '✓ verified');
  if (!b.signatures.length) return h('span', { class: 'warn-text' }, b.registry ? 'checked when a rollout names it' : 'unsigned');
  return h('span', { class: 'bad-text' }, b.signatures.map((s) => s.problem || 'does not verify').join('; '));
}

function usedBy(digest, devices, rollouts) {
  return h('span', null,
    devices ? h('a', { href: `#/devices?bundle=${encodeURIComponent(digest)}` }, count(devices, 'device')) : 'no devices',
    rollouts.length ? [' · ', rollouts.map((r, i) => [i ? ', ' : '', h('a', { href: rolloutHref(r.id), title: name(STATES, r.state) }, r.id)])] : null);
}

function variants(b) {
  return table({
    label: `Variants of ${bundleLabel(b)}`,
    head: ['Variant', 'Architecture', 'Quantization', { text: 'Size', class: 'num' }, 'Digest'],
    rows: b.variants.map((v) => h('tr', null,
      h('th', { scope: 'row' }, v.name || '—'),
      h('td', null, v.architecture || '—'),
      h('td', null, v.quantization || '—'),
      h('td', { class: 'num' }, bytes(v.size)),
      h('td', { title: v.digest }, h('code', null, shortDigest(v.digest))))),
    empty: 'No variants listed.',
  });
}

function signatures(b) {
  if (!b.signatures.length) return null;
  return h('ul', { class: 'plain' }, b.signatures.map((s) => h('li', null,
    s.verified ? badge('verified', 'ok') : badge('not verified', 'bad'), ' ',
    h('code', { title: s.signed_digest }, shortDigest(s.signed_digest)),
    s.key_fingerprint ? ` key ${s.key_fingerprint}` : '', s.problem ? `: ${s.problem}` : '')));
}
