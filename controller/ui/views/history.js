// The history section of the device and rollout pages: their events, newest first.
import { h, replace, table, section } from '../dom.js';
import { time, deviceHref, rolloutHref } from '../format.js';

const FIRST = 200; // rows drawn until the user asks for all: a big rollout has thousands of events

/** A section that keeps itself (and whether the user asked for every row) across refreshes. */
export function eventHistory({ label, prefix, devices = false }) {
  let all = false;
  let last = [];
  const body = h('div');
  const el = section('History', body);

  function update(events) {
    last = events;
    const rows = [...events].reverse().slice(0, all ? undefined : FIRST);
    const more = events.length > rows.length
      ? h('button', { type: 'button', class: 'link', on: { click: () => { all = true; update(last); } } }, `Show all ${events.length} events`)
      : null;
    replace(body, table({
      label,
      head: ['Time', 'Event', devices && 'Device', 'Message'].filter(Boolean),
      rows: rows.map((e) => row(e, prefix, devices)),
      empty: 'No events yet.',
    }), more);
    return el;
  }
  return update;
}

function row(e, prefix, devices) {
  const bad = /failed|crash|halted|abort/.test(e.type);
  return h('tr', { class: bad ? 'bad-row' : null },
    h('td', null, time(e.unix_ms)),
    h('td', null, e.type.startsWith(prefix) ? e.type.slice(prefix.length).replaceAll('_', ' ') : e.type),
    devices && h('td', null, e.device_id ? h('a', { href: deviceHref(e.device_id) }, e.device_id) : ''),
    h('td', { class: 'message' }, e.message,
      prefix !== 'rollout.' && e.rollout_id ? [' (', h('a', { href: rolloutHref(e.rollout_id) }, e.rollout_id), ')'] : null));
}
