/**
 * Logging in from the broker over the admin API, with two replicas on one database and a
 * fake issuer (test/helpers/fake-issuer.ts) whose tokens the fake upstream can refresh.
 */
import { strict as assert } from 'node:assert';
import { after, test } from 'node:test';
import pg from 'pg';
import { credentialsCommand } from '../src/cli/credentials.js';
import { requestDeviceCode } from '../src/login/device.js';
import { seal } from '../src/lib/secret-crypto.js';
import { writeLatch } from '../src/refresh-guards.js';
import { ADMIN_TOKEN, keyFor, type TestApp } from './helpers/app.js';
import { CODEX_CLIENT_ID } from './helpers/codex.js';
import { FakeIssuer, type FakeIssuerOptions } from './helpers/fake-issuer.js';
import { findLeaks } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';
import { waitFor } from './helpers/wait.js';

const suite = useSuite();
const issuers: FakeIssuer[] = [];
const bodies: string[] = [];
after(async () => {
  for (const f of issuers) await f.close();
});

type Login = Record<string, unknown> & { id: string; state?: string };

async function setup(o: { replicas?: number; issuer?: FakeIssuerOptions; login?: { ttlMs?: number; leaseMs?: number } } = {}) {
  const upstream = await suite.upstream();
  // The issuer's tokens are a family the fake upstream knows, so the broker can refresh them afterwards.
  const fake = await FakeIssuer.start({
    mint: () => (upstream.seed({ accountId: 'acct-fleet', planType: 'team' }) as { tokens: { id_token: string; access_token: string; refresh_token: string } }).tokens,
    ...o.issuer,
  });
  issuers.push(fake);
  const databaseUrl = await suite.pg.newDatabase();
  const apps: TestApp[] = [];
  for (let i = 0; i < (o.replicas ?? 2); i++) {
    apps.push(await suite.app({ databaseUrl, upstreamUrl: upstream.url, config: { OAUTH_ISSUER: fake.url }, login: { pollIntervalMs: 50, sweepMs: 0, ...o.login } }));
  }
  return { upstream, fake, apps, databaseUrl };
}

async function call(t: TestApp, method: 'GET' | 'POST', url: string, payload?: unknown) {
  const res = await t.app.inject({ method, url, headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, ...(payload !== undefined ? { payload: payload as object } : {}) });
  bodies.push(res.body);
  return res;
}

const begin = (t: TestApp, method: string, name = 'default') => call(t, 'POST', `/admin/credentials/${name}/login`, { method });
const stateOf = async (t: TestApp, id: string) => ((await call(t, 'GET', `/admin/logins/${id}`)).json() as Login).state;

async function stored(t: TestApp): Promise<Record<string, unknown> | undefined> {
  const row = await t.core.store.read('CODEX_AUTH_JSON');
  return row ? (JSON.parse(t.core.store.decrypt(row)) as Record<string, unknown>) : undefined;
}

async function query<T extends pg.QueryResultRow>(url: string, sql: string, params: unknown[] = []): Promise<T[]> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return (await c.query<T>(sql, params)).rows;
  } finally {
    await c.end();
  }
}

/** The browser's trip: the authorize URL against the fake, the address it lands on. */
async function signIn(authorizeUrl: string): Promise<string> {
  const res = await fetch(authorizeUrl, { redirect: 'manual' });
  assert.equal(res.status, 302, await res.text());
  return String(res.headers.get('location'));
}

