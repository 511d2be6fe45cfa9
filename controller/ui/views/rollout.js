// One rollout: its state and why, the steps, devices per class, the A/B comparison, quality, history, and
// the operator verbs (behind a confirmation).
import * as api from '../api.js';
import * as notice from '../notice.js';
import * as session from '../session.js';
import { confirm } from '../confirm.js';
import { h, replace, table, section, badge } from '../dom.js';
import { abChart, slopeChart, stackedBars } from '../charts.js';
import {
  STATES, GATE_STATES, PAUSE_REASONS, name, bundleRef, verdictBadge, time, ratio, percent, fixed, deviceHref,
} from '../format.js';
import { stepText, candidateName } from './rollouts.js';
import { eventHistory } from './history.js';

export const title = 'Rollout';

const VERBS = {
  pause: { ok: 'Pause', text: 'Stop moving devices to the candidate until the rollout is resumed. Devices already moved stay where they are.' },
  resume: { ok: 'Resume', text: 'Continue the rollout. A step it was held on as inconclusive is accepted.' },
  promote: { ok: 'Promote', text: 'Jump to the last step (100%) now, even outside the schedule window. Failures still halt or abort.' },
  abort: { ok: 'Abort', text: 'Return every candidate device to what it ran before. This cannot be undone.', danger: true },
  retry: { ok: 'Retry', text: 'Give the failed candidate devices another try.' },
};

const ACTIVE = [1, 2, 3]; // pending, progressing, paused: the states verbs apply to

/** The verbs that apply to the rollout as it is (the back end refuses the others with 409). */
function verbsFor(ro) {
  const active = ACTIVE.includes(ro.state);
  return [
    (ro.state === 1 || ro.state === 2) && 'pause',
    ro.state === 3 && 'resume',
    active && 'promote',
    active && 'abort',
    active && (ro.counts.failed > 0 || ro.halted_classes.length > 0) && 'retry',
  ].filter(Boolean);
}

export function mount(main, route) {
  const id = route.id;
  const head = rolloutHeader(id, () => refresh());
  const body = h('div');
  main.append(h('p', { class: 'crumbs' }, h('a', { href: '#/rollouts' }, 'Rollouts'), ' / ', id),
    h('article', { id: 'rollout', data: { rolloutId: id } }, head.el, body));
  let seq = 0;
  let members = new Set(); // device ids of the rollout, so their own events refresh it too
  const events = api.eventTail({ rollout: id });
  const drawHistory = eventHistory({ label: 'Rollout events, newest first', prefix: 'rollout.', devices: true });
  const ui = { failuresOpen: false }; // what the user opened stays open across refreshes

  async function refresh() {
    const mine = ++seq;
    const [ro, devices, log, cmp] = await Promise.all([
      api.rollout(id), api.rolloutDevices(id), events(),
      // No comparison is not an error of the page: the rollout may have no measurements yet.
      api.compare(id).catch((e) => (e.status === 401 ? Promise.reject(e) : null)),
    ]);
    if (mine !== seq) return;
    members = new Set(devices.map((d) => d.device_id));
    head.update(ro);
    replace(body, steps(ro, log), classes(ro, devices, ui), comparison(cmp), quality(ro, cmp), gates(ro), drawHistory(log));
  }

  const wants = (ev) => ev.rollout_id === id || (ev.type.startsWith('device.') && members.has(ev.device_id));
  return { refresh, wants };
}

/**
 * The header: state, step, why it waits, and the verbs. Its elements stay and are updated in place, so a
 * live refresh neither moves the keyboard focus nor replaces a button under the pointer.
 */
function rolloutHeader(id, refresh) {
  const state = h('span', { id: 'rollout-state', class: 'badge' });
  const step = h('span', { id: 'rollout-step' });
  const updated = h('span', { class: 'muted' });
  const candidate = h('p', { class: 'candidate' });
  const why = h('div');
  const actions = h('div', { class: 'actions', role: 'group', 'aria-label': 'Rollout actions', hidden: true });
  const el = h('header', { class: 'rollout-head' }, h('h1', null, `Rollout ${id}`), candidate, h('p', { class: 'status' }, state, step, updated), why, actions);
  let shown = '';

  function update(ro) {
    state.textContent = name(STATES, ro.state);
    state.dataset.state = ro.state;
    state.className = `badge state-${ro.state}`;
    step.textContent = stepText(ro);
    step.dataset.step = ro.current_step;
    replace(updated, 'updated ', time(ro.updated_unix_ms));
    replace(candidate, 'Candidate ', h('strong', null, candidateName(ro)), ro.candidate.digest && h('code', { class: 'muted' }, ` ${bundleRef(ro.candidate)}`));
    replace(why, reasons(ro));
    const verbs = session.canOperate() ? verbsFor(ro) : []; // viewers see no verbs at all
    if (verbs.join() !== shown) replace(actions, verbs.map(button));
    shown = verbs.join();
    actions.hidden = !verbs.length;
  }

  function button(verb) {
    return h('button', { type: 'button', data: { action: verb }, class: VERBS[verb].danger ? 'danger' : null, on: { click: () => run(verb) } }, VERBS[verb].ok);
  }

  async function run(verb) {
    const reason = await confirm({ title: `${VERBS[verb].ok} rollout ${id}?`, ...VERBS[verb] });
    if (reason === null) return;
    const buttons = [...actions.querySelectorAll('button')];
    buttons.forEach((b) => { b.disabled = true; });
    try {
      update(await api.act(id, verb, reason)); // the verb's answer is the rollout after it
      notice.clear();
    } catch (e) {
      notice.report(e); // 403 for a viewer, 409 when the verb no longer applies
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
      await refresh().catch(notice.report);
    }
  }

  return { el, update };
}

