/**
 * The operator page (`GET /`) in a real headless Chromium (Debian's `chromium`, driven by
 * playwright-core) against a listening broker, the fake upstream and the fake issuer.
 * Without Chromium the browser tests fail under CI (.ci/run installs it) and are skipped,
 * loudly, elsewhere. `UPDATE_SCREENSHOT=1` also writes docs/operator-page.png.
 */
import { strict as assert } from 'node:assert';
import { createHash, randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, test, type TestContext } from 'node:test';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import { fingerprint, PAGE_CSP } from '../src/routes/page.js';
import { ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import { FakeIssuer } from './helpers/fake-issuer.js';
import type { FakeUpstream } from './helpers/fake-upstream.js';
import { useSuite } from './helpers/suite.js';
import { tempDirs } from './helpers/tmp.js';
import { waitFor } from './helpers/wait.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const CHROMIUM = ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((f) => fs.existsSync(f));
const ARGS = ['--no-sandbox', '--headless', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'];
const WAIT = { timeout: 20_000 };
const DAY = 86_400;
const nowSec = () => Math.floor(Date.now() / 1000);

const suite = useSuite();
const issuers: FakeIssuer[] = [];
let browser: BrowserContext | undefined;

// Registered before tempDirs' own after hook, so it runs first: the browser closes (and
// stops writing to its profile) before its user-data-dir is removed. The other way round,
// Chromium wrote "Local State" into the removed directory as it closed and left it in /tmp.
after(async () => {
  await browser?.close();
  for (const f of issuers) await f.close();
});
const tmp = tempDirs('operator-page-');

before(async () => {
  // A persistent context is how playwright takes a user-data-dir: a new temp one.
  if (CHROMIUM) browser = await chromium.launchPersistentContext(tmp(), { executablePath: CHROMIUM, args: ARGS, viewport: { width: 1280, height: 900 }, timeout: 60_000 });
});

/** The browser, or: under CI a failure, elsewhere a loud skip. */
function need(t: TestContext): BrowserContext | undefined {
  if (browser) return browser;
  const msg = 'chromium not installed: apt-get install chromium';
  if (process.env['CI']) assert.fail(`${msg} (.ci/run installs it; CI must run these tests, not skip them)`);
  console.error(`\n*** SKIPPED: ${msg} ***\n`);
  t.skip(msg);
  return undefined;
}

interface Broker {
  t: TestApp;
  upstream: FakeUpstream;
  url: string;
  admin(method: 'GET' | 'POST' | 'PUT' | 'DELETE', url: string, payload?: unknown): Promise<{ statusCode: number; json: () => unknown; body: string }>;
}

async function broker(o: { adminToken?: string | undefined; start?: boolean; issuer?: FakeIssuer } = {}): Promise<Broker> {
  const upstream = await suite.upstream();
  const t = await suite.app({
    databaseUrl: await suite.pg.newDatabase(),
    upstreamUrl: upstream.url,
    ...('adminToken' in o ? { adminToken: o.adminToken } : {}),
    start: o.start ?? true,
    ...(o.issuer ? { config: { OAUTH_ISSUER: o.issuer.url } } : {}),
    login: { pollIntervalMs: 50, sweepMs: 0 },
    clientFlushMs: 50,
  });
  const url = await t.app.listen({ port: 0, host: '127.0.0.1' });
  return {
    t,
    upstream,
    url,
    admin: (method, u, payload) =>
      t.app.inject({ method, url: u, headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, ...(payload !== undefined ? { payload: payload as object } : {}) }),
  };
}

/** A broker holding a login (seeded over the admin API). */
async function seeded(o: Parameters<typeof broker>[0] & { seed?: Parameters<FakeUpstream['seed']>[0] } = {}): Promise<Broker & { doc: Record<string, unknown> }> {
  const b = await broker(o);
  const doc = b.upstream.seed({ accountId: 'acct-operator', planType: 'team', ...o.seed });
  const res = await b.admin('PUT', '/admin/credential', doc);
  assert.equal(res.statusCode, 200, res.body);
  return { ...b, doc };
}

interface Watched {
  page: Page;
  /** CSP violations, uncaught errors and console errors, but the 4xx answers the test expects. */
  problems(expectedStatuses?: number[]): string[];
}

/** A new tab (fresh sessionStorage) that records every CSP violation, page error and console message. */
async function openPage(ctx: BrowserContext, url: string): Promise<Watched> {
  const page = await ctx.newPage();
  const violations: string[] = [];
  const errors: string[] = [];
  const consoleLines: string[] = [];
  await page.exposeFunction('reportCspViolation', (v: string) => violations.push(v));
  await page.addInitScript({
    content: `document.addEventListener('securitypolicyviolation', (e) => window.reportCspViolation(e.violatedDirective + ' ' + e.blockedURI));`,
  });
  page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') consoleLines.push(m.text());
  });
  await page.goto(url);
  return {
    page,
    problems(expected = []) {
      const unexpected = consoleLines.filter((l) => {
        const m = /Failed to load resource: the server responded with a status of (\d+)/.exec(l);
        return !(m && expected.includes(Number(m[1])));
      });
      return [...violations.map((v) => `CSP violation: ${v}`), ...errors, ...unexpected];
    },
  };
}

