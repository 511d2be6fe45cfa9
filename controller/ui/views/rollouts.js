// The rollouts page: every rollout, newest first, with where it is and why.
import * as api from '../api.js';
import { h, table } from '../dom.js';
import { stateBadge, bundleName, bundleRef, time, rolloutHref } from '../format.js';

export const title = 'Rollouts';

/** "Step 2 of 4 (25%)": current_step is 0-based. */
export function stepText(ro) {
  const steps = ro.spec.steps;
  const n = Math.max(steps.length, ro.current_step + 1);
  const percent = steps[ro.current_step]?.percent;
  return `Step ${ro.current_step + 1} of ${n}${percent === undefined ? '' : ` (${percent}%)`}`;
}

/** What the rollout rolls out: the pinned candidate, or what the spec named before it was pinned. */
export const candidateName = (ro) => bundleName(ro.candidate) || `${ro.spec.repository}:${ro.spec.candidate}`;

export function mount(main) {
  const body = h('div');
  main.append(h('h1', null, 'Rollouts'), body);
  let seq = 0;

  async function refresh() {
    const mine = ++seq;
    const list = await api.rollouts();
    if (mine !== seq) return;
    list.sort((a, b) => b.created_unix_ms - a.created_unix_ms);
    body.replaceChildren(table({
      id: 'rollouts', label: 'Rollouts, newest first',
      head: ['Rollout', 'Candidate', 'State', 'Step', { text: 'Active / failed / selected', class: 'num' }, 'Created', 'Message'],
      rows: list.map(row),
      empty: 'No rollouts yet: start one with “alkictl rollout create”.',
    }));
  }

  return { refresh, wants: (ev) => ev.type.startsWith('rollout.') };
}

function row(ro) {
  const c = ro.counts;
  return h('tr', { data: { rolloutId: ro.id } },
    h('th', { scope: 'row' }, h('a', { href: rolloutHref(ro.id) }, ro.id)),
    h('td', { title: bundleRef(ro.candidate) || null }, candidateName(ro)),
    h('td', null, stateBadge(ro.state)),
    h('td', null, stepText(ro)),
    h('td', { class: 'num' }, `${c.active} / `, h('span', { class: c.failed ? 'bad-text' : null }, c.failed), ` / ${c.selected}`),
    h('td', null, time(ro.created_unix_ms)),
    h('td', { class: 'message' }, ro.message));
}