test('a device login started on one replica is stored as codex writes it, audited, clears the latch, and every replica serves it', async () => {
  const { upstream, fake, apps, databaseUrl } = await setup();
  const [a, b] = apps as [TestApp, TestApp];
  // A dead login: latched on its (burned) refresh token.
  const old = upstream.seed();
  await call(a, 'POST', '/admin/clients', { name: 'ws' });
  await a.app.inject({ method: 'PUT', url: '/admin/credential', headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, payload: old });
  const c = await a.core.pool.connect();
  await writeLatch(c, 'CODEX_AUTH_JSON', { refreshTokenSha: 'x'.repeat(64), status: 401, code: 'refresh_token_reused', at: new Date() }, 'test');
  c.release();

  const res = await begin(a, 'device');
  assert.equal(res.statusCode, 202, res.body);
  const started = res.json() as Login;
  assert.deepEqual(Object.keys(started).sort(), ['expires_at', 'id', 'method', 'user_code', 'verification_uri']);
  assert.equal(started['method'], 'device');
  assert.equal(started['verification_uri'], `${fake.url}/codex/device`);
  assert.equal(started['user_code'], fake.userCodes()[0]);
  const ttl = Date.parse(String(started['expires_at'])) - Date.now();
  assert.ok(ttl > 14 * 60_000 && ttl <= 15 * 60_000 + 5_000, `expires in ${ttl} ms`);
  assert.equal(await stateOf(b, started.id), 'pending');

  fake.approveDevice(String(started['user_code']));
  await waitFor('the device login to succeed', async () => (await stateOf(b, started.id)) === 'succeeded');
  const done = (await call(b, 'GET', `/admin/logins/${started.id}`)).json() as Login;
  assert.deepEqual(done, { id: started.id, credential: 'default', method: 'device', state: 'succeeded', expires_at: started['expires_at'], account_id: 'acct-fleet', plan_type: 'team' });

  const doc = await stored(a);
  assert.deepEqual(Object.keys(doc ?? {}), ['auth_mode', 'OPENAI_API_KEY', 'tokens', 'last_refresh']);
  assert.equal(doc?.['auth_mode'], 'chatgpt');
  assert.equal((doc?.['tokens'] as Record<string, string>)['account_id'], 'acct-fleet');
  assert.equal(fake.requests.filter((r) => r.path === '/oauth/token')[0]?.body?.['redirect_uri'], `${fake.url}/deviceauth/callback`);
  assert.deepEqual(await query(databaseUrl, 'SELECT * FROM broker_latch'), []);
  const audit = await query<{ reason: string; outcome: string; finished_at: Date | null }>(databaseUrl, "SELECT reason, outcome, finished_at FROM broker_refresh_events WHERE reason = 'login'");
  assert.equal(audit.length, 1);
  assert.equal(audit[0]?.outcome, 'stored');
  assert.ok(audit[0]?.finished_at instanceof Date);
  assert.match(await a.metrics.registry.getSingleMetricAsString('codex_broker_logins_total'), /method="device",result="succeeded"} 1/);

  // Every replica serves the new login, and it refreshes like any other.
  await waitFor('replica b to load the login', () => b.core.refresher.state() === 'fresh');
  const r = await call(b, 'POST', '/admin/refresh');
  assert.equal((r.json() as { outcome: string }).outcome, 'rotated', r.body);
});

test('a browser login begun on one replica is completed by a callback pasted on another', async () => {
  const { apps } = await setup();
  const [a, b] = apps as [TestApp, TestApp];
  const res = await begin(a, 'browser');
  assert.equal(res.statusCode, 202, res.body);
  const started = res.json() as Login;
  assert.deepEqual(Object.keys(started).sort(), ['authorize_url', 'expires_at', 'id', 'method']);
  const landed = await signIn(String(started['authorize_url']));
  assert.match(landed, /^http:\/\/localhost:1455\/auth\/callback\?code=/);
  const cb = await call(b, 'POST', `/admin/logins/${started.id}/callback`, { callback_url: landed });
  assert.equal(cb.statusCode, 200, cb.body);
  assert.equal((cb.json() as Login).state, 'succeeded');
  assert.equal(await stateOf(a, started.id), 'succeeded');
  assert.equal(((await stored(a))?.['tokens'] as Record<string, string>)['account_id'], 'acct-fleet');
  // A second paste of the same URL finds the login finished.
  const again = await call(a, 'POST', `/admin/logins/${started.id}/callback`, { callback_url: landed });
  assert.equal(again.statusCode, 409);
  assert.equal((again.json() as { code: string }).code, 'login_finished');
});

