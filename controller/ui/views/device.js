// One device: what it serves and why not, its hardware, labels, benchmarks and history.
import * as api from '../api.js';
import { h, replace, table, section, dl, badge } from '../dom.js';
import { lineChart } from '../charts.js';
import { eventHistory } from './history.js';
import {
  ERROR_CODES, TRIGGERS, name, phaseBadge, bundleName, bundleCell, shortDigest, time, bytes, measured, fixed, rolloutHref,
} from '../format.js';

export const title = 'Device';

export function mount(main, route) {
  const id = route.id;
  const body = h('div', { class: 'grid' });
  const heading = h('div', { class: 'page-head' }, h('h1', null, id));
  main.append(h('p', { class: 'crumbs' }, h('a', { href: '#/devices' }, 'Fleet'), ' / ', id), heading, body);
  let seq = 0;
  const events = api.eventTail({ device: id }, 1000);
  const drawHistory = eventHistory({ label: 'Device events, newest first', prefix: 'device.' });

  async function refresh() {
    const mine = ++seq;
    const [d, log, benches] = await Promise.all([api.device(id), events(), api.benchmarks(id, 20)]);
    if (mine !== seq) return;
    replace(heading, h('h1', null, d.id),
      badge(d.connected ? 'online' : 'offline', d.connected ? 'ok' : 'idle'), phaseBadge(d.phase),
      d.decommissioned && badge('decommissioned', 'bad'));
    replace(body, serving(d), hardware(d), labels(d), benchmarks(benches), drawHistory(log));
  }

  return { refresh, wants: (ev) => ev.device_id === id };
}

function serving(d) {
  const desiredDiffers = d.desired.digest && d.desired.digest !== d.running.digest;
  const t = d.latest_telemetry;
  const b = d.latest_benchmark;
  return section('Serving',
    d.error.code || d.error.message
      ? h('div', { class: 'callout bad' }, h('strong', null, name(ERROR_CODES, d.error.code)), ': ', d.error.message || 'no details')
      : null,
    dl([
      ['Running', bundleCell(d.running)],
      ['Variant', d.running_variant ? h('span', { title: d.running_variant }, shortDigest(d.running_variant)) : null],
      ['Runtime build', d.running_runtime_platform || null],
      ['Phase', phaseBadge(d.phase)],
      ['Desired', desiredDiffers ? bundleCell(d.desired) : null],
      ['Generation', `desired ${d.desired_generation}, applied ${d.applied_generation}`],
      ['Rollout', d.rollout_id ? h('span', null, h('a', { href: rolloutHref(d.rollout_id) }, d.rollout_id), d.cohort && ` (cohort ${d.cohort})`) : null],
      ['Staged', d.staged.length ? d.staged.map(bundleName).join(', ') : null],
      ['Tokens/s', t?.generation_tokens_per_second ? `${fixed(t.generation_tokens_per_second)} (telemetry)` : b ? `${measured(b.generation_tokens_per_second.median)} (benchmark)` : null],
      ['TTFT', t?.ttft_ms ? `${fixed(t.ttft_ms, 0)} ms` : b?.ttft_ms.median ? `${fixed(b.ttft_ms.median, 0)} ms (benchmark)` : null],
      ['Requests', t ? `${t.requests_total} (${t.request_errors_total} errors)` : null],
      ['Throttled', t?.throttled ? 'yes: the CPU throttled in the last interval' : null],
      ['Agent', d.agent_version],
      ['Last seen', time(d.last_seen_unix_ms)],
    ]));
}

function hardware(d) {
  const inv = d.inventory;
  return section('Hardware',
    dl([
      ['Class', inv.hardware_class],
      ['Hostname', inv.hostname],
      ['Board', inv.board_model],
      ['System', [inv.os, inv.kernel, inv.arch].filter(Boolean).join(' · ')],
      ['CPU', inv.cpu_model || inv.cpu_cores ? `${inv.cpu_model || 'CPU'}${inv.cpu_cores ? ` × ${inv.cpu_cores} cores` : ''}` : null],
      ['Memory', inv.memory_total_bytes ? `${bytes(inv.memory_available_bytes)} free of ${bytes(inv.memory_total_bytes)}` : null],
      ['Disk', inv.disk_total_bytes ? `${bytes(inv.disk_available_bytes)} free of ${bytes(inv.disk_total_bytes)}` : null],
      ['Power mode', inv.power_mode],
      ['GPUs', inv.gpus.length ? inv.gpus.map((g) => `${g.name || 'GPU'} (${bytes(g.vram_bytes)})`).join(', ') : null],
      ['Temperatures', inv.temperatures.length ? inv.temperatures.map((t) => `${t.sensor}: ${fixed(t.celsius, 0)} °C`).join(', ') : d.latest_telemetry?.max_temperature_celsius ? `${fixed(d.latest_telemetry.max_temperature_celsius, 0)} °C (hottest)` : null],
      ['CPU features', inv.cpu_features.join(' ')],
    ]));
}

function labels(d) {
  const entries = Object.entries(d.labels).sort();
  return section('Labels', entries.length
    ? h('ul', { class: 'chips' }, entries.map(([k, v]) => h('li', null, `${k}=${v}`)))
    : h('p', { class: 'muted' }, 'No labels.'));
}

function benchmarks(results) {
  const ok = results.filter((r) => !r.error && r.generation_tokens_per_second.median).sort((a, b) => a.at_unix_ms - b.at_unix_ms);
  const points = ok.map((r) => ({ x: r.at_unix_ms, y: r.generation_tokens_per_second.median, lo: r.generation_tokens_per_second.min, hi: r.generation_tokens_per_second.max }));
  return section('Benchmarks',
    points.length > 1 ? lineChart([{ name: 'Tokens/s', points }], { label: 'Generation tokens/s of this device’s benchmarks over time', height: 160 }) : null,
    table({
      label: 'Benchmarks, newest first',
      head: ['Time', 'Bundle', 'Variant', 'Trigger', { text: 'Tokens/s', class: 'num' }, { text: 'TTFT ms', class: 'num' }, 'Notes'],
      rows: results.map((r) => h('tr', null,
        h('td', null, time(r.at_unix_ms)),
        h('td', null, bundleCell(r.bundle)),
        h('td', null, r.variant_name || shortDigest(r.variant_digest) || '—'),
        h('td', null, name(TRIGGERS, r.trigger) || '—'),
        h('td', { class: 'num' }, measured(r.generation_tokens_per_second.median)),
        h('td', { class: 'num' }, measured(r.ttft_ms.median, 0)),
        h('td', null, r.error || (r.throttled ? 'throttled: numbers suspect' : '')))),
      empty: 'No benchmarks yet.',
    }));
}
