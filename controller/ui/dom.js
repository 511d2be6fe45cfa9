// DOM building: elements from data with text nodes only, so API strings can never become markup.

// Properties set as DOM properties rather than attributes (their attributes only hold the initial state).
const PROPS = new Set(['value', 'checked', 'disabled', 'hidden', 'selected', 'open']);

/** h('a', {href, class, data: {x: 1}, on: {click}}, 'text', child, [more]) → element. */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = [v].flat().filter(Boolean).join(' ');
    else if (k === 'on') for (const [type, fn] of Object.entries(v)) el.addEventListener(type, fn);
    else if (k === 'data') for (const [dk, dv] of Object.entries(v)) el.dataset[dk] = dv;
    else if (PROPS.has(k)) el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  return append(el, children);
}

/** Appends children, skipping null/false; strings become text nodes (never parsed). */
export function append(el, children) {
  for (const c of [children].flat(Infinity)) {
    if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

/** Replaces an element's children; like h(), it skips null/false children. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

let ids = 0;
/** A fresh id for label/aria associations. */
const uid = (prefix = 'u') => `${prefix}-${++ids}`;

/**
 * A table inside a keyboard-scrollable wrapper (narrow screens scroll it sideways).
 * head: column names, or {text, class} for numeric columns; rows: <tr> elements.
 */
export function table({ id, label, head, rows, empty = 'Nothing to show.' }) {
  const cols = head.map((c) => (typeof c === 'string' ? { text: c } : c));
  const body = rows.length ? rows : [h('tr', null, h('td', { colspan: cols.length, class: 'empty' }, empty))];
  return h('div', { class: 'table-wrap', role: 'region', 'aria-label': label, tabindex: 0 },
    h('table', { id },
      h('caption', { class: 'sr-only' }, label),
      h('thead', null, h('tr', null, cols.map((c) => h('th', { scope: 'col', class: c.class }, c.text)))),
      h('tbody', null, body)));
}

/** A card section with a heading that names it for assistive technology. */
export function section(title, ...children) {
  const id = uid('s');
  return h('section', { class: 'card', 'aria-labelledby': id }, h('h2', { id }, title), children);
}

/** A description list from [term, value] pairs; pairs with a null/empty value are left out. */
export function dl(pairs) {
  const kept = pairs.filter(([, v]) => v !== null && v !== undefined && v !== '');
  return h('dl', { class: 'facts' }, kept.map(([k, v]) => [h('dt', null, k), h('dd', null, v)]));
}

/** A labelled form control. */
export function field(label, control) {
  if (!control.id) control.id = uid('f');
  return h('div', { class: 'field' }, h('label', { for: control.id }, label), control);
}

/** A <select> from [value, text] pairs with `value` selected. */
export function select(name, options, value) {
  return h('select', { name }, options.map(([v, t]) => h('option', { value: v, selected: v === value }, t)));
}

/**
 * Replaces a select's options only when they changed, so a refresh does not disturb the user; `value` is
 * selected (it may name an option that did not exist before, e.g. one from the URL).
 */
export function setOptions(sel, options, value = sel.value) {
  const same = sel.options.length === options.length && options.every(([v, t], i) => sel.options[i].value === v && sel.options[i].text === t);
  if (same) return;
  sel.replaceChildren(...options.map(([v, t]) => h('option', { value: v, selected: v === value }, t)));
}

/** A short status word with a colour class; the word itself carries the meaning. */
export const badge = (text, kind) => h('span', { class: ['badge', kind] }, text);

export const link = (href, text) => h('a', { href }, text);
