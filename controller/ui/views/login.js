// The sign-in page: an access token in, a session cookie out, then back to where the user was going.
import { h } from '../dom.js';
import * as session from '../session.js';

export const title = 'Sign in';

/** Only our own routes: `next` comes from the URL, which anyone can write. */
function nextRoute(route) {
  const next = route.query.get('next') ?? '';
  return /^#\/(?!login)/.test(next) ? next : '#/devices';
}

const SAID = { 401: 'That token is not valid.', 429: 'Too many sign-in attempts: wait a minute, then try again.' };
const failure = (e) => (e.fromServer ? e.message : SAID[e.status] ?? e.message);

export function mount(main, route) {
  const error = h('p', { id: 'login-error', class: 'error', 'aria-live': 'polite' });
  const token = h('input', {
    id: 'token', name: 'token', type: 'password', required: true, autocomplete: 'current-password',
    spellcheck: 'false', 'aria-describedby': 'login-help login-error',
  });
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Sign in');
  const form = h('form', { id: 'login-form', class: 'card login' },
    h('h1', null, 'Alki Fleet'),
    h('label', { for: 'token' }, 'Access token'),
    token,
    h('p', { id: 'login-help', class: 'hint' }, 'A token from “alkictl token create” (it starts with alki_). It is exchanged for a session and not stored by this page.'),
    error,
    submit);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    error.textContent = '';
    submit.disabled = true;
    try {
      await session.login(token.value.trim());
      location.replace(nextRoute(route));
    } catch (x) {
      error.textContent = failure(x);
      token.select();
    } finally {
      submit.disabled = false;
    }
  });
  main.replaceChildren(form);
  token.focus();
  return { refresh: async () => {} };
}
