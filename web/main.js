// The operator page: sign in, then keep every panel current without reloading.
import { api, ApiError, isAdminOff, session } from './api.js';
import { $, announce, replaceKeepingFocus, when } from './dom.js';
import { wireActions } from './actions.js';
import { clientRow, clientsSummary, countdownText, credentialCard, credentialsFrom, eventRow } from './panels.js';

const REFRESH_MS = 5000;
const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.getAttribute('content') ?? '';

let timer;
let lastStatus;
const rendered = { credentials: '', clients: '', events: '' };

function showOnly(view) {
  $('admin-off').hidden = view !== 'admin-off';
  $('sign-in').hidden = view !== 'sign-in';
  $('console').hidden = view !== 'console';
  $('sign-out').hidden = view !== 'console';
}

function adminOff() {
  session.signOut();
  clearTimeout(timer);
  showOnly('admin-off');
}

function signInView(message) {
  clearTimeout(timer);
  showOnly('sign-in');
  const error = $('sign-in-error');
  error.textContent = message ?? '';
  error.hidden = !message;
  $('token').focus();
}

/** Fetch everything, render what changed. Resolves false when the token was refused. */
async function refresh() {
  clearTimeout(timer);
  try {
    const [status, clients, events] = await Promise.all([api('GET', '/status'), api('GET', '/admin/clients'), api('GET', '/admin/events', { query: { limit: '50' } })]);
    lastStatus = status;
    render(status, clients.clients, events.events);
    showOnly('console');
    $('updated').textContent = new Date().toLocaleTimeString();
    $('replica').textContent = status.replicaId ?? '?';
  } catch (err) {
    if (isAdminOff(err)) return (adminOff(), false);
    if (err instanceof ApiError && err.status === 401) {
      session.signOut();
      signInView('The broker refused that token (401): it is not this broker\'s ADMIN_TOKEN.');
      return false;
    }
    // Keep showing the last data; say it is old.
    announce(`Could not update: ${err.message}. Showing data from ${$('updated').textContent}.`, 'bad');
  }
  timer = setTimeout(refresh, REFRESH_MS);
  return true;
}

function render(status, clients, events) {
  const credsKey = JSON.stringify([status, clients.map((c) => [c.name, c.state, c.credential])]);
  if (credsKey !== rendered.credentials) {
    rendered.credentials = credsKey;
    replaceKeepingFocus($('credential-list'), ...credentialsFrom(status).map((c) => credentialCard(c, clients)));
  }
  const clientsKey = JSON.stringify(clients);
  if (clientsKey !== rendered.clients) {
    rendered.clients = clientsKey;
    $('clients-summary').textContent = clientsSummary(clients);
    $('clients-table').hidden = clients.length === 0;
    replaceKeepingFocus($('clients-body'), ...clients.map((c) => clientRow(c, actions.revokeClient)));
  }
  const eventsKey = JSON.stringify(events);
  if (eventsKey !== rendered.events) {
    rendered.events = eventsKey;
    $('events-body').replaceChildren(...events.map(eventRow));
  }
}

// Every second: the expiry countdowns and the relative times.
setInterval(() => {
  for (const n of document.querySelectorAll('.countdown')) n.textContent = countdownText(n.dataset.expiresAt);
  for (const n of document.querySelectorAll('time[datetime]')) n.textContent = when(n.getAttribute('datetime'));
}, 1000);

const actions = wireActions({ refresh, currentState: () => lastStatus?.state });

$('sign-in-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const input = $('token');
  const token = input.value.trim();
  if (!token) return signInView('Type the admin token first.');
  session.signIn(token);
  input.value = '';
  if (await refresh()) announce('Signed in.', 'good');
});

$('sign-out').addEventListener('click', () => {
  session.signOut();
  for (const k of Object.keys(rendered)) rendered[k] = '';
  for (const id of ['credential-list', 'clients-body', 'events-body']) $(id).replaceChildren();
  // The flows may hold a new client's token or a login code: drop them with the session.
  for (const id of ['login-flow', 'seed-result', 'new-client']) {
    $(id).hidden = true;
    $(id).replaceChildren();
  }
  signInView();
  announce('Signed out: the token is forgotten.');
});

$('version').textContent = meta('broker-version') || '?';
if (meta('admin-routes') === 'off') adminOff();
else if (session.token()) void refresh();
else signInView();
