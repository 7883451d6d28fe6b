// The three panels, rendered from what the admin API returned. Pure: data in, nodes out.
import { countdown, duration, el, timeEl, when } from './dom.js';

/** Each credential state in plain words, and what to do about it. */
export const STATES = {
  absent: {
    tone: 'bad',
    words: 'No login is stored. Every workspace gets 503 until there is one.',
    fix: 'Log in below (device code or browser), or seed an auth.json file from a machine where codex is logged in.',
  },
  invalid: {
    tone: 'bad',
    words: 'A login is stored but cannot be used: it cannot be decrypted or read, or it has no refresh token.',
    fix: 'Check that CODEX_AUTH_SECRET_KEY and SECRETS_ENCRYPTION_KEY are the ones it was stored with; otherwise log in again or seed a complete auth.json.',
  },
  fresh: {
    tone: 'good',
    words: 'Healthy: the access token is valid and not yet due for a refresh.',
    fix: 'Nothing to do.',
  },
  due: {
    tone: 'warn',
    words: 'The access token is inside the refresh margin: the broker refreshes it at its next check.',
    fix: 'Nothing to do while checks succeed. If it stays due, read the last error below and try Refresh now.',
  },
  expired: {
    tone: 'bad',
    words: 'The access token has expired and no refresh has replaced it: workspaces get 503.',
    fix: 'Try Refresh now; if the upstream refuses, log in again or seed a fresh auth.json.',
  },
  latched: {
    tone: 'bad',
    words: 'The upstream refused this refresh token for good (used elsewhere, or revoked). The broker stopped refreshing it so it does not make things worse; workspaces keep the current access token until it expires.',
    fix: 'Log in again (device code or browser) or seed a fresh auth.json: a new login clears the latch. Find who else refreshed this login (a laptop, another broker) so it does not happen again.',
  },
};

const CLIENT_STATES = {
  active: 'active: holds the current token',
  stale: 'stale: last fetched an older token',
  never_seen: 'never seen',
};

/** The credentials there are: `credentials` from the broker when it lists them, else the one /status describes. */
export function credentialsFrom(status) {
  if (Array.isArray(status?.credentials)) return status.credentials;
  return [{ name: 'default', ...status }];
}

/** Clients assigned to a credential: by their `credential` field once the broker has several, else all of them. */
function assigned(name, clients) {
  const named = clients.some((c) => typeof c.credential === 'string');
  return named ? clients.filter((c) => c.credential === name) : clients;
}

function countStates(clients) {
  const n = { active: 0, stale: 0, never_seen: 0 };
  for (const c of clients) n[c.state] = (n[c.state] ?? 0) + 1;
  return `${clients.length} (${n.active} active, ${n.stale} stale, ${n.never_seen} never seen)`;
}

/** Usage windows in whatever shape the broker sends: an array of windows, or an object keyed by window. */
function usageWindows(usage) {
  const list = Array.isArray(usage) ? usage : Array.isArray(usage?.windows) ? usage.windows : Object.entries(usage ?? {}).filter(([, w]) => w && typeof w === 'object').map(([window, w]) => ({ window, ...w }));
  return list
    .map((w) => {
      const reset = w.resetsAt ?? w.resetAt ?? w.reset_at;
      return {
        name: w.window ?? w.name ?? 'window',
        percent: Number(w.usedPercent ?? w.used_percent),
        resetsAt: typeof reset === 'number' ? new Date(reset * 1000).toISOString() : reset,
      };
    })
    .filter((w) => Number.isFinite(w.percent));
}

function usageBlock(usage) {
  const windows = usageWindows(usage);
  if (windows.length === 0) return el('p', { class: 'muted' }, 'usage: not polled');
  return el(
    'div',
    { class: 'usage' },
    windows.map((w, i) => {
      const id = `usage-${w.name}-${i}`.replace(/[^\w-]/g, '_');
      return el(
        'div',
        { class: 'usage-row' },
        el('label', { for: id }, `${w.name}: ${Math.round(w.percent)} % used`),
        el('meter', { id, min: 0, max: 100, low: 70, high: 90, optimum: 0, value: Math.min(100, Math.max(0, w.percent)) }, `${w.percent} %`),
        el('span', { class: 'muted' }, w.resetsAt ? `resets ${when(w.resetsAt)}` : ''),
      );
    }),
    usage?.stale ? el('p', { class: 'muted' }, `stale: the last poll failed${usage.ageSeconds ? `, ${duration(usage.ageSeconds * 1000)} ago` : ''}`) : null,
  );
}