async function signIn(page: Page, token = ADMIN_TOKEN): Promise<void> {
  await page.getByLabel('Admin token').fill(token);
  await page.getByRole('button', { name: 'Sign in' }).click();
}

async function signedIn(ctx: BrowserContext, b: Broker): Promise<Watched> {
  const w = await openPage(ctx, b.url);
  await signIn(w.page);
  await w.page.locator('#console').waitFor(WAIT);
  return w;
}

const badge = (page: Page, state: string) => page.locator(`#credential-list .badge[data-state="${state}"]`);
const clientRow = (page: Page, name: string) => page.locator(`#clients-body tr[data-client="${name}"]`);

async function assertNoCookies(ctx: BrowserContext, page: Page): Promise<void> {
  assert.deepEqual(await ctx.cookies(), []);
  assert.equal(await page.evaluate('document.cookie'), '');
}

async function clientToken(b: Broker, name: string): Promise<string> {
  const res = await b.admin('POST', '/admin/clients', { name });
  assert.equal(res.statusCode, 201, res.body);
  return (res.json() as { token: string }).token;
}

const fetchAuth = (b: Broker, token: string) => b.t.app.inject({ method: 'GET', url: '/codex-auth', headers: { authorization: `Bearer ${token}` } });

// ---- served without a browser ----------------------------------------------------------

