// The back end: one fetch wrapper (cookie session, CSRF header, errors) and a function per endpoint that
// returns its JSON with defaults filled in (model.js).
import * as m from './model.js';

/**
 * A failed call: the HTTP status (0: the controller could not be reached) and the server's words, or the
 * status line when it said none (`fromServer` false).
 */
export class ApiError extends Error {
  constructor(status, message, fromServer = false) {
    super(message);
    this.status = status;
    this.fromServer = fromServer;
  }
}

let csrf = '';
let unauthorized = () => {};
export const setCsrf = (token) => { csrf = token; };
/** Who handles a 401 (app.js sends the user to sign in). */
export const onUnauthorized = (fn) => { unauthorized = fn; };

// Identical GETs in flight share one fetch: views loading at once often ask for the same thing (the summary).
const inflight = new Map();

/** The query string of params, leaving out empty values. */
function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params ?? {})) if (v !== '' && v !== null && v !== undefined) q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : '';
}

/** One call. `quiet401`: the caller handles 401 itself (sign-in, the session probe). */
export async function request(method, url, { body, quiet401 = false } = {}) {
  const headers = { accept: 'application/json' };
  if (method !== 'GET' && csrf) headers['x-alki-csrf'] = csrf; // none yet when signing in
  if (body !== undefined) headers['content-type'] = 'application/json';
  let res;
  try {
    res = await fetch(url, { method, headers, credentials: 'same-origin', cache: 'no-store', body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, 'The controller cannot be reached. Check the network, then reload.');
  }
  if (res.status === 401 && !quiet401) unauthorized();
  if (!res.ok) {
    const said = await errorText(res);
    throw new ApiError(res.status, said ?? `${res.status} ${res.statusText || 'error'}`, said !== null);
  }
  return res.status === 204 ? null : res.json();
}

/** The server's {"error": "..."}, or null. */
async function errorText(res) {
  try {
    const body = await res.json();
    return body?.error ? String(body.error) : null;
  } catch {
    return null; // not JSON
  }
}

export function get(path, params) {
  const url = path + query(params);
  if (!inflight.has(url)) inflight.set(url, request('GET', url).finally(() => inflight.delete(url)));
  return inflight.get(url);
}

const post = (path, body) => request('POST', path, { body });
const enc = encodeURIComponent;
const field = (name, of) => (r) => m.list(of)(r?.[name]);

export const summary = () => get('/api/v1/summary').then(m.summary);
export const devices = (params) => get('/api/v1/devices', params).then(m.devicePage);
export const device = (id) => get(`/api/v1/devices/${enc(id)}`).then(m.device);
export const benchmarks = (device, limit = 20) => get('/api/v1/benchmarks', { device, limit }).then(field('results', m.benchmark));
export const events = (params) => get('/api/v1/events', params).then(field('events', m.event));
/**
 * A growing copy of the events matching params (a rollout's, a device's), oldest first: the first call
 * reads the newest 1,000 (the API reads back from the end of the log, however long it is), later calls only
 * what came after; at most `keep` events are kept.
 */
export function eventTail(params, keep = 5000) {
  let log = [];
  return async () => {
    if (log.length === 0) {
      log = (await events({ ...params, order: 'newest', limit: 1000 })).reverse();
      return log;
    }
    for (let page = 0; page < 10; page++) {
      const after = log.at(-1)?.id ?? 0;
      const batch = await events({ ...params, after, limit: 1000 });
      log = log.concat(batch.filter((e) => e.id > after)).slice(-keep);
      if (batch.length < 1000) break;
    }
    return log;
  };
}
export const rollouts = () => get('/api/v1/rollouts').then(field('rollouts', m.rollout));
export const rollout = (id) => get(`/api/v1/rollouts/${enc(id)}`).then(m.rollout);
export const rolloutDevices = (id) => get(`/api/v1/rollouts/${enc(id)}/devices`).then(field('devices', m.rolloutDevice));
export const compare = (id) => get('/api/v1/compare', { rollout: id }).then(m.comparison);
export const trends = (params) => get('/api/v1/trends', params).then(field('buckets', m.bucket));
export const bundles = () => get('/api/v1/bundles').then(field('bundles', m.bundle));
/** An operator verb (pause, resume, promote, abort, retry) on a rollout. */
export const act = (id, verb, reason) => post(`/api/v1/rollouts/${enc(id)}/${verb}`, { reason }).then(m.rollout);
