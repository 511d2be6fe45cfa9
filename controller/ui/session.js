// The signed-in user: name, role, and the CSRF token every state-changing request carries. The session
// cookie itself is HttpOnly: this module only ever sees what /ui/session says about it.
import { request, setCsrf } from './api.js';
import * as m from './model.js';

let user = null;
const listeners = new Set();

export const current = () => user;
/** Operators and admins may act on rollouts; viewers only look. */
export const canOperate = () => user?.role === 'operator' || user?.role === 'admin';
/** fn(user or null) after every sign-in and sign-out. */
export const onChange = (fn) => listeners.add(fn);

function set(next) {
  user = next;
  setCsrf(next?.csrf ?? '');
  for (const fn of listeners) fn(user);
}

/** Asks the controller who we are; null when signed out. */
export async function load() {
  try {
    set(m.session(await request('GET', '/ui/session', { quiet401: true })));
  } catch (e) {
    if (e.status !== 401) throw e;
    set(null);
  }
  return user;
}

export async function login(token) {
  set(m.session(await request('POST', '/ui/login', { body: { token }, quiet401: true })));
}

export async function logout() {
  try {
    await request('POST', '/ui/logout', { quiet401: true });
  } finally {
    set(null);
  }
}

/** Forgets the user after the controller said 401 (expired or revoked session). */
export function clear() {
  if (user) set(null);
}