/** Why the rollout is where it is: its message first, then what else holds it. */
function reasons(ro) {
  const why = [
    ro.pause_reason ? `This rollout is ${name(PAUSE_REASONS, ro.pause_reason)}.` : '',
    ro.halted_classes.length ? `Halted classes (their candidate devices went back to A): ${ro.halted_classes.join(', ')}.` : '',
    ro.promoted ? 'Promoted by an operator: inconclusive gates pass.' : '',
    ro.inconclusive_accepted ? 'An operator accepted the inconclusive gate of this step.' : '',
  ].filter(Boolean);
  return [
    ro.message && h('p', { class: ['callout', ro.state === 5 ? 'bad' : ro.state === 3 ? 'warn' : 'info'] }, ro.message),
    why.length ? h('ul', { class: 'why' }, why.map((w) => h('li', null, w))) : null,
    ro.window_opens_unix_ms ? h('p', { class: 'callout warn' }, 'Outside its schedule window: it continues ', time(ro.window_opens_unix_ms), '.') : null,
  ];
}

/** When each step started: rollout.started is step 1; "advanced to step N"; promote jumps to the last. */
function stepStarts(ro, events, n) {
  const starts = [];
  for (const e of events) {
    if (e.type === 'rollout.started') starts[0] = e.unix_ms;
    else if (e.type === 'rollout.promote') starts[n - 1] = e.unix_ms;
    else if (e.type === 'rollout.advanced') {
      const m = /step (\d+)/.exec(e.message);
      starts[m ? Number(m[1]) - 1 : starts.length] = e.unix_ms;
    }
  }
  if (ro.step_started_unix_ms) starts[ro.current_step] = ro.step_started_unix_ms;
  return starts;
}

function steps(ro, events) {
  const list = ro.spec.steps.length ? ro.spec.steps : [{ percent: 100, min_soak_seconds: 0 }];
  const starts = stepStarts(ro, events, list.length);
  const done = ro.state === 4;
  return section('Steps', h('ol', { class: 'steps' }, list.map((st, i) => {
    const where = done || i < ro.current_step ? 'done' : i === ro.current_step ? 'current' : 'todo';
    return h('li', { class: where, 'aria-current': where === 'current' ? 'step' : null },
      h('span', { class: 'step-name' }, `Step ${i + 1}`),
      h('span', { class: 'step-pct' }, `${st.percent}%`),
      h('span', { class: 'step-when' }, starts[i] ? ['started ', time(starts[i])] : where === 'todo' ? 'not started' : '—'),
      st.min_soak_seconds ? h('span', { class: 'step-soak' }, `soak ${soak(st.min_soak_seconds)}`) : null,
      h('span', { class: 'step-state' }, where === 'todo' ? 'to come' : where === 'current' && ro.state === 5 ? 'aborted' : where));
  })));
}

const soak = (sec) => (sec >= 3600 ? `${fixed(sec / 3600, 1)} h` : sec >= 60 ? `${Math.round(sec / 60)} min` : `${sec} s`);

const SEGMENTS = [
  { name: 'active', cls: 'out-active', outcome: 2 },
  { name: 'pending', cls: 'out-pending', outcome: 1 },
  { name: 'failed', cls: 'out-failed', outcome: 3 },
  { name: 'reverted', cls: 'out-reverted', outcome: 4 },
  { name: 'not moved yet', cls: 'out-waiting' },
];

