// The page's one notice (#notice, role="alert"): errors and refusals the user has to see.
import { h } from './dom.js';

const el = () => document.getElementById('notice');

export function show(message) {
  const n = el();
  n.replaceChildren(h('p', null, message), h('button', { type: 'button', class: 'link', on: { click: clear } }, 'Dismiss'));
  n.hidden = false;
}

export function clear() {
  const n = el();
  n.hidden = true;
  n.replaceChildren();
}

/** Shows a failed call; a 401 is not shown (the user is already on the way to sign in). */
export function report(err) {
  if (err?.status === 401) return;
  if (err?.status === 403) show(`Not allowed: ${err.message}`);
  else show(err?.message || String(err));
}
