// The console's shell: hash routing, the session and header, and live events fed to the current view.
import * as api from './api.js';
import * as live from './live.js';
import * as notice from './notice.js';
import * as session from './session.js';
import { ago } from './format.js';
import * as login from './views/login.js';
import * as devices from './views/devices.js';
import * as device from './views/device.js';
import * as rollouts from './views/rollouts.js';
import * as rollout from './views/rollout.js';
import * as trends from './views/trends.js';
import * as bundles from './views/bundles.js';

// A view module exports `title` and `mount(main, route)`, which builds the page's frame and returns
// {refresh(): Promise (fetch and draw its data), wants?(event): boolean (whether a live event concerns it)}.
const ROUTES = {
  devices, 'devices/:id': device, rollouts, 'rollouts/:id': rollout, trends, bundles,
};

const main = document.getElementById('main');
let current = null; // {view, stop}: the mounted view and how to unsubscribe it from live events

/** "#/rollouts/ro-1?x=y" → {name: 'rollouts', id: 'ro-1', query}. */
function parse(hash) {
  const raw = hash.replace(/^#\/?/, '');
  const q = raw.indexOf('?');
  const [name = '', id] = (q < 0 ? raw : raw.slice(0, q)).split('/').map((p) => {
    try { return decodeURIComponent(p); } catch { return p; }
  });
  return { name: name || 'devices', id: id || null, query: new URLSearchParams(q < 0 ? '' : raw.slice(q + 1)) };
}

/** Off to sign in, remembering where the user was so that signing in returns there. */
function toLogin() {
  if (parse(location.hash).name === 'login') return;
  location.replace(`#/login?next=${encodeURIComponent(location.hash || '#/devices')}`);
}

/**
 * Calls the async fn at most once per interval, the last call of a burst included. The interval is a second,
 * or five times what the last call took when that is longer: during a large rollout thousands of events
 * arrive, and a console must not keep the controller busy redrawing a page nobody can read that fast.
 */
function throttle(fn) {
  let timer = null;
  let last = 0;
  let took = 0;
  const call = () => {
    if (timer) return;
    const wait = Math.max(0, last + Math.max(1000, 5 * took) - Date.now());
    timer = setTimeout(async () => {
      const started = Date.now();
      try { await fn(); } finally {
        took = Date.now() - started;
        last = Date.now();
        timer = null;
      }
    }, wait);
  };
  call.cancel = () => clearTimeout(timer);
  return call;
}

function unmount() {
  current?.stop();
  current = null;
  notice.clear();
  main.replaceChildren();
  delete main.dataset.ready;
}

/** Mounts the view of the hash; `moved`: the user navigated, so focus goes to the new content. */
async function show(moved = false) {
  unmount();
  const route = parse(location.hash);
  header(route);
  if (route.name === 'login') {
    document.title = 'Sign in · Alki Fleet';
    login.mount(main, route);
    main.dataset.ready = 'true';
    return;
  }
  if (!session.current()) return toLogin();
  const mod = ROUTES[route.id === null ? route.name : `${route.name}/:id`];
  if (!mod) return location.replace('#/devices');
  document.title = `${route.id ?? mod.title} · Alki Fleet`;
  const view = mod.mount(main, route);
  if (moved) {
    // Screen readers and keyboards start at the new page rather than at the link that led there.
    window.scrollTo(0, 0);
    main.focus({ preventScroll: true });
  }
  const me = { view };
  const refresh = throttle(() => draw(me, false));
  const unsubscribe = live.subscribe((ev) => view.wants?.(ev) && refresh());
  me.stop = () => { unsubscribe(); refresh.cancel(); };
  current = me;
  await draw(me, true);
}

async function draw(me, first) {
  try {
    await me.view.refresh();
    if (me !== current || !first) return;
    main.dataset.ready = 'true';
    window.alkiFirstRender ??= performance.now();
  } catch (e) {
    if (me === current) notice.report(e);
  }
}

function header(route) {
  const top = document.getElementById('top');
  top.hidden = route.name === 'login';
  for (const a of top.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === route.name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

const LIVE_WORDS = { open: 'Live', connecting: 'Reconnecting…', closed: 'Not live' };
live.onState((state) => {
  const el = document.getElementById('live');
  el.dataset.state = state;
  el.textContent = LIVE_WORDS[state];
  el.title = state === 'open' ? 'Pages update as the fleet changes' : 'Live updates are not arriving; pages show what they last loaded';
});

let expiry = null;
let liveFor = null; // whose session the stream was opened for
session.onChange(async (user) => {
  document.getElementById('whoami').textContent = user ? `${user.name} (${user.role})` : '';
  clearTimeout(expiry);
  if (!user) {
    liveFor = null;
    return live.stop();
  }
  // When the session expires, ask again: a signed-out answer sends the user to sign in.
  const recheck = () => session.load().then((u) => u || toLogin(), () => {});
  // At least a minute apart: a browser clock ahead of the controller's must not turn this into polling.
  const left = Math.max(60e3, user.expires_unix_ms - Date.now() + 1000);
  if (user.expires_unix_ms) expiry = setTimeout(recheck, Math.min(2 ** 31 - 1, left)); // setTimeout's limit
  if (liveFor === user.name) return; // the same session again: its stream goes on
  liveFor = user.name;
  try {
    live.start((await api.summary()).newest_event_id);
  } catch (e) {
    notice.report(e);
  }
});

api.onUnauthorized(() => {
  session.clear();
  toLogin();
});

document.getElementById('logout').addEventListener('click', async () => {
  try { await session.logout(); } catch { /* signed out here either way */ }
  location.replace('#/login');
});

// Relative times ("3 min ago") stay true without refetching anything.
setInterval(() => {
  for (const t of document.querySelectorAll('time[data-ms]')) t.textContent = ago(Number(t.dataset.ms));
}, 30000);

window.addEventListener('hashchange', () => show(true));

try {
  await session.load();
} catch (e) {
  notice.report(e);
}
if (!session.current() && parse(location.hash).name !== 'login') toLogin();
else show();
