// Small DOM helpers. Text goes in as text nodes only: nothing the broker says is parsed as HTML.

export const $ = (id) => document.getElementById(id);

/** el('a', {href, class: 'x'}, 'text', child): attributes, then children (strings become text). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (k in node && typeof v !== 'string') node[k] = v;
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) if (c !== undefined && c !== null && c !== false) node.append(c instanceof Node ? c : String(c));
  return node;
}

/**
 * Replace a container's children, keeping keyboard focus on the element with the same
 * data-focus-key (a Revoke button, say) when the periodic refresh re-renders it.
 */
export function replaceKeepingFocus(container, ...nodes) {
  const key = container.contains(document.activeElement) ? document.activeElement?.dataset?.focusKey : undefined;
  container.replaceChildren(...nodes);
  if (key) container.querySelector(`[data-focus-key="${CSS.escape(key)}"]`)?.focus();
}

/** Say it to screen readers and sighted users alike (the aria-live status line). */
export function announce(message, kind = 'info') {
  const box = $('announce');
  box.textContent = '';
  box.dataset.kind = kind;
  // A fresh text node, so a repeated message is read again.
  setTimeout(() => (box.textContent = message), 30);
}

/** A modal confirmation; resolves true only on the confirm button. */
export function confirmAction(text, okLabel) {
  const dialog = $('confirm');
  $('confirm-text').textContent = text;
  $('confirm-ok').textContent = okLabel;
  return new Promise((resolve) => {
    const done = (answer) => {
      $('confirm-ok').removeEventListener('click', ok);
      $('confirm-cancel').removeEventListener('click', cancel);
      dialog.removeEventListener('close', cancel);
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const ok = () => done(true);
    const cancel = () => done(false);
    $('confirm-ok').addEventListener('click', ok);
    $('confirm-cancel').addEventListener('click', cancel);
    dialog.addEventListener('close', cancel);
    dialog.showModal();
    $('confirm-cancel').focus();
  });
}

/** 93784000 -> "1 d 2 h", 125000 -> "2 min 05 s": the two largest units. */
export function duration(ms) {
  const s = Math.max(0, Math.floor(Math.abs(ms) / 1000));
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (d > 0) return `${d} d ${h} h`;
  if (h > 0) return `${h} h ${String(m).padStart(2, '0')} min`;
  if (m > 0) return `${m} min ${String(sec).padStart(2, '0')} s`;
  return `${sec} s`;
}

/** Every unit down to seconds, for a countdown that visibly ticks: "9 d 23 h 59 min 58 s". */
export function countdown(ms) {
  const s = Math.max(0, Math.floor(Math.abs(ms) / 1000));
  const parts = [[Math.floor(s / 86400), 'd'], [Math.floor((s % 86400) / 3600), 'h'], [Math.floor((s % 3600) / 60), 'min'], [s % 60, 's']];
  const first = parts.findIndex(([n]) => n > 0);
  return parts.slice(first === -1 ? 3 : first).map(([n, u]) => `${n} ${u}`).join(' ');
}

/** An ISO time as the operator's local time plus "3 min ago" / "in 2 h". */
export function when(iso) {
  if (!iso) return 'never';
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return String(iso);
  const delta = t - Date.now();
  const local = new Date(t).toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
  if (Math.abs(delta) < 1000) return `${local} (now)`;
  return `${local} (${delta < 0 ? `${duration(delta)} ago` : `in ${duration(delta)}`})`;
}

/** A <time> element showing when(iso). */
export const timeEl = (iso) => (iso ? el('time', { datetime: iso }, when(iso)) : el('span', {}, 'never'));

/** Copy text; fall back to selecting it when the clipboard API is unavailable (plain http). */
export async function copyText(text, selectable) {
  try {
    await navigator.clipboard.writeText(text);
    announce('Copied to the clipboard.');
  } catch {
    const range = document.createRange();
    range.selectNodeContents(selectable);
    const sel = getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    announce(document.execCommand('copy') ? 'Copied to the clipboard.' : 'Selected: press Ctrl+C (or ⌘C) to copy.');
  }
}