test('a callback with a wrong state is refused, stores nothing and leaves the login pending for the right one', async () => {
  const { apps } = await setup({ replicas: 1 });
  const [a] = apps as [TestApp];
  const started = (await begin(a, 'browser')).json() as Login;
  const landed = new URL(await signIn(String(started['authorize_url'])));
  const forged = new URL(landed);
  forged.searchParams.set('state', 'not-this-logins-state');
  const bad = await call(a, 'POST', `/admin/logins/${started.id}/callback`, { callback_url: forged.toString() });
  assert.equal(bad.statusCode, 400);
  assert.equal((bad.json() as { code: string }).code, 'state_mismatch');
  assert.equal(await stored(a), undefined);
  assert.equal(await stateOf(a, started.id), 'pending');
  const good = await call(a, 'POST', `/admin/logins/${started.id}/callback`, { callback_url: landed.toString() });
  assert.equal(good.statusCode, 200, good.body);
});

test('an error= callback fails the login, stores nothing, and a new login may start', async () => {
  const { fake, apps } = await setup({ replicas: 1, issuer: { browser: 'deny' } });
  const [a] = apps as [TestApp];
  const started = (await begin(a, 'browser')).json() as Login;
  const landed = await signIn(String(started['authorize_url']));
  const res = await call(a, 'POST', `/admin/logins/${started.id}/callback`, { callback_url: landed });
  assert.equal(res.statusCode, 400);
  assert.equal((res.json() as { code: string }).code, 'authorization_denied');
  const after = (await call(a, 'GET', `/admin/logins/${started.id}`)).json() as Login;
  assert.equal(after.state, 'failed');
  assert.match(String(after['error']), /access_denied/);
  assert.equal(await stored(a), undefined);
  assert.equal(fake.exchanges, 0);
  assert.equal((await begin(a, 'browser')).statusCode, 202);
});

test('a refused code exchange fails the login and stores nothing', async () => {
  const { fake, apps } = await setup({ replicas: 1 });
  const [a] = apps as [TestApp];
  const started = (await begin(a, 'browser')).json() as Login;
  const landed = await signIn(String(started['authorize_url']));
  fake.failNextExchange(400);
  const res = await call(a, 'POST', `/admin/logins/${started.id}/callback`, { callback_url: landed });
  assert.equal(res.statusCode, 502, res.body);
  assert.equal((res.json() as { code: string }).code, 'exchange_failed');
  assert.equal(await stateOf(a, started.id), 'failed');
  assert.equal(await stored(a), undefined);
});

test('one login in progress per credential: a second one gets 409 on any replica, before asking the issuer', async () => {
  const { fake, apps } = await setup();
  const [a, b] = apps as [TestApp, TestApp];
  assert.equal((await begin(a, 'browser')).statusCode, 202);
  const second = await begin(b, 'device');
  assert.equal(second.statusCode, 409);
  assert.equal((second.json() as { code: string }).code, 'login_in_progress');
  assert.equal(fake.requests.filter((r) => r.path === '/api/accounts/deviceauth/usercode').length, 0);
});

test('bad requests: an invalid credential name, an unknown method, an unknown login, a callback without a URL or for a device login', async () => {
  const { apps } = await setup({ replicas: 1 });
  const [a] = apps as [TestApp];
  const other = await begin(a, 'device', 'Team_2');
  assert.equal(other.statusCode, 404);
  assert.match((other.json() as { detail: string }).detail, /not a credential name/);
  assert.equal((await begin(a, 'password')).statusCode, 400);
  assert.equal((await call(a, 'GET', '/admin/logins/no-such-login')).statusCode, 404);
  assert.equal((await call(a, 'POST', '/admin/logins/no-such-login/callback', { callback_url: 'http://localhost:1455/auth/callback?code=x&state=y' })).statusCode, 404);
  const device = (await begin(a, 'device')).json() as Login;
  assert.equal((await call(a, 'POST', `/admin/logins/${device.id}/callback`, {})).statusCode, 400);
  const wrong = await call(a, 'POST', `/admin/logins/${device.id}/callback`, { callback_url: 'http://localhost:1455/auth/callback?code=x&state=y' });
  assert.equal(wrong.statusCode, 409);
  assert.equal((wrong.json() as { code: string }).code, 'wrong_method');
  // The admin check guards these routes too.
  assert.equal((await a.app.inject({ method: 'GET', url: `/admin/logins/${device.id}` })).statusCode, 401);
});

