// What the operator can do. Each action reports through the status line (and its own box),
// asks first when it destroys something, and refreshes the panels when it changed them.
import { api, ApiError } from './api.js';
import { $, announce, confirmAction, copyText, duration, el } from './dom.js';

// Named credentials arrive with a later broker version; today the one login is `default`.
const CREDENTIAL = 'default';
const LOGIN_POLL_MS = 2000;
const MAX_SEED_BYTES = 1024 * 1024;

const show = (box, ...nodes) => {
  box.replaceChildren(...nodes);
  box.hidden = nodes.length === 0;
};
const problemLine = (err) => el('p', { class: 'problem', role: 'alert' }, err instanceof ApiError ? `${err.detail}${err.code ? ` (${err.code})` : ''}` : String(err));
const dismiss = (box, onClick) => el('button', { type: 'button', class: 'quiet', onclick: () => (onClick?.(), show(box)) }, 'Dismiss');

export function wireActions({ refresh, currentState }) {
  let loginRun = 0;

  $('refresh-now').addEventListener('click', async (ev) => {
    const button = ev.currentTarget;
    button.disabled = true;
    announce('Refreshing…');
    try {
      const r = await api('POST', '/admin/refresh');
      const failed = r.outcome === 'permanent_failure' || r.outcome === 'transient_failure';
      announce(`Refresh: ${r.outcome}${r.status?.lastError?.message ? ` (${r.status.lastError.message})` : ''}.`, failed ? 'bad' : 'good');
    } catch (err) {
      announce(`Refresh failed: ${err.message}`, 'bad');
    } finally {
      button.disabled = false;
      await refresh();
    }
  });

  // ---- logging in -------------------------------------------------------------------

  const flow = $('login-flow');
  async function startLogin(method) {
    const run = ++loginRun;
    show(flow, el('p', {}, 'Starting the login…'));
    let started;
    try {
      started = await api('POST', `/admin/credentials/${CREDENTIAL}/login`, { json: { method } });
    } catch (err) {
      show(flow, problemLine(err), dismiss(flow));
      announce(`The login did not start: ${err.message}`, 'bad');
      return;
    }
    const progress = el('p', { class: 'progress', 'aria-live': 'polite' }, 'Waiting for you to sign in…');
    const stop = () => (loginRun += 1);
    if (method === 'device') {
      const code = el('p', { class: 'user-code', id: 'user-code' }, started.user_code);
      show(
        flow,
        el('h3', {}, 'Log in with a device code'),
        el('p', {}, '1. Open ', el('a', { href: started.verification_uri, target: '_blank', rel: 'noopener noreferrer' }, started.verification_uri), ' and sign in with the ChatGPT account the fleet uses.'),
        el('p', {}, '2. Enter this code there:'),
        code,
        el('button', { type: 'button', class: 'quiet', onclick: () => copyText(started.user_code, code) }, 'Copy the code'),
        progress,
        dismiss(flow, stop),
      );
      announce(`Device code ${started.user_code}: enter it at ${started.verification_uri}.`);
    } else {
      const input = el('input', { id: 'callback-url', type: 'text', inputmode: 'url', autocomplete: 'off', spellcheck: 'false', required: true });
      const form = el(
        'form',
        { class: 'inline-form', novalidate: true },
        el('div', { class: 'field wide' }, el('label', { for: 'callback-url' }, 'The address your browser landed on (http://localhost:1455/auth/callback?code=…)'), input),
        el('button', { type: 'submit' }, 'Finish the login'),
      );
      const result = el('div', {});
      form.addEventListener('submit', async (ev) => {
        ev.preventDefault();
        const url = input.value.trim();
        if (!url) return announce('Paste the address first.', 'bad');
        try {
          const login = await api('POST', `/admin/logins/${encodeURIComponent(started.id)}/callback`, { json: { callback_url: url } });
          finished(login);
        } catch (err) {
          result.replaceChildren(problemLine(err));
          announce(`The login was not completed: ${err.message}`, 'bad');
        }
      });
      show(
        flow,
        el('h3', {}, 'Log in in a browser'),
        el('p', {}, '1. Open ', el('a', { href: started.authorize_url, target: '_blank', rel: 'noopener noreferrer', id: 'authorize-link' }, 'the sign-in page'), ' and sign in with the ChatGPT account the fleet uses.'),
        el('p', {}, '2. Your browser then lands on a localhost address that does not load. Copy that whole address from the address bar and paste it here:'),
        form,
        result,
        progress,
        dismiss(flow, stop),
      );
      announce('Open the sign-in link, then paste the address your browser lands on.');
    }

    function finished(login) {
      if (run !== loginRun) return;
      loginRun += 1;
      if (login.state === 'succeeded') {
        show(flow, el('p', { class: 'success', role: 'status' }, `Logged in: account ${login.account_id ?? '?'}${login.plan_type ? ` (${login.plan_type})` : ''}. The login is stored and every replica now serves it.`), dismiss(flow));
        announce('Login succeeded.', 'good');
        void refresh();
      } else {
        show(flow, el('p', { class: 'problem', role: 'alert' }, `The login ${login.state}: ${login.error ?? 'no reason given'}`), dismiss(flow));
        announce(`The login ${login.state}.`, 'bad');
      }
    }

    // Either method may finish elsewhere (another tab, the CLI): poll until it ends.
    while (run === loginRun) {
      await new Promise((r) => setTimeout(r, LOGIN_POLL_MS));
      if (run !== loginRun) return;
      try {
        const login = await api('GET', `/admin/logins/${encodeURIComponent(started.id)}`);
        if (login.state !== 'pending') return finished(login);
        progress.textContent = `Waiting for you to sign in… (this login expires in ${duration(Date.parse(login.expires_at) - Date.now())})`;
      } catch (err) {
        progress.textContent = `Could not read the login's progress: ${err.message}. Retrying…`;
      }
    }
  }
  $('login-device').addEventListener('click', () => startLogin('device'));
  $('login-browser').addEventListener('click', () => startLogin('browser'));

  // ---- seeding from a file ----------------------------------------------------------

  const seedBox = $('seed-result');
  async function store(text, name, force) {
    try {
      const status = await api('PUT', '/admin/credential', { text, ...(force ? { query: { force: 'true' } } : {}) });
      show(seedBox, el('p', { class: 'success', role: 'status' }, `Stored ${name}${force ? ' (forced)' : ''}: the credential is now ${status.state}${status.accountId ? `, account ${status.accountId}` : ''}.`), dismiss(seedBox));
      announce(`Seeded from ${name}.`, 'good');
      $('seed-file').value = '';
      await refresh();
    } catch (err) {
      const nodes = [problemLine(err)];
      if (err instanceof ApiError && err.status === 409 && err.code === 'stale_seed') {
        nodes.push(
          el('button', {
            type: 'button',
            class: 'danger',
            onclick: async () => {
              if (await confirmAction(`Store ${name} anyway? ${err.detail}`, 'Store it anyway')) await store(text, name, true);
            },
          }, 'Store it anyway (force)…'),
        );
      }
      nodes.push(dismiss(seedBox));
      show(seedBox, ...nodes);
      announce(`Not stored: ${err.message}`, 'bad');
    }
  }
  $('seed-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const file = $('seed-file').files?.[0];
    if (!file) return announce('Choose an auth.json file first.', 'bad');
    if (file.size > MAX_SEED_BYTES) return show(seedBox, el('p', { class: 'problem', role: 'alert' }, `${file.name} is larger than 1 MB: not an auth.json.`));
    const text = await file.text();
    if (currentState() !== 'absent' && !(await confirmAction(`Replace the stored ${CREDENTIAL} login with ${file.name}? Workspaces get the new login from their next fetch.`, 'Replace the login'))) return;
    await store(text, file.name, false);
  });

  // ---- clients ----------------------------------------------------------------------

  const newClient = $('new-client');
  $('add-client-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const form = ev.currentTarget;
    const name = form.elements.name.value.trim();
    const workspaceId = form.elements.workspaceId.value.trim();
    try {
      const created = await api('POST', '/admin/clients', { json: { name, ...(workspaceId ? { workspaceId } : {}) } });
      form.reset();
      const origin = location.origin;
      const tokenBox = el('code', { class: 'secret', id: 'new-client-token' }, created.token);
      const lines = [`CODEX_AUTH_BROKER_URL=${origin}`, `CODEX_AUTH_BROKER_TOKEN=${created.token}`, `CODEX_REFRESH_TOKEN_URL_OVERRIDE=${origin}/oauth/token`].join('\n');
      const linesBox = el('pre', { class: 'secret', id: 'new-client-lines' }, lines);
      show(
        newClient,
        el('h3', {}, `Client ${created.name} added`),
        el('p', { class: 'warning' }, 'This token is shown once: copy it now. The broker keeps only its hash.'),
        el('p', {}, tokenBox, ' ', el('button', { type: 'button', onclick: () => copyText(created.token, tokenBox) }, 'Copy the token')),
        el('p', {}, 'For scripts/codex_auth_sync.sh in the workspace (and codex itself):'),
        linesBox,
        el('button', { type: 'button', onclick: () => copyText(lines, linesBox) }, 'Copy these lines'),
        ' ',
        dismiss(newClient),
      );
      announce(`Client ${created.name} added; copy its token now, it is shown once.`, 'good');
      await refresh();
    } catch (err) {
      show(newClient, problemLine(err), dismiss(newClient));
      announce(`Not added: ${err.message}`, 'bad');
    }
  });

  return {
    async revokeClient(name) {
      if (!(await confirmAction(`Revoke client ${name}? Its workspace stops getting the login at once; this cannot be undone (add it again for a new token).`, `Revoke ${name}`))) return;
      try {
        await api('DELETE', `/admin/clients/${encodeURIComponent(name)}`);
        announce(`Client ${name} revoked.`, 'good');
      } catch (err) {
        announce(`Not revoked: ${err.message}`, 'bad');
      }
      await refresh();
    },
  };
}
