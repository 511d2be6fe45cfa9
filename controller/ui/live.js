// The one EventSource: the fleet's event log as it happens, handed to whoever subscribed (the current view).
import { request } from './api.js';
import * as m from './model.js';

const REOPEN_MS = 5000;
let source = null;
let lastId = 0;
let reopen = null;
let probing = false;
const subscribers = new Set();
const watchers = new Set();

/** fn(event) for every event; returns the unsubscribe function. */
export function subscribe(fn) {
  subscribers.add(fn);
  return () => subscribers.delete(fn);
}

/** fn('open' | 'connecting' | 'closed') on every change of the connection. */
export const onState = (fn) => watchers.add(fn);
const setState = (s) => watchers.forEach((fn) => fn(s));

/** Opens the stream after event id `after` (the newest the controller had when we signed in). */
export function start(after) {
  stop();
  lastId = after || 0;
  open();
}

export function stop() {
  clearTimeout(reopen);
  source?.close();
  source = null;
  setState('closed');
}

function open() {
  // Unnamed messages: the one 'message' listener gets every event type, also ones added after this file.
  source = new EventSource(`/api/v1/events/stream?named=false${lastId ? `&after=${lastId}` : ''}`);
  setState('connecting');
  source.addEventListener('open', () => setState('open'));
  source.addEventListener('error', failed);
  source.addEventListener('message', deliver);
}

function deliver(msg) {
  let ev;
  try { ev = m.event(JSON.parse(msg.data)); } catch { return; }
  // After we reopen the stream ourselves, what we already had may come again.
  if (ev.id && ev.id <= lastId) return;
  lastId = Math.max(lastId, ev.id);
  for (const fn of subscribers) fn(ev);
}

// The browser reconnects by itself (with Last-Event-ID) unless the server refused the stream; then we reopen
// it after a pause. Either way the session may have ended: the probe's 401 sends the user to sign in.
async function failed(e) {
  if (e.target !== source) return; // a stream we already closed
  if (source.readyState === EventSource.CLOSED) {
    setState('closed');
    source = null;
    reopen = setTimeout(open, REOPEN_MS);
  } else {
    setState('connecting');
  }
  if (probing) return;
  probing = true;
  try { await request('GET', '/ui/session'); } catch { /* 401 handled by api.js; others: keep trying */ }
  probing = false;
}