test('an issuer without device login answers 502 device_login_unavailable, saying where to allow it and to use the browser flow', async () => {
  const { apps } = await setup({ replicas: 1, issuer: { deviceDisabled: true } });
  const [a] = apps as [TestApp];
  const res = await begin(a, 'device');
  assert.equal(res.statusCode, 502);
  const p = res.json() as { code: string; detail: string };
  assert.equal(p.code, 'device_login_unavailable');
  assert.match(p.detail, /security settings.*"method":"browser"/s);
  // Nothing is left pending: the browser flow may start at once.
  assert.equal((await begin(a, 'browser')).statusCode, 202);
});

test('a device login that is never approved expires: GET says so, nothing is stored, and a new login may start', async () => {
  const { apps } = await setup({ replicas: 1, login: { ttlMs: 300 } });
  const [a] = apps as [TestApp];
  const started = (await begin(a, 'device')).json() as Login;
  await waitFor('the login to expire', async () => (await stateOf(a, started.id)) === 'expired');
  assert.equal(await stored(a), undefined);
  assert.match(await a.metrics.registry.getSingleMetricAsString('codex_broker_logins_total'), /method="device",result="expired"} 1/);
  assert.equal((await begin(a, 'browser')).statusCode, 202);
});

test('a device login whose replica stops is polled to the end by another replica', async () => {
  const { fake, apps } = await setup();
  const [a, b] = apps as [TestApp, TestApp];
  const started = (await begin(a, 'device')).json() as Login;
  await a.close(); // releases its lease
  fake.approveDevice();
  await waitFor('replica b to take the login over and finish it', async () => (await stateOf(b, started.id)) === 'succeeded');
  assert.equal(b.logs.withEvent('login_resumed').length, 1);
  assert.ok(await stored(b));
});

test('a device login left by a crashed replica (lease lapsed, never released) is taken over by the sweep', async () => {
  const { fake, apps, databaseUrl } = await setup({ replicas: 1 });
  const [b] = apps as [TestApp];
  // What a replica that died mid-poll leaves behind: a pending row, its lease run out.
  const code = await requestDeviceCode({ issuer: fake.url, clientId: CODEX_CLIENT_ID, timeoutMs: 5_000 });
  const sealed = seal(Buffer.from(JSON.stringify({ deviceAuthId: code.deviceAuthId, userCode: code.userCode })), keyFor(databaseUrl));
  await query(
    databaseUrl,
    `INSERT INTO broker_logins (id, credential, method, secrets, secrets_version, poll_interval_ms, lease_owner, lease_until, created_by, expires_at)
     VALUES ('crashed-1', 'default', 'device', $1, $2, 1000, 'dead-replica', now() - interval '1 second', 'dead-replica', now() + interval '10 minutes')`,
    [sealed.bytes, sealed.version],
  );
  fake.approveDevice();
  await b.core.logins.sweep();
  await waitFor('the sweep to finish the crashed replica\'s login', async () => (await stateOf(b, 'crashed-1')) === 'succeeded');
  assert.ok(await stored(b));
});

test('login secrets are sealed with the store key while pending and forgotten when the login ends', async () => {
  const { fake, apps, databaseUrl } = await setup({ replicas: 1 });
  const [a] = apps as [TestApp];
  const started = (await begin(a, 'device')).json() as Login;
  const [row] = await query<{ secrets: Buffer; secrets_version: number }>(databaseUrl, 'SELECT secrets, secrets_version FROM broker_logins WHERE id = $1', [started.id]);
  assert.equal(row?.secrets_version, 1);
  const deviceAuthId = fake.secrets()[0]!;
  assert.ok(!row.secrets.toString('latin1').includes(deviceAuthId), 'device_auth_id in the clear');
  assert.ok(!row.secrets.toString('latin1').includes(String(started['user_code'])), 'user code in the clear');
  fake.approveDevice();
  await waitFor('the login to succeed', async () => (await stateOf(a, started.id)) === 'succeeded');
  const [done] = await query<{ secrets: Buffer }>(databaseUrl, 'SELECT secrets FROM broker_logins WHERE id = $1', [started.id]);
  assert.equal(done?.secrets.length, 0);
});