function classes(ro, devices, ui) {
  const names = [...new Set([...ro.classes.map((c) => c.class), ...devices.map((d) => d.class)])].sort();
  const rows = names.map((cls) => {
    const mine = devices.filter((d) => d.class === cls);
    const values = SEGMENTS.slice(0, 4).map((sg) => mine.filter((d) => d.outcome === sg.outcome).length);
    // Selected devices the rollout has not moved to B yet complete the bar.
    const selected = ro.classes.find((c) => c.class === cls)?.counts.selected ?? 0;
    return { label: cls || '(none)', values: [...values, Math.max(0, selected - mine.length)] };
  });
  const failures = devices.filter((d) => d.outcome === 3 && d.reason);
  return section('Devices per class',
    rows.length ? stackedBars(rows, SEGMENTS, 'Candidate devices per hardware class by outcome') : h('p', { class: 'muted' }, 'No devices selected yet.'),
    rows.length ? h('ul', { class: 'legend' }, SEGMENTS.map((sg) => h('li', { class: sg.cls }, h('span', { class: 'swatch', 'aria-hidden': 'true' }), sg.name))) : null,
    table({
      label: 'Gates per hardware class at this step',
      head: ['Class', 'Verdict', 'Reason', { text: 'Active / settled', class: 'num' }, { text: 'Failed', class: 'num' },
        { text: 'Tokens/s B/A', class: 'num' }, { text: 'TTFT B/A', class: 'num' }, { text: 'Samples A / B', class: 'num' }, 'More'],
      rows: ro.classes.map((c) => h('tr', null,
        h('th', { scope: 'row' }, c.class),
        h('td', null, verdictBadge(c.verdict)),
        h('td', { class: 'message' }, c.reason),
        h('td', { class: 'num' }, percent(c.success_ratio)),
        h('td', { class: 'num' }, `${c.counts.failed} (${percent(c.failure_ratio)})`),
        h('td', { class: 'num' }, ratio(c.tokens_per_second_ratio)),
        h('td', { class: 'num' }, ratio(c.ttft_ratio)),
        h('td', { class: 'num' }, `${c.a_samples} / ${c.b_samples}`),
        h('td', null, extras(ro, c)))),
      empty: 'No class has been judged yet.',
    }),
    failures.length ? h('details', { open: ui.failuresOpen, on: { toggle: (e) => { ui.failuresOpen = e.target.open; } } },
      h('summary', null, `Why devices failed (${failures.length})`),
      h('ul', { class: 'plain' }, failures.slice(0, 200).map((d) => h('li', null, h('a', { href: deviceHref(d.device_id) }, d.device_id), `: ${d.reason}`)))) : null);
}

/** Prestage and real-traffic numbers, only where they say something. */
function extras(ro, c) {
  const parts = [];
  if (ro.spec.prestage) parts.push(`staged ${c.staged}, stage failed ${c.stage_failed}`);
  if (c.a_error_rate || c.b_error_rate) parts.push(`error rate A ${percent(c.a_error_rate)} / B ${percent(c.b_error_rate)}`);
  if (c.a_p95_latency_ms || c.b_p95_latency_ms) parts.push(`p95 A ${fixed(c.a_p95_latency_ms, 0)} / B ${fixed(c.b_p95_latency_ms, 0)} ms`);
  return parts.join('; ');
}

function comparison(cmp) {
  cmp ??= { classes: [], devices: [] }; // the comparison could not be had: the chart says there is none
  const byClass = (cls) => cmp.devices.filter((d) => d.class === cls && d.a_tokens_per_second && d.b_tokens_per_second);
  const paired = cmp.classes.map((c) => [c.class, byClass(c.class)]).filter(([, pairs]) => pairs.length);
  return section('A/B comparison',
    h('p', { class: 'hint' }, 'Per hardware class: A is the baseline, B the candidate. Bars are medians across devices, whiskers the lowest and highest device, n the sample count.'),
    h('div', { class: 'chart-box' }, abChart(cmp.classes)),
    paired.length ? [
      h('h3', null, 'Per device, A → B tokens/s'),
      h('div', { class: 'multiples' }, paired.map(([cls, pairs]) => slopeChart(cls, pairs))),
    ] : null);
}

const QUALITY = [
  ['Max KL divergence', 'max_kld', (v) => fixed(v, 4)],
  ['Min top-1 agreement', 'min_top1_agreement', percent],
  ['Max perplexity ratio', 'max_perplexity_ratio', (v) => fixed(v, 3)],
  ['Min golden pass', 'min_golden_pass', percent],
];

function quality(ro, cmp) {
  const from = cmp?.classes.some((c) => c.quality) ? cmp.classes : ro.classes;
  const rows = from.filter((c) => c.quality);
  if (!rows.length) return null;
  return section('Quality (B against A)', table({
    label: 'Quality per hardware class: worst across measured devices',
    head: ['Class', { text: 'Measured', class: 'num' }, { text: 'Could not run', class: 'num' }, ...QUALITY.map(([t]) => ({ text: t, class: 'num' }))],
    rows: rows.map((c) => h('tr', null,
      h('th', { scope: 'row' }, c.class),
      h('td', { class: 'num' }, c.quality.measured),
      h('td', { class: 'num' }, c.quality.could_not_run),
      QUALITY.map(([, k, f]) => h('td', { class: 'num' }, c.quality[k] === null ? '—' : f(c.quality[k]))))),
  }));
}

function gates(ro) {
  if (!ro.external_gates.length) return null;
  return section('External gates at this step', table({
    label: 'External gates',
    head: ['Gate', 'Class', 'State', 'Answer', 'Asked'],
    rows: ro.external_gates.map((g) => h('tr', null,
      h('th', { scope: 'row' }, g.gate),
      h('td', null, g.class || 'all'),
      h('td', null, badge(name(GATE_STATES, g.state), ['idle', 'busy', 'ok', 'bad', 'warn'][g.state] ?? 'idle')),
      h('td', { class: 'message' }, g.message, g.decided_by && ` (by ${g.decided_by})`),
      h('td', null, time(g.asked_unix_ms)))),
  }));
}