function fact(term, ...value) {
  return [el('dt', {}, term), el('dd', {}, ...value)];
}

export function credentialCard(c, clients) {
  const info = STATES[c.state] ?? { tone: 'warn', words: `State ${c.state}.`, fix: 'See /status and the logs.' };
  const mine = assigned(c.name, clients);
  const error = c.lastError;
  return el(
    'article',
    { class: `card tone-${info.tone}`, 'aria-labelledby': `cred-${c.name}` },
    el('h3', { id: `cred-${c.name}` }, c.name, ' ', el('span', { class: `badge tone-${info.tone}`, dataset: { state: c.state } }, c.state)),
    el('p', { class: 'words' }, info.words),
    el('p', { class: 'fix' }, el('strong', {}, 'What to do: '), info.fix),
    error ? el('p', { class: 'problem' }, el('strong', {}, 'Last error: '), `${error.code ?? ''}${error.upstreamCode ? ` (${error.upstreamCode})` : ''}: ${error.message ?? ''}`) : null,
    el(
      'dl',
      { class: 'facts' },
      fact('Account', c.accountId ?? '–'),
      fact('Plan', c.planType ?? '–'),
      fact(
        'Access token expires',
        c.accessTokenExpiresAt ? el('span', { class: 'countdown', dataset: { expiresAt: c.accessTokenExpiresAt } }, countdownText(c.accessTokenExpiresAt)) : '–',
      ),
      fact('Last rotation', timeEl(c.lastRotationAt)),
      fact('Next check', c.nextCheckAt ? timeEl(c.nextCheckAt) : 'not scheduled on this replica'),
      c.consecutiveFailures ? fact('Failures in a row', String(c.consecutiveFailures)) : [],
      fact('Clients assigned', countStates(mine)),
    ),
    usageBlock(c.usage),
  );
}

/** "in 9 d 23 h 59 min 58 s" or "expired 3 min 2 s ago": ticks every second. */
export function countdownText(iso) {
  const left = Date.parse(iso) - Date.now();
  return left > 0 ? `in ${countdown(left)}` : `expired ${countdown(left)} ago`;
}

export function clientRow(c, onRevoke) {
  return el(
    'tr',
    { dataset: { client: c.name } },
    el('td', { dataset: { label: 'Name' } }, c.name),
    el('td', { dataset: { label: 'Workspace' } }, c.workspaceId ?? '–'),
    el('td', { dataset: { label: 'State' } }, el('span', { class: `badge client-${c.state}` }, CLIENT_STATES[c.state] ?? c.state)),
    el('td', { dataset: { label: 'Last seen' } }, timeEl(c.lastUsedAt)),
    el('td', { dataset: { label: '' } }, el('button', { type: 'button', class: 'danger small', dataset: { focusKey: `revoke:${c.name}` }, 'aria-label': `Revoke client ${c.name}`, onclick: () => onRevoke(c.name) }, 'Revoke')),
  );
}

export function clientsSummary(clients) {
  return clients.length === 0 ? 'No clients yet: add one so a workspace can fetch the login.' : `Clients: ${countStates(clients)}.`;
}

export function eventRow(e) {
  const outcome = e.outcome ?? (e.finishedAt ? '–' : 'in progress');
  // The upstream's word matters when it refused; a 200 says nothing the outcome does not.
  const upstream = e.upstreamCode ?? (e.upstreamStatus && e.upstreamStatus >= 300 ? `HTTP ${e.upstreamStatus}` : '');
  return el(
    'tr',
    {},
    el('td', { dataset: { label: 'Time' } }, timeEl(e.startedAt)),
    el('td', { dataset: { label: 'Kind' } }, e.kind ?? 'refresh', e.source ? ` (${e.source})` : ''),
    el('td', { dataset: { label: 'Reason' } }, e.reason),
    el('td', { dataset: { label: 'Outcome' } }, outcome, upstream ? ` (${upstream})` : ''),
    el('td', { dataset: { label: 'Replica' } }, e.replicaId),
  );
}