test('GET / and its fingerprinted assets carry the strict CSP; only the assets are cached for good; /metrics and /healthz are untouched', async () => {
  const b = await broker();
  const page = await fetch(`${b.url}/`);
  const html = await page.text();
  assert.equal(page.status, 200);
  assert.match(page.headers.get('content-type') ?? '', /^text\/html/);
  assert.equal(page.headers.get('content-security-policy'), PAGE_CSP);
  for (const d of ["default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:", "connect-src 'self'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'"]) assert.ok(PAGE_CSP.includes(d), d);
  assert.equal(page.headers.get('x-content-type-options'), 'nosniff');
  assert.equal(page.headers.get('referrer-policy'), 'no-referrer');
  assert.equal(page.headers.get('cache-control'), 'no-cache');
  assert.equal(page.headers.get('set-cookie'), null);
  const version = (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
  assert.ok(html.includes(`<meta name="broker-version" content="${version}">`));
  assert.ok(html.includes('<meta name="admin-routes" content="on">'));
  assert.doesNotMatch(html, /<script(?![^>]*\bsrc=)[^>]*>|<style|\sstyle=|\son[a-z]+=|\{\{/i, 'no inline script, style or handler, no unfilled placeholder');
  assert.doesNotMatch(html, /https?:\/\//, 'nothing from another origin');
  const revalidated = await fetch(`${b.url}/`, { headers: { 'if-none-match': page.headers.get('etag') ?? '' } });
  assert.equal(revalidated.status, 304);

  // Every asset the page names, and every module those import, is fingerprinted by its content.
  const queue = [...html.matchAll(/(?:src|href)="(\/assets\/[^"]+)"/g)].map((m) => m[1]!);
  const seen = new Set<string>();
  while (queue.length) {
    const url = queue.shift()!;
    if (seen.has(url)) continue;
    seen.add(url);
    const res = await fetch(`${b.url}${url}`);
    const body = Buffer.from(await res.arrayBuffer());
    assert.equal(res.status, 200, url);
    const hash = /\.([0-9a-f]{16})\.[a-z]+$/.exec(url)?.[1];
    assert.equal(hash, createHash('sha256').update(body).digest('hex').slice(0, 16), `${url} is named by its content`);
    assert.equal(res.headers.get('cache-control'), 'public, max-age=31536000, immutable', url);
    assert.equal(res.headers.get('content-security-policy'), PAGE_CSP, url);
    assert.equal(res.headers.get('x-content-type-options'), 'nosniff', url);
    assert.equal(res.headers.get('set-cookie'), null);
    if (url.endsWith('.js')) for (const m of body.toString().matchAll(/from '\.\/([^']+)'/g)) queue.push(`/assets/${m[1]!}`);
  }
  assert.ok([...seen].some((u) => /\/main\.[0-9a-f]{16}\.js$/.test(u)) && [...seen].some((u) => u.endsWith('.css')) && seen.size >= 6, [...seen].join(' '));
  assert.doesNotMatch([...seen].join(' '), /\/assets\/(?![\w-]+\.[0-9a-f]{16}\.)/, 'no unfingerprinted module import');

  const missing = await fetch(`${b.url}/assets/main.0000000000000000.js`);
  assert.equal(missing.status, 404);
  assert.match(missing.headers.get('content-type') ?? '', /problem\+json/);
  assert.notEqual(missing.headers.get('cache-control'), 'public, max-age=31536000, immutable');
  for (const other of ['/metrics', '/healthz', '/openapi.yaml']) {
    const res = await fetch(`${b.url}${other}`);
    await res.arrayBuffer();
    assert.equal(res.headers.get('content-security-policy'), null, other);
    assert.equal(res.headers.get('cache-control'), null, other);
  }
});

test('a changed module changes the fingerprint of every module that imports it', () => {
  const files = (dep: string) =>
    new Map([
      ['main.js', Buffer.from("import { x } from './dep.js';\n")],
      ['dep.js', Buffer.from(dep)],
      ['page.css', Buffer.from('p{}')],
    ]);
  const a = fingerprint(files('export const x = 1;'));
  const b = fingerprint(files('export const x = 2;'));
  assert.notEqual(a.urls.get('main.js'), b.urls.get('main.js'));
  assert.equal(a.urls.get('page.css'), b.urls.get('page.css'));
  const served = a.assets.get(a.urls.get('main.js')!.slice('/assets/'.length))!.body.toString();
  assert.equal(served, `import { x } from './${a.urls.get('dep.js')!.slice('/assets/'.length)}';\n`);
  assert.throws(() => fingerprint(new Map([['a.js', Buffer.from("import './b.js'; export * from './missing.js';")]])), /missing\.js is imported but does not exist/);
});

// ---- in the browser --------------------------------------------------------------------

test('with ADMIN_TOKEN unset, the page says the admin routes are off and how to turn them on', async (t) => {
  const ctx = need(t);
  if (!ctx) return;
  const b = await broker({ adminToken: undefined });
  const w = await openPage(ctx, b.url);
  await w.page.locator('#admin-off').waitFor(WAIT);
  assert.match((await w.page.locator('#admin-off').textContent()) ?? '', /set ADMIN_TOKEN to a secret of at least 16 characters[\s\S]*restart the broker/);
  assert.equal(await w.page.locator('#sign-in').isVisible(), false);
  assert.equal(await w.page.locator('#console').isVisible(), false);
  assert.deepEqual(w.problems(), []);
  // The watcher has teeth: an inline style attribute is refused by the CSP, and reported.
  await w.page.evaluate(`document.body.insertAdjacentHTML('beforeend', '<p style="color: red">inline</p>')`);
  await waitFor('the CSP violation to be reported', () => w.problems().some((p) => /CSP violation: style-src/.test(p)), WAIT.timeout);
  await w.page.close();
});

test('sign-in: before it only the box shows; a wrong token is refused by name (401); the right one, typed with the keyboard, shows the page; the token stays in sessionStorage, never a cookie or the URL', async (t) => {
  const ctx = need(t);
  if (!ctx) return;
  const b = await seeded();
  const w = await openPage(ctx, b.url);
  const { page } = w;
  await page.locator('#sign-in').waitFor(WAIT);
  assert.equal(await page.locator('#console').isVisible(), false);
  assert.equal(await page.locator('#admin-off').isVisible(), false);

  await signIn(page, 'not-the-admin-token-0123456789');
  await page.locator('#sign-in-error', { hasText: 'refused that token (401)' }).waitFor(WAIT);
  assert.equal(await page.locator('#console').isVisible(), false);
  assert.equal(await page.evaluate('sessionStorage.length'), 0, 'a refused token is forgotten');

  // Keyboard only: the focused field, typing, Enter.
  assert.equal(await page.evaluate('document.activeElement.id'), 'token');
  await page.keyboard.type(ADMIN_TOKEN);
  await page.keyboard.press('Enter');
  await page.locator('#console').waitFor(WAIT);
  await badge(page, 'fresh').waitFor(WAIT);
  assert.equal(await page.locator('#sign-in').isVisible(), false);
  assert.equal(await page.evaluate(`sessionStorage.getItem('codex-auth-broker.admin-token')`), ADMIN_TOKEN);
  assert.equal(await page.evaluate('localStorage.length'), 0);
  assert.ok(!page.url().includes(ADMIN_TOKEN));
  await assertNoCookies(ctx, page);
  assert.equal(await page.locator('#version').textContent(), (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version);
  assert.equal(await page.locator('#replica').textContent(), b.t.core.refresher.replicaId);

  // A reload keeps the session (same tab); signing out forgets it.
  await page.reload();
  await badge(page, 'fresh').waitFor(WAIT);
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.locator('#sign-in').waitFor(WAIT);
  assert.equal(await page.evaluate('sessionStorage.length'), 0);
  assert.equal(await page.locator('#credential-list').textContent(), '');
  assert.deepEqual(w.problems([401]), []);
  await page.close();
});

test('a fresh credential, its active, stale and never-seen clients and the refresh events are shown, and kept current without a reload', async (t) => {
  const ctx = need(t);
  if (!ctx) return;
  const b = await seeded();
  const tokens = { stale: await clientToken(b, 'ws-stale'), active: await clientToken(b, 'ws-active'), never: await clientToken(b, 'ws-never') };
  assert.equal((await fetchAuth(b, tokens.stale)).statusCode, 200);
  assert.equal((await b.admin('POST', '/admin/refresh')).statusCode, 200);
  assert.equal((await fetchAuth(b, tokens.active)).statusCode, 200);
  const w = await signedIn(ctx, b);
  const { page } = w;

  const card = page.locator('#credential-list article');
  await badge(page, 'fresh').waitFor(WAIT);
  const text = (await card.textContent()) ?? '';
  assert.match(text, /Healthy: the access token is valid/);
  assert.match(text, /What to do: Nothing to do\./);
  assert.match(text, /Accountacct-operator/);
  assert.match(text, /Planteam/);
  assert.match(text, /Last rotation.*\((now|.* ago)\)/);
  assert.match(text, /Next check.*in /);
  assert.match(text, /usage: not polled/);
  assert.match(text, /Clients assigned3 \(1 active, 1 stale, 1 never seen\)/);
  // The countdown ticks by itself.
  const countdown = page.locator('.countdown');
  const first = await countdown.textContent();
  assert.match(first ?? '', /^in (9 d 23 h \d+ min \d+ s|10 d 0 h 0 min 0 s)$/);
  // (Polled from here: the page's CSP refuses playwright's string predicates, as it should.)
  await waitFor('the countdown to tick', async () => (await countdown.textContent()) !== first, WAIT.timeout);

  assert.match((await clientRow(page, 'ws-active').textContent()) ?? '', /active: holds the current token/);
  assert.match((await clientRow(page, 'ws-stale').textContent()) ?? '', /stale: last fetched an older token/);
  assert.match((await clientRow(page, 'ws-never').textContent()) ?? '', /never seen.*never/);

  const events = page.locator('#events-body tr');
  await events.first().waitFor(WAIT);
  const rows = await events.allTextContents();
  assert.ok(rows.some((r) => /refresh.*admin.*rotated.*test-/.test(r)), rows.join('\n'));
  assert.ok(rows.some((r) => /seed \(admin_api\).*stored/.test(r)), rows.join('\n'));

  // The next poll shows a client that has just fetched, in place.
  await page.evaluate('window.notReloaded = true');
  assert.equal((await fetchAuth(b, tokens.never)).statusCode, 200);
  await clientRow(page, 'ws-never').locator('.badge.client-active').waitFor(WAIT);
  assert.equal(await page.evaluate('window.notReloaded'), true, 'updated without a reload');
  assert.deepEqual(w.problems(), []);
  await assertNoCookies(ctx, page);
  await page.close();
});

test('Refresh now against an upstream that says refresh_token_reused: the page reports it, explains the latched state and its fix', async (t) => {
  const ctx = need(t);
  if (!ctx) return;
  const b = await seeded();
  const w = await signedIn(ctx, b);
  const { page } = w;
  await badge(page, 'fresh').waitFor(WAIT);
  b.upstream.fault({ kind: 'status', status: 401, body: { error: { message: 'reused', type: 'invalid_request_error', code: 'refresh_token_reused' } } });
  await page.getByRole('button', { name: 'Refresh now' }).click();
  await page.locator('#announce', { hasText: 'Refresh: permanent_failure' }).waitFor(WAIT);
  await badge(page, 'latched').waitFor(WAIT);
  const text = (await page.locator('#credential-list article').textContent()) ?? '';
  assert.match(text, /The upstream refused this refresh token for good/);
  assert.match(text, /What to do: Log in again \(device code or browser\) or seed a fresh auth\.json: a new login clears the latch/);
  assert.match(text, /Last error: .*refresh_token_reused/);
  await page.locator('#events-body tr', { hasText: 'permanent_failure (refresh_token_reused)' }).waitFor(WAIT);
  assert.deepEqual(w.problems(), []);
  await page.close();
});

test('seed from a file: an absent credential is explained, a due login is stored, a bad file and a stale copy are refused with the broker\'s detail, and force is offered only after the refusal, behind a confirmation', async (t) => {
  const ctx = need(t);
  if (!ctx) return;
  // No refresh loop: a due login stays due for the assertions.
  const b = await broker({ start: false });
  const w = await signedIn(ctx, b);
  const { page } = w;
  await badge(page, 'absent').waitFor(WAIT);
  assert.match((await page.locator('#credential-list article').textContent()) ?? '', /No login is stored[\s\S]*Log in below/);

  const file = (name: string, doc: unknown) => ({ name, mimeType: 'application/json', buffer: Buffer.from(typeof doc === 'string' ? doc : JSON.stringify(doc)) });
  const due = b.upstream.seed({ accountId: 'acct-due', planType: 'plus', iatSec: nowSec() - 10 * DAY + 3_600, expSec: nowSec() + 3_600 });
  await page.getByLabel('Seed from an auth.json file').setInputFiles(file('auth.json', due));
  await page.getByRole('button', { name: 'Store this login' }).click();
  await page.locator('#seed-result .success', { hasText: 'Stored auth.json: the credential is now due, account acct-due' }).waitFor(WAIT);
  await badge(page, 'due').waitFor(WAIT);
  assert.match((await page.locator('#credential-list article').textContent()) ?? '', /inside the refresh margin[\s\S]*in (59|60) min/);

  // Replacing a stored login asks first; a file that is not a login is refused with the broker's words.
  await page.getByLabel('Seed from an auth.json file').setInputFiles(file('notes.json', '{"tokens": 3}'));
  await page.getByRole('button', { name: 'Store this login' }).click();
  await page.locator('#confirm[open]').waitFor(WAIT);
  await page.getByRole('button', { name: 'Replace the login' }).click();
  await page.locator('#seed-result .problem', { hasText: '(invalid_credential)' }).waitFor(WAIT);
  assert.equal(await page.locator('#seed-result').getByRole('button', { name: /force/ }).count(), 0, 'no force for a bad file');

  // An older copy of the same account: 409, its detail, then force behind a confirmation.
  const older = b.upstream.seed({ accountId: 'acct-due', planType: 'plus', iatSec: nowSec() - 11 * DAY, expSec: nowSec() + 1_800 });
  await page.getByLabel('Seed from an auth.json file').setInputFiles(file('old-auth.json', older));
  await page.getByRole('button', { name: 'Store this login' }).click();
  await page.getByRole('button', { name: 'Replace the login' }).click();
  await page.locator('#seed-result .problem', { hasText: 'it is older than the stored login of the same account acct-due' }).waitFor(WAIT);
  await page.getByRole('button', { name: 'Store it anyway (force)…' }).click();
  await page.locator('#confirm[open]').waitFor(WAIT);
  await page.getByRole('button', { name: 'Cancel' }).click();
  assert.equal(await page.locator('#seed-result .success').count(), 0, 'cancelled: nothing stored');
  await page.getByRole('button', { name: 'Store it anyway (force)…' }).click();
  await page.getByRole('button', { name: 'Store it anyway', exact: true }).click();
  await page.locator('#seed-result .success', { hasText: 'Stored old-auth.json (forced)' }).waitFor(WAIT);
  await page.locator('#events-body tr', { hasText: 'stored_forced' }).waitFor(WAIT);
  assert.deepEqual(w.problems([400, 409]), []);
  await page.close();
});

test('device login: the code is shown large with its link, approved in the fake issuer, and the page reports success and the fresh login', async (t) => {
  const ctx = need(t);
  if (!ctx) return;
  const issuer = await FakeIssuer.start();
  issuers.push(issuer);
  const b = await broker({ issuer });
  const w = await signedIn(ctx, b);
  const { page } = w;
  await badge(page, 'absent').waitFor(WAIT);
  await page.getByRole('button', { name: 'Log in with a device code' }).click();
  const code = page.locator('#user-code');
  await code.waitFor(WAIT);
  assert.equal(await code.textContent(), issuer.userCodes()[0]);
  assert.equal(await page.getByRole('link', { name: `${issuer.url}/codex/device` }).getAttribute('href'), `${issuer.url}/codex/device`);
  assert.ok(Number.parseFloat((await page.evaluate(`getComputedStyle(document.getElementById('user-code')).fontSize`)) as string) >= 28, 'the code is large');
  await page.locator('#login-flow .progress', { hasText: 'this login expires in' }).waitFor(WAIT);
  issuer.approveDevice();
  await page.locator('#login-flow .success', { hasText: 'Logged in: account acct-login-0001 (pro)' }).waitFor(WAIT);
  await badge(page, 'fresh').waitFor(WAIT);
  await page.locator('#events-body tr', { hasText: 'login' }).first().waitFor(WAIT);
  assert.deepEqual(w.problems(), []);
  await page.close();
});

test('browser login: the sign-in link and the pasted address the browser landed on complete a login', async (t) => {
  const ctx = need(t);
  if (!ctx) return;
  const issuer = await FakeIssuer.start({ accountId: 'acct-browser', planType: 'team' });
  issuers.push(issuer);
  const b = await broker({ issuer });
  const w = await signedIn(ctx, b);
  const { page } = w;
  await page.getByRole('button', { name: 'Log in in a browser' }).click();
  const link = page.locator('#authorize-link');
  await link.waitFor(WAIT);
  const authorize = (await link.getAttribute('href')) ?? '';
  assert.ok(authorize.startsWith(`${issuer.url}/oauth/authorize?`), authorize);
  assert.equal(await link.getAttribute('rel'), 'noopener noreferrer');
  // The operator's own browser: sign in at the issuer, land on localhost, copy the address.
  const landed = await fetch(authorize, { redirect: 'manual' });
  const callback = landed.headers.get('location') ?? '';
  assert.match(callback, /^http:\/\/localhost:1455\/auth\/callback\?code=/);
  await page.getByLabel(/The address your browser landed on/).fill(callback);
  await page.getByRole('button', { name: 'Finish the login' }).click();
  await page.locator('#login-flow .success', { hasText: 'Logged in: account acct-browser (team)' }).waitFor(WAIT);
  await badge(page, 'fresh').waitFor(WAIT);
  assert.deepEqual(w.problems(), []);
  await page.close();
});

test('add a client: its token is shown once with the sync-script lines; revoking asks first, Escape keeps it, confirming revokes it', async (t) => {
  const ctx = need(t);
  if (!ctx) return;
  const b = await seeded();
  const w = await signedIn(ctx, b);
  const { page } = w;
  await page.getByLabel('Name').fill('ws-new');
  const workspaceId = randomUUID();
  await page.getByLabel('Workspace id (a UUID, optional)').fill(workspaceId);
  await page.getByRole('button', { name: 'Add client' }).click();
  const tokenBox = page.locator('#new-client-token');
  await tokenBox.waitFor(WAIT).catch(async (err: Error) => assert.fail(`${err.message}\n${await page.locator('#main').innerText()}\n${w.problems().join('\n')}`));
  const token = (await tokenBox.textContent()) ?? '';
  assert.match(token, /^[A-Za-z0-9_-]{40,}$/);
  const origin = b.url;
  assert.equal(await page.locator('#new-client-lines').textContent(), `CODEX_AUTH_BROKER_URL=${origin}\nCODEX_AUTH_BROKER_TOKEN=${token}\nCODEX_REFRESH_TOKEN_URL_OVERRIDE=${origin}/oauth/token`);
  assert.equal(await page.getByRole('button', { name: 'Copy the token' }).count(), 1);
  await clientRow(page, 'ws-new').waitFor(WAIT);
  // Read the row before the token is used: the page polls, and a used token's row says "active".
  assert.match((await clientRow(page, 'ws-new').textContent()) ?? '', new RegExp(`${workspaceId}.*never seen`));
  assert.equal((await fetchAuth(b, token)).statusCode, 200, 'the shown token works');
  assert.ok(!page.url().includes(token));
  assert.equal(await page.evaluate(`JSON.stringify(sessionStorage).includes(${JSON.stringify(token)}) || JSON.stringify(localStorage).includes(${JSON.stringify(token)})`), false);
  // Once: dismissed, it is gone from the page; the list never shows it.
  await page.locator('#new-client').getByRole('button', { name: 'Dismiss' }).click();
  assert.equal((await page.content()).includes(token), false);

  // Keyboard: the Revoke button, Enter, the dialog opens on Cancel; Escape keeps the client.
  await page.getByRole('button', { name: 'Revoke client ws-new' }).focus();
  await page.keyboard.press('Enter');
  await page.locator('#confirm[open]').waitFor(WAIT);
  assert.equal(await page.evaluate('document.activeElement.id'), 'confirm-cancel');
  await page.keyboard.press('Escape');
  await page.locator('#confirm:not([open])').waitFor({ state: 'attached', ...WAIT });
  assert.equal((await fetchAuth(b, token)).statusCode, 200, 'not revoked');
  await page.getByRole('button', { name: 'Revoke client ws-new' }).click();
  await page.getByRole('button', { name: 'Revoke ws-new' }).click();
  await page.locator('#announce', { hasText: 'Client ws-new revoked.' }).waitFor(WAIT);
  await clientRow(page, 'ws-new').waitFor({ state: 'detached', ...WAIT });
  assert.equal((await fetchAuth(b, token)).statusCode, 401, 'revoked');
  assert.deepEqual(w.problems(), []);
  await assertNoCookies(ctx, page);
  await page.close();
});

test('at 375 px wide, at 200 % zoom and in dark mode the page fits without horizontal scrolling; screenshots are written', async (t) => {
  const ctx = need(t);
  if (!ctx) return;
  const b = await seeded();
  for (const name of ['ws-berlin', 'ws-lisbon']) await clientToken(b, name);
  const [stale, active] = [await clientToken(b, 'ws-nairobi'), await clientToken(b, 'ws-osaka')];
  assert.equal((await fetchAuth(b, stale)).statusCode, 200);
  assert.equal((await b.admin('POST', '/admin/refresh')).statusCode, 200);
  assert.equal((await fetchAuth(b, active)).statusCode, 200);
  const w = await signedIn(ctx, b);
  const { page } = w;
  await clientRow(page, 'ws-nairobi').waitFor(WAIT);
  await page.locator('#events-body tr').first().waitFor(WAIT);
  const dir = tmp();

  // The README's picture: desktop width, light mode.
  await page.emulateMedia({ colorScheme: 'light' });
  await page.screenshot({ path: path.join(dir, 'desktop-light.png'), fullPage: true });
  if (process.env['UPDATE_SCREENSHOT'] === '1') fs.copyFileSync(path.join(dir, 'desktop-light.png'), path.join(ROOT, 'docs', 'operator-page.png'));

  const overflow = () => page.evaluate('document.documentElement.scrollWidth - document.documentElement.clientWidth') as Promise<number>;
  // 200 % zoom of a 1280 px window is a 640 px layout viewport.
  await page.setViewportSize({ width: 640, height: 900 });
  assert.equal(await overflow(), 0, 'no horizontal scroll at 200 % zoom');

  await page.setViewportSize({ width: 375, height: 812 });
  await page.emulateMedia({ colorScheme: 'dark' });
  assert.equal(await overflow(), 0, 'no horizontal scroll at 375 px');
  // Dark mode: a dark background and light text.
  const [bg, fg] = (await page.evaluate('[getComputedStyle(document.body).backgroundColor, getComputedStyle(document.body).color]')) as [string, string];
  const luminance = (rgb: string) => (rgb.match(/\d+/g) ?? []).slice(0, 3).reduce((s, v) => s + Number(v), 0) / 3;
  assert.ok(luminance(bg) < 60 && luminance(fg) > 180, `dark: ${bg} on ${fg}`);
  await page.screenshot({ path: path.join(dir, 'phone-dark.png'), fullPage: true });
  assert.ok(fs.statSync(path.join(dir, 'phone-dark.png')).size > 10_000);
  assert.ok(fs.statSync(path.join(dir, 'desktop-light.png')).size > 10_000);
  t.diagnostic(`screenshots in ${dir}`);
  assert.deepEqual(w.problems(), []);
  await page.close();
});
