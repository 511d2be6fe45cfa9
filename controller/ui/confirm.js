// The confirmation dialog operator verbs go through: what will happen, an optional reason, then OK or Cancel.
import { h } from './dom.js';

let dialog;
let parts;

function build() {
  parts = {
    title: h('h2', { id: 'confirm-title' }),
    text: h('p', { id: 'confirm-text' }),
    reason: h('textarea', { id: 'confirm-reason', name: 'reason', rows: 3, maxlength: 1000 }),
    ok: h('button', { type: 'submit', id: 'confirm-ok', value: 'ok', class: 'primary' }),
  };
  const cancel = h('button', { type: 'button', id: 'confirm-cancel', on: { click: () => dialog.close('cancel') } }, 'Cancel');
  // method=dialog: the OK button closes the dialog with returnValue "ok"; Escape and Cancel leave it otherwise.
  dialog = h('dialog', { id: 'confirm', 'aria-labelledby': 'confirm-title', 'aria-describedby': 'confirm-text' },
    h('form', { method: 'dialog' }, parts.title, parts.text,
      h('label', { for: 'confirm-reason' }, 'Reason (optional, kept in the event log)'), parts.reason,
      h('div', { class: 'actions' }, cancel, parts.ok)));
  document.body.append(dialog);
}

/** Resolves to the reason ('' when none was given) on OK, null on Cancel or Escape. */
export function confirm({ title, text, ok, danger = false }) {
  if (!dialog) build();
  parts.title.textContent = title;
  parts.text.textContent = text;
  parts.ok.textContent = ok;
  parts.ok.classList.toggle('danger', danger);
  parts.reason.value = '';
  dialog.returnValue = '';
  dialog.showModal();
  parts.reason.focus();
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok' ? parts.reason.value.trim() : null), { once: true });
  });
}