/** The names `GET /admin/credentials` and `credentials list` show. */
async function listedNames(t: TestApp): Promise<{ admin: string[]; cli: string[] }> {
  const admin = ((await call(t, 'GET', '/admin/credentials')).json() as { credentials: Array<{ name: string }> }).credentials.map((c) => c.name);
  const lines: string[] = [];
  const io = { out: (l: string) => lines.push(l), err: (l: string) => lines.push(l), table: () => undefined };
  const code = await credentialsCommand('list', undefined, { '--json': true }, { store: t.core.store, pool: t.core.pool, defaultKey: 'CODEX_AUTH_JSON', marginSeconds: 86_400 }, io);
  assert.equal(code, 0, lines.join('\n'));
  const cli = (JSON.parse(lines.join('\n')) as { credentials: Array<{ name: string }> }).credentials.map((c) => c.name);
  return { admin, cli };
}

test('a login for a new name creates the credential with the stored login: listed, held and served from', async () => {
  const { apps } = await setup({ replicas: 1 });
  const [a] = apps as [TestApp];
  const started = (await begin(a, 'browser', 'newcomer')).json() as Login;
  assert.deepEqual(await listedNames(a), { admin: ['default'], cli: ['default'] }, 'nothing is created before the login completes');
  const cb = await call(a, 'POST', `/admin/logins/${started.id}/callback`, { callback_url: await signIn(String(started['authorize_url'])) });
  assert.equal(cb.statusCode, 200, cb.body);
  assert.deepEqual(await listedNames(a), { admin: ['default', 'newcomer'], cli: ['default', 'newcomer'] });
  await waitFor('the new credential to be held', () => a.core.credentials.get('newcomer')?.refresher.state() === 'fresh');
});

test('a refused login (stale_login) for a new name leaves no empty credential behind', async () => {
  const issue: { tokens?: { id_token: string; access_token: string; refresh_token: string } } = {};
  const { upstream, apps } = await setup({ replicas: 1, issuer: { mint: () => issue.tokens! } });
  const [a] = apps as [TestApp];
  // A login whose refresh token the broker has already spent: storing it would be a stale seed.
  const old = upstream.seed({ accountId: 'acct-old' }) as { tokens: { id_token: string; access_token: string; refresh_token: string } };
  assert.equal((await a.app.inject({ method: 'PUT', url: '/admin/credential', headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, payload: old })).statusCode, 200);
  assert.equal(((await call(a, 'POST', '/admin/refresh')).json() as { outcome: string }).outcome, 'rotated');
  issue.tokens = { id_token: old.tokens.id_token, access_token: old.tokens.access_token, refresh_token: old.tokens.refresh_token };

  const started = (await begin(a, 'browser', 'newcomer')).json() as Login;
  const cb = await call(a, 'POST', `/admin/logins/${started.id}/callback`, { callback_url: await signIn(String(started['authorize_url'])) });
  assert.equal(cb.statusCode, 502, cb.body);
  assert.match((cb.json() as { detail: string }).detail, /not stored/);
  assert.equal(await stateOf(a, started.id), 'failed');
  assert.deepEqual(await listedNames(a), { admin: ['default'], cli: ['default'] });
  assert.equal(a.core.credentials.get('newcomer'), undefined);
  assert.equal(await a.core.store.read('CODEX_AUTH_JSON__NEWCOMER'), null);
});

test('a device login for a new name that fails or expires leaves no credential behind', async () => {
  const { apps } = await setup({ replicas: 1, login: { ttlMs: 300 } });
  const [a] = apps as [TestApp];
  const expired = (await begin(a, 'device', 'never-approved')).json() as Login;
  await waitFor('the login to expire', async () => (await stateOf(a, expired.id)) === 'expired');
  assert.deepEqual(await listedNames(a), { admin: ['default'], cli: ['default'] });
  assert.equal(a.core.credentials.get('never-approved'), undefined);
});

test('no verifier, code, device_auth_id or token reaches a log line or a response', () => {
  const secrets = [...issuers.flatMap((f) => f.secrets()), ...suite.issuedTokens()];
  assert.ok(secrets.length > 20, `only ${secrets.length} secrets collected`);
  assert.ok(bodies.length > 20 && suite.logLines().length > 20);
  assert.deepEqual(findLeaks([...suite.logLines(), ...bodies], secrets), []);
});
