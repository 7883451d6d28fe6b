import { strict as assert } from 'node:assert';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { after, afterEach, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { InjectOptions, LightMyRequestResponse } from 'fastify';
import { createTestApp, ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks, findSlices } from './helpers/logs.js';
import { startTestPostgres, type TestPostgres } from './helpers/pg.js';
import { waitFor } from './helpers/wait.js';

const KEY = 'CODEX_AUTH_JSON';
const DAY = 86_400_000;
const DROP_IN = (id: string) => `/workspaces/${id}/secrets/values`;

type Doc = Record<string, unknown> & { tokens: Record<string, unknown> };

let pg: TestPostgres;
const upstreams: FakeUpstream[] = [];
const apps: TestApp[] = [];
/** Every response (body and header values) of this file, except the raw-exposure test's. */
const seen: string[] = [];
/** Bodies served in raw mode: they carry the upstream refresh token on purpose. */
const rawSeen: string[] = [];
/** Every client secret handed out: bearer tokens, refresh credentials, platform tokens. */
const clientSecrets: string[] = [];

/** Opened by the running test; closed after it (the logs and issued tokens stay readable). */
const open: Array<TestApp | FakeUpstream> = [];

async function closeOpen() {
  for (const x of open.splice(0).reverse()) await x.close().catch(() => undefined);
}

before(async () => {
  pg = await startTestPostgres();
});
// One Postgres serves every test: close each test's apps so connections do not pile up.
afterEach(closeOpen);
after(async () => {
  await closeOpen();
  await pg.stop();
});

interface SetupOptions {
  now?: () => number;
  adminToken?: string | undefined;
  databaseUrl?: string;
  upstream?: FakeUpstream;
  exposure?: 'proxy' | 'omit' | 'raw';
  platformTokens?: boolean;
  clientReloadMs?: number;
}

async function setup(opts: SetupOptions = {}) {
  const upstream = opts.upstream ?? (await FakeUpstream.start(opts.now ? { now: opts.now } : {}));
  if (!opts.upstream) {
    upstreams.push(upstream);
    open.push(upstream);
  }
  const databaseUrl = opts.databaseUrl ?? (await pg.newDatabase());
  const t = await createTestApp({
    databaseUrl,
    upstreamUrl: upstream.url,
    ...(opts.now ? { now: opts.now } : {}),
    ...('adminToken' in opts ? { adminToken: opts.adminToken } : {}),
    ...(opts.exposure ? { exposure: opts.exposure } : {}),
    ...(opts.platformTokens !== undefined ? { platformTokens: opts.platformTokens } : {}),
    ...(opts.clientReloadMs ? { clientReloadMs: opts.clientReloadMs } : {}),
  });
  apps.push(t);
  open.push(t);
  return { upstream, databaseUrl, ...t };
}

function record(res: LightMyRequestResponse, sink: string[]) {
  sink.push(res.body);
  for (const v of Object.values(res.headers)) if (v !== undefined) sink.push(Array.isArray(v) ? v.join(', ') : String(v));
}

async function call(t: TestApp, o: InjectOptions & { token?: string | undefined; raw?: boolean }): Promise<LightMyRequestResponse> {
  const { token, raw, ...inject } = o;
  const headers: Record<string, string> = { ...(inject.headers as Record<string, string> | undefined) };
  if (token !== undefined) headers['authorization'] = `Bearer ${token}`;
  const res = await t.app.inject({ ...inject, headers });
  record(res, raw ? rawSeen : seen);
  return res;
}

const get = (t: TestApp, url: string, token?: string, headers: Record<string, string> = {}) => call(t, { method: 'GET', url, token, headers });

/** One request to every admin route (revoking the named client). */
function adminRequests(seed: object, revoke: string): InjectOptions[] {
  return [
    { method: 'PUT', url: '/admin/credential', payload: seed },
    { method: 'POST', url: '/admin/refresh' },
    { method: 'GET', url: '/admin/events' },
    { method: 'POST', url: '/admin/clients', payload: { name: 'x' } },
    { method: 'GET', url: '/admin/clients' },
    { method: 'DELETE', url: `/admin/clients/${revoke}` },
  ];
}

async function addClient(t: TestApp, name: string, workspaceId?: string): Promise<{ name: string; token: string; refreshCredential: string; workspaceId: string | null }> {
  const res = await call(t, { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: workspaceId ? { name, workspaceId } : { name } });
  assert.equal(res.statusCode, 201, res.body);
  const c = res.json() as { name: string; token: string; refreshCredential: string; workspaceId: string | null };
  clientSecrets.push(c.token, c.refreshCredential);
  return c;
}

/** Seed through the admin route (what an operator does). */
async function seedAdmin(t: TestApp, doc: Record<string, unknown>) {
  const res = await call(t, { method: 'PUT', url: '/admin/credential', token: ADMIN_TOKEN, payload: doc });
  assert.equal(res.statusCode, 200, res.body);
}

/** Seed straight into the store (shapes the admin route refuses, like a flat document). */
async function seedStore(t: TestApp, doc: Record<string, unknown>) {
  await t.core.store.put(KEY, JSON.stringify(doc));
  await t.core.refresher.reload();
}


function assertProblem(res: LightMyRequestResponse, status: number, code?: string) {
  assert.equal(res.statusCode, status, res.body);
  assert.match(String(res.headers['content-type']), /^application\/problem\+json/);
  const p = res.json() as Record<string, unknown>;
  assert.equal(p['status'], status);
  assert.equal(typeof p['title'], 'string');
  assert.equal(typeof p['detail'], 'string');
  assert.equal(typeof p['type'], 'string');
  if (code) assert.equal(p['code'], code);
  return p;
}

function assert401(res: LightMyRequestResponse) {
  assertProblem(res, 401, 'unauthorized');
  assert.equal(res.headers['www-authenticate'], 'Bearer');
}

function platformToken() {
  const token = randomBytes(32).toString('base64url');
  clientSecrets.push(token);
  return { token, hash: createHash('sha256').update(token).digest() };
}

async function createPlatformTable(t: TestApp) {
  await t.core.pool.query(`CREATE TABLE IF NOT EXISTS workspace_auth_tokens (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id uuid NOT NULL,
    token_hash bytea NOT NULL,
    prefix text,
    created_at timestamptz DEFAULT now(),
    last_used_at timestamptz,
    revoked_at timestamptz)`);
}

async function insertPlatformToken(t: TestApp, workspaceId: string) {
  const p = platformToken();
  await t.core.pool.query('INSERT INTO workspace_auth_tokens (workspace_id, token_hash, prefix) VALUES ($1, $2, $3)', [workspaceId, p.hash, p.token.slice(0, 8)]);
  return p.token;
}

const docOf = (res: LightMyRequestResponse) => res.json() as Doc;

// ---------------------------------------------------------------------------------------

describe('clients', () => {
  test('POST /admin/clients shows the token and refresh credential once; GET lists without secrets', async () => {
    const t = await setup();
    const ws = randomUUID();
    const res = await call(t, { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: { name: 'ws-1', workspaceId: ws } });
    assert.equal(res.statusCode, 201);
    assert.equal(res.headers['cache-control'], 'no-store');
    const c = res.json() as Record<string, string>;
    clientSecrets.push(c['token']!, c['refreshCredential']!);
    assert.equal(c['name'], 'ws-1');
    assert.equal(c['workspaceId'], ws);
    assert.match(c['token']!, /^[A-Za-z0-9_-]{43}$/);
    assert.match(c['refreshCredential']!, /^cabrt_[A-Za-z0-9_-]+$/);
    assert.ok(!Number.isNaN(Date.parse(c['createdAt']!)));
    await addClient(t, 'ws-2');

    const list = await get(t, '/admin/clients', ADMIN_TOKEN);
    assert.equal(list.statusCode, 200);
    const rows = (list.json() as { clients: Array<Record<string, unknown>> }).clients;
    assert.deepEqual(
      rows.map((r) => r['name']),
      ['ws-1', 'ws-2'],
    );
    assert.equal(rows[0]!['workspaceId'], ws);
    assert.equal(rows[1]!['workspaceId'], null);
    assert.equal(rows[0]!['state'], 'never_seen');
    for (const r of rows) {
      assert.equal(r['token'], undefined);
      assert.equal(r['refreshCredential'], undefined);
    }
    for (const secret of clientSecrets) assert.ok(!list.body.includes(secret), 'the list carries no token or refresh credential');
  });

  test('the admin client list shows no part of any client token (no 6-character slice of one)', async () => {
    const t = await setup();
    const made = [await addClient(t, 'slice-1'), await addClient(t, 'slice-2', randomUUID())];
    const list = await get(t, '/admin/clients', ADMIN_TOKEN);
    assert.equal(list.statusCode, 200);
    const rows = (list.json() as { clients: Array<Record<string, unknown>> }).clients;
    assert.equal(rows.length, 2);
    for (const r of rows) assert.equal(r['tokenPrefix'], undefined);
    assert.deepEqual(findSlices(list.body, made.flatMap((c) => [c.token, c.refreshCredential])), []);
  });

  test('client names are validated: 400 problem+json naming the field', async () => {
    const t = await setup();
    for (const name of ['', 'a b', 'x'.repeat(65), '../x', '.hidden', 'a/b', 42, null]) {
      const res = await call(t, { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: { name } });
      const p = assertProblem(res, 400);
      assert.equal(p['field'], 'name', `name ${JSON.stringify(name)}`);
    }
    const missing = await call(t, { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: {} });
    assert.equal(assertProblem(missing, 400)['field'], 'name');
    // The longest allowed name is fine.
    await addClient(t, 'x'.repeat(64));
  });

  test('a workspaceId is answered in the canonical (lower-case) form every later read shows', async () => {
    const t = await setup();
    const ws = randomUUID();
    const c = await addClient(t, 'upper', ws.toUpperCase());
    assert.equal(c.workspaceId, ws);
    const list = (await get(t, '/admin/clients', ADMIN_TOKEN)).json() as { clients: Array<{ workspaceId: string | null }> };
    assert.equal(list.clients[0]!.workspaceId, ws);
  });

  test('a duplicate client name is 409', async () => {
    const t = await setup();
    await addClient(t, 'dup');
    const res = await call(t, { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: { name: 'dup' } });
    const p = assertProblem(res, 409, 'client_exists');
    assert.equal(p['field'], 'name');
  });

  test('a bad workspaceId is 400 naming the field', async () => {
    const t = await setup();
    for (const workspaceId of ['not-a-uuid', 42, '00000000-0000-0000-0000-00000000000g']) {
      const res = await call(t, { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: { name: 'w', workspaceId } });
      assert.equal(assertProblem(res, 400)['field'], 'workspaceId');
    }
  });

  test('DELETE revokes (204; then 404, and 404 for an unknown name); the name can be reused', async () => {
    const t = await setup();
    await seedAdmin(t, t.upstream.seed());
    const c = await addClient(t, 'gone');
    assert.equal((await get(t, '/codex-auth', c.token)).statusCode, 200);
    const del = await call(t, { method: 'DELETE', url: '/admin/clients/gone', token: ADMIN_TOKEN });
    assert.equal(del.statusCode, 204);
    assert.equal(del.body, '');
    assert401(await get(t, '/codex-auth', c.token));
    assertProblem(await call(t, { method: 'DELETE', url: '/admin/clients/gone', token: ADMIN_TOKEN }), 404, 'not_found');
    assertProblem(await call(t, { method: 'DELETE', url: '/admin/clients/never-was', token: ADMIN_TOKEN }), 404, 'not_found');
    const list = (await get(t, '/admin/clients', ADMIN_TOKEN)).json() as { clients: unknown[] };
    assert.equal(list.clients.length, 0);
    const again = await addClient(t, 'gone');
    assert.notEqual(again.token, c.token);
    assert.equal((await get(t, '/codex-auth', again.token)).statusCode, 200);
    assert401(await get(t, '/codex-auth', c.token));
  });
});

describe('authentication', () => {
  test('401 for missing / wrong / revoked tokens on every client route', async () => {
    const t = await setup();
    await seedAdmin(t, t.upstream.seed());
    const live = await addClient(t, 'live');
    const revoked = await addClient(t, 'revoked');
    assert.equal((await call(t, { method: 'DELETE', url: '/admin/clients/revoked', token: ADMIN_TOKEN })).statusCode, 204);
    const ws = randomUUID();
    const wrong = randomBytes(32).toString('base64url');

    // The live client is served everywhere (and /status accepts client tokens).
    assert.equal((await get(t, '/codex-auth', live.token)).statusCode, 200);
    assert.equal((await get(t, DROP_IN(ws), live.token)).statusCode, 200);
    assert.equal((await get(t, '/status', live.token)).statusCode, 200);

    for (const url of ['/codex-auth', DROP_IN(ws), '/status']) {
      assert401(await get(t, url));
      assert401(await get(t, url, wrong));
      assert401(await get(t, url, revoked.token));
      // A broker refresh credential is not a bearer token, and a token needs the Bearer scheme.
      assert401(await get(t, url, live.refreshCredential));
      assert401(await call(t, { method: 'GET', url, headers: { authorization: live.token } }));
      assert401(await call(t, { method: 'GET', url, headers: { authorization: `Basic ${live.token}` } }));
    }

    // The refresh shim answers like the upstream: JSON error, no WWW-Authenticate.
    for (const credential of [`cabrt_${randomBytes(32).toString('base64url')}.abc`, `${revoked.refreshCredential}.abc`, revoked.refreshCredential, live.token]) {
      const res = await call(t, { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', client_id: 'app_EMoamEEZ73f0CkXaXp7hrann', refresh_token: credential } });
      assert.equal(res.statusCode, 401);
      assert.match(String(res.headers['content-type']), /^application\/json/);
      assert.equal((res.json() as { error: { code: string } }).error.code, 'refresh_token_invalidated');
      assert.equal(res.headers['www-authenticate'], undefined);
    }
    const ok = await call(t, { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: `${live.refreshCredential}.old` } });
    assert.equal(ok.statusCode, 200);
  });

  test('a client secret that was served is refused as soon as the client is revoked (the remembered match goes with it; the others stay)', async () => {
    const t = await setup();
    await seedAdmin(t, t.upstream.seed());
    const c = await addClient(t, 'served-then-revoked');
    const other = await addClient(t, 'still-live');
    const ws = randomUUID();
    const shim = (credential: string) => call(t, { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: `${credential}.old` } });
    // Used on every route first, twice: the second use is answered from the remembered match.
    for (let i = 0; i < 2; i++) {
      assert.equal((await get(t, '/codex-auth', c.token)).statusCode, 200);
      assert.equal((await get(t, DROP_IN(ws), c.token)).statusCode, 200);
      assert.equal((await get(t, '/status', c.token)).statusCode, 200);
      assert.equal((await shim(c.refreshCredential)).statusCode, 200);
      assert.equal((await get(t, '/codex-auth', other.token)).statusCode, 200);
    }
    // Its token and refresh credential, and the other client's token.
    assert.equal(t.core.clients.remembered, 3);
    assert.equal((await call(t, { method: 'DELETE', url: '/admin/clients/served-then-revoked', token: ADMIN_TOKEN })).statusCode, 204);
    assert.equal(t.core.clients.remembered, 1, 'the revoked client\'s secrets are forgotten with it, the live one\'s kept');
    assert401(await get(t, '/codex-auth', c.token));
    assert401(await get(t, DROP_IN(ws), c.token));
    assert401(await get(t, '/status', c.token));
    assert.equal((await shim(c.refreshCredential)).statusCode, 401);
    assert.equal((await get(t, '/codex-auth', other.token)).statusCode, 200);
    // A reload that keeps a client keeps its remembered secret (pointing at the new record).
    await t.core.clients.reload();
    assert.equal(t.core.clients.remembered, 1);
    assert.equal((await get(t, '/codex-auth', other.token)).statusCode, 200);
  });

  test('wrong secrets are never remembered: a flood of them leaves one remembered match per client secret used', async () => {
    const t = await setup();
    await seedAdmin(t, t.upstream.seed());
    const c = await addClient(t, 'flooded');
    // Let the setup's reloads (the NOTIFY of the client's assignment in its pool) settle first.
    await waitFor('the client loaded with its assignment', () => [...t.core.clients.all()].some((x) => x.name === 'flooded' && x.assigned !== undefined), 3_000);
    assert.equal((await get(t, '/codex-auth', c.token)).statusCode, 200);
    assert.equal((await call(t, { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: `${c.refreshCredential}.old` } })).statusCode, 200);
    assert.equal(t.core.clients.remembered, 2);
    for (let i = 0; i < 200; i++) {
      assert401(await get(t, '/codex-auth', randomBytes(32).toString('base64url')));
      const res = await call(t, { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: `cabrt_${randomBytes(32).toString('base64url')}.x` } });
      assert.equal(res.statusCode, 401);
    }
    assert.equal(t.core.clients.remembered, 2);
  });

  test('/admin/* without or with a wrong ADMIN_TOKEN is 401', async () => {
    const t = await setup();
    const c = await addClient(t, 'not-admin');
    const routes = adminRequests(t.upstream.seed(), 'not-admin');
    for (const r of routes) {
      for (const token of [undefined, 'wrong-admin-token-0123456789', c.token, `${ADMIN_TOKEN}x`]) {
        assert401(await call(t, { ...r, token }));
      }
    }
    // Nothing happened.
    const list = (await get(t, '/admin/clients', ADMIN_TOKEN)).json() as { clients: Array<{ name: string }> };
    assert.deepEqual(
      list.clients.map((x) => x.name),
      ['not-admin'],
    );
    assert.equal(t.core.refresher.current(), undefined);
  });

  test('with ADMIN_TOKEN unset the admin routes are 404', async () => {
    const t = await setup({ adminToken: undefined });
    const routes = adminRequests(t.upstream.seed(), 'x');
    for (const r of routes) {
      for (const token of [undefined, ADMIN_TOKEN]) {
        const res = await call(t, { ...r, token });
        assertProblem(res, 404, 'not_found');
        assert.match(String(res.json()['detail']), /^admin routes are off: set ADMIN_TOKEN/, 'says they are off and how to turn them on');
      }
    }
    assert.equal(t.core.refresher.current(), undefined);
  });

  test('revocation holds on all replicas within 2 s', async () => {
    const a = await setup();
    const b = await setup({ databaseUrl: a.databaseUrl, upstream: a.upstream });
    await waitFor('both listeners connected', () => a.core.listener.connected && b.core.listener.connected, 3_000);
    await seedAdmin(a, a.upstream.seed());
    await waitFor('b to load the seed', () => b.core.refresher.current() !== undefined, 3_000);
    const c = await addClient(a, 'replicated');
    // B learns about the new client by NOTIFY, too.
    await waitFor('b to learn the new client', async () => (await get(b, '/codex-auth', c.token)).statusCode === 200, 10_000);
    assert.equal((await call(a, { method: 'DELETE', url: '/admin/clients/replicated', token: ADMIN_TOKEN })).statusCode, 204);
    assert401(await get(a, '/codex-auth', c.token));
    let last: LightMyRequestResponse | undefined;
    // B's periodic reload is 30 s away: only the NOTIFY revokes it within waitFor's 5 s (no
    // tighter bound asserted; timings on a loaded machine prove nothing).
    await waitFor('the revocation on b', async () => {
      last = await get(b, '/codex-auth', c.token);
      return last.statusCode === 401;
    });
    assert401(last!);
    assert401(await get(b, DROP_IN(randomUUID()), c.token));
    assert401(await get(b, '/status', c.token));
    const shim = await call(b, { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: c.refreshCredential } });
    assert.equal(shim.statusCode, 401);
  });
});

describe('GET /codex-auth', () => {
  test('GET /codex-auth serves the auth.json codex reads', async () => {
    const t = await setup();
    const stored = t.upstream.seed({ extra: { auth_mode: 'chatgpt', future_field: { nested: [1, 2] } } }) as Doc;
    await seedAdmin(t, stored);
    const c = await addClient(t, 'reader');
    const res = await get(t, '/codex-auth', c.token);
    assert.equal(res.statusCode, 200);
    assert.match(String(res.headers['content-type']), /^application\/json/);
    assert.equal(res.headers['cache-control'], 'no-store');
    const etag = String(res.headers['etag']);
    assert.match(etag, /^"[^"]+"$/, 'a strong ETag');
    const doc = docOf(res);
    assert.deepEqual(Object.keys(doc).sort(), ['OPENAI_API_KEY', 'auth_mode', 'future_field', 'last_refresh', 'tokens']);
    assert.equal(doc['OPENAI_API_KEY'], null);
    assert.equal(doc['auth_mode'], 'chatgpt');
    assert.deepEqual(doc['future_field'], { nested: [1, 2] });
    assert.equal(doc['last_refresh'], stored['last_refresh']);
    assert.deepEqual(Object.keys(doc.tokens).sort(), ['access_token', 'account_id', 'id_token', 'refresh_token']);
    assert.equal(doc.tokens['access_token'], stored.tokens['access_token']);
    assert.equal(doc.tokens['id_token'], stored.tokens['id_token']);
    assert.equal(doc.tokens['account_id'], stored.tokens['account_id']);
    assert.equal(typeof doc.tokens['refresh_token'], 'string');
    assert.notEqual(doc.tokens['refresh_token'], stored.tokens['refresh_token']);
    // Everything but the refresh token is exactly what is stored.
    assert.deepEqual({ ...doc, tokens: { ...doc.tokens, refresh_token: 'x' } }, { ...stored, tokens: { ...stored.tokens, refresh_token: 'x' } });
  });

  test('a flat stored document is served in the nested shape codex reads', async () => {
    const t = await setup();
    const flat = t.upstream.seed({ flat: true, extra: { last_refresh: '2026-01-01T00:00:00.000Z', auth_mode: 'chatgpt' } });
    await seedStore(t, flat);
    const c = await addClient(t, 'flat');
    const res = await get(t, '/codex-auth', c.token);
    assert.equal(res.statusCode, 200);
    const doc = docOf(res);
    assert.deepEqual(Object.keys(doc).sort(), ['OPENAI_API_KEY', 'auth_mode', 'last_refresh', 'tokens']);
    assert.equal(doc['OPENAI_API_KEY'], null);
    assert.equal(doc['auth_mode'], 'chatgpt');
    assert.equal(doc['last_refresh'], '2026-01-01T00:00:00.000Z');
    assert.equal(doc.tokens['access_token'], flat['access_token']);
    assert.equal(doc.tokens['id_token'], flat['id_token']);
    assert.equal(doc.tokens['account_id'], flat['account_id']);
    assert.ok(String(doc.tokens['refresh_token']).startsWith(`${c.refreshCredential}.`));
  });

  test('ETag/304 round-trip; the served ETag changes exactly when the served document changes (rotation, re-seed)', async () => {
    let nowMs = Date.UTC(2030, 0, 1);
    const now = () => nowMs;
    const t = await setup({ now });
    const first = t.upstream.seed();
    await seedAdmin(t, first);
    const c = await addClient(t, 'etag');
    const r1 = await get(t, '/codex-auth', c.token);
    const e1 = String(r1.headers['etag']);
    const r2 = await get(t, '/codex-auth', c.token);
    assert.equal(r2.headers['etag'], e1);
    assert.equal(r2.body, r1.body);

    const nm = await get(t, '/codex-auth', c.token, { 'if-none-match': e1 });
    assert.equal(nm.statusCode, 304);
    assert.equal(nm.body, '');
    assert.equal(nm.headers['etag'], e1);
    assert.equal(nm.headers['cache-control'], 'no-store');
    assert.equal((await get(t, '/codex-auth', c.token, { 'if-none-match': `"other", ${e1}` })).statusCode, 304);
    assert.equal((await get(t, '/codex-auth', c.token, { 'if-none-match': '"not-it"' })).statusCode, 200);

    // Nothing served changes: a fresh check, another client, a reload, the same document re-seeded.
    assert.equal((await t.core.refresher.runCycle()).check, 'fresh');
    await addClient(t, 'other');
    await t.core.refresher.reload();
    await seedAdmin(t, first);
    nowMs += DAY;
    const same = await get(t, '/codex-auth', c.token, { 'if-none-match': e1 });
    assert.equal(same.statusCode, 304);
    assert.equal(same.headers['etag'], e1);

    // A re-seed with a new login: new ETag, 200.
    await seedAdmin(t, t.upstream.seed());
    const r3 = await get(t, '/codex-auth', c.token, { 'if-none-match': e1 });
    assert.equal(r3.statusCode, 200);
    const e3 = String(r3.headers['etag']);
    assert.notEqual(e3, e1);
    assert.notEqual(r3.body, r1.body);
    assert.equal((await get(t, '/codex-auth', c.token, { 'if-none-match': e3 })).statusCode, 304);

    // A rotation: make the token due on the shared clock, run the cycle.
    nowMs += 9.5 * DAY;
    // The loop may run this cycle first (a late NOTIFY poke); either way exactly one rotation.
    const report = await t.core.refresher.runCycle();
    assert.ok(report.attempt === 'rotated' || report.check === 'fresh', JSON.stringify(report));
    assert.equal(t.upstream.rotations, 1);
    const r4 = await get(t, '/codex-auth', c.token, { 'if-none-match': e3 });
    assert.equal(r4.statusCode, 200);
    const e4 = String(r4.headers['etag']);
    assert.notEqual(e4, e3);
    assert.equal(docOf(r4).tokens['access_token'], t.upstream.lastAccessToken());
    assert.equal(docOf(r4)['last_refresh'], new Date(nowMs).toISOString());
    assert.equal((await get(t, '/codex-auth', c.token)).headers['etag'], e4);
    assert.equal((await get(t, '/codex-auth', c.token, { 'if-none-match': e4 })).statusCode, 304);
  });

  test('503 with Retry-After and a code when there is no usable token', async () => {
    let nowMs = Date.UTC(2030, 0, 1);
    const now = () => nowMs;
    const t = await setup({ now });
    const c = await addClient(t, 'waiting');
    const ws = randomUUID();
    for (const url of ['/codex-auth', DROP_IN(ws)]) {
      const res = await get(t, url, c.token);
      assertProblem(res, 503, 'no_credential');
      assert.ok(Number(res.headers['retry-after']) > 0);
    }
    // A bad token is still 401, not 503.
    assert401(await get(t, '/codex-auth', 'wrong-wrong-wrong-wrong'));

    await seedAdmin(t, t.upstream.seed());
    assert.equal((await get(t, '/codex-auth', c.token)).statusCode, 200);
    nowMs += 11 * DAY;
    for (const url of ['/codex-auth', DROP_IN(ws)]) {
      const res = await get(t, url, c.token);
      assertProblem(res, 503, 'token_expired');
      assert.ok(Number(res.headers['retry-after']) > 0);
    }
  });

  test('a latched credential whose access token is unexpired is still served', async () => {
    let nowMs = Date.UTC(2030, 0, 1);
    const now = () => nowMs;
    const t = await setup({ now });
    await seedAdmin(t, t.upstream.seed());
    const c = await addClient(t, 'latched');
    t.upstream.fault({
      kind: 'status',
      status: 401,
      body: { error: { message: 'Your refresh token has already been used to generate a new access token.', type: 'invalid_request_error', code: 'refresh_token_reused' } },
    });
    nowMs += 9.5 * DAY;
    // The loop may run this cycle first (a late NOTIFY poke); either way exactly one POST.
    const report = await t.core.refresher.runCycle();
    assert.ok(report.attempt === 'permanent_failure' || report.check === 'latched', JSON.stringify(report));
    assert.equal(t.upstream.posts, 1);
    assert.equal(t.core.refresher.state(), 'latched');
    const res = await get(t, '/codex-auth', c.token);
    assert.equal(res.statusCode, 200);
    assert.equal((await get(t, DROP_IN(randomUUID()), c.token)).statusCode, 200);
    const status = (await get(t, '/status', c.token)).json() as { state: string; latch: { upstreamCode: string } };
    assert.equal(status.state, 'latched');
    assert.equal(status.latch.upstreamCode, 'refresh_token_reused');
    // Once it expires, nothing usable is left.
    nowMs += 1 * DAY;
    assertProblem(await get(t, '/codex-auth', c.token), 503, 'token_expired');
  });
});

describe('refresh-token exposure', () => {
  test('proxy (default) serves the client its own broker refresh credential', async () => {
    const t = await setup();
    const stored = t.upstream.seed() as Doc;
    await seedAdmin(t, stored);
    const a = await addClient(t, 'pa');
    const b = await addClient(t, 'pb');
    const da = docOf(await get(t, '/codex-auth', a.token));
    const db = docOf(await get(t, '/codex-auth', b.token));
    const ra = String(da.tokens['refresh_token']);
    const rb = String(db.tokens['refresh_token']);
    assert.ok(ra.startsWith(`${a.refreshCredential}.`), 'starts with the client credential and a dot');
    assert.ok(rb.startsWith(`${b.refreshCredential}.`));
    assert.ok(ra.length > a.refreshCredential.length + 1, 'a generation tag follows');
    assert.notEqual(ra, stored.tokens['refresh_token']);
    // The served credential works at the broker's shim (and never reaches the upstream).
    const shim = await call(t, { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: ra } });
    assert.equal(shim.statusCode, 200);
    assert.ok(String((shim.json() as { refresh_token: string }).refresh_token).startsWith(`${a.refreshCredential}.`));
    assert.equal(t.upstream.posts, 0);
  });

  test('omit serves an empty refresh token', async () => {
    const t = await setup({ exposure: 'omit' });
    const stored = t.upstream.seed() as Doc;
    await seedAdmin(t, stored);
    const a = await addClient(t, 'oa');
    const b = await addClient(t, 'ob');
    const ra = await get(t, '/codex-auth', a.token);
    const rb = await get(t, '/codex-auth', b.token);
    assert.equal(docOf(ra).tokens['refresh_token'], '');
    assert.equal(docOf(ra).tokens['access_token'], stored.tokens['access_token']);
    // The same bytes for every client.
    assert.equal(ra.body, rb.body);
    assert.equal(ra.headers['etag'], rb.headers['etag']);
    const drop = await get(t, DROP_IN(randomUUID()), a.token);
    assert.equal(JSON.parse((drop.json() as { CODEX_AUTH_JSON: string }).CODEX_AUTH_JSON).tokens.refresh_token, '');
  });

  test('raw serves the real refresh token', async () => {
    const t = await setup({ exposure: 'raw' });
    const stored = t.upstream.seed() as Doc;
    await seedAdmin(t, stored);
    const a = await addClient(t, 'ra');
    const res = await call(t, { method: 'GET', url: '/codex-auth', token: a.token, raw: true });
    assert.equal(res.statusCode, 200);
    assert.deepEqual(docOf(res), stored);
    assert.equal(docOf(res).tokens['refresh_token'], t.upstream.currentRefreshToken());
    const drop = await call(t, { method: 'GET', url: DROP_IN(randomUUID()), token: a.token, raw: true });
    assert.equal(JSON.parse((drop.json() as { CODEX_AUTH_JSON: string }).CODEX_AUTH_JSON).tokens.refresh_token, stored.tokens['refresh_token']);
  });
});

describe('drop-in route', () => {
  test('the drop-in body is exactly JSON.stringify({ CODEX_AUTH_JSON: <the /codex-auth body> }) for documents that need escaping, under every exposure', async () => {
    const awkward = 'quote " backslash \\ newline \n tab \t nul \u0000 ls \u2028 é 🔑 </script> \\u0041';
    for (const exposure of ['proxy', 'omit', 'raw'] as const) {
      const t = await setup({ exposure });
      await seedAdmin(t, t.upstream.seed({ extra: { auth_mode: 'chatgpt', note: awkward, nested: { list: [awkward, 1, null] } } }));
      const c = await addClient(t, `escape-${exposure}`);
      // raw exposure serves the upstream refresh token by design: its bodies go to rawSeen.
      const read = (url: string) => call(t, { method: 'GET', url, token: c.token, raw: exposure === 'raw' });
      const direct = await read('/codex-auth');
      assert.equal(direct.statusCode, 200);
      assert.equal((direct.json() as { note: string }).note, awkward);
      const drop = await read(DROP_IN(randomUUID()));
      assert.equal(drop.statusCode, 200);
      assert.equal(drop.body, JSON.stringify({ CODEX_AUTH_JSON: direct.body }), exposure);
      // Twice: the second answer comes from what the first one built.
      assert.equal((await read(DROP_IN(randomUUID()))).body, drop.body);
    }
  });

  test('the drop-in route answers {"CODEX_AUTH_JSON": "<the same document as a string>"}', async () => {
    const t = await setup();
    await seedAdmin(t, t.upstream.seed({ extra: { auth_mode: 'chatgpt' } }));
    const c = await addClient(t, 'sync');
    const ws = randomUUID();
    const res = await get(t, DROP_IN(ws), c.token, { 'x-molecule-org-id': randomUUID(), accept: 'application/json' });
    assert.equal(res.statusCode, 200);
    assert.match(String(res.headers['content-type']), /^application\/json/);
    assert.equal(res.headers['cache-control'], 'no-store');
    const body = res.json() as Record<string, unknown>;
    assert.deepEqual(Object.keys(body), ['CODEX_AUTH_JSON']);
    assert.equal(typeof body['CODEX_AUTH_JSON'], 'string');
    const direct = await get(t, '/codex-auth', c.token);
    // Byte for byte the /codex-auth document: the sync script writes it as it comes.
    assert.equal(body['CODEX_AUTH_JSON'], direct.body);
    assert.deepEqual(JSON.parse(body['CODEX_AUTH_JSON'] as string), direct.json());

    // An empty org id header (the script sends one when it has none) is accepted.
    assert.equal((await get(t, DROP_IN(ws), c.token, { 'x-molecule-org-id': '' })).statusCode, 200);
    // Its own strong ETag and 304.
    const etag = String(res.headers['etag']);
    assert.match(etag, /^"[^"]+"$/);
    assert.notEqual(etag, direct.headers['etag']);
    const nm = await get(t, DROP_IN(ws), c.token, { 'if-none-match': etag });
    assert.equal(nm.statusCode, 304);
    assert.equal(nm.body, '');
  });

  test('a client bound to a workspace reads only its own; a malformed id is 400; an unbound client reads any', async () => {
    const t = await setup();
    await seedAdmin(t, t.upstream.seed());
    const x = randomUUID();
    const y = randomUUID();
    const bound = await addClient(t, 'bound', x);
    const free = await addClient(t, 'free');
    assert.equal((await get(t, DROP_IN(x), bound.token)).statusCode, 200);
    assert.equal((await get(t, DROP_IN(x.toUpperCase()), bound.token)).statusCode, 200);
    assertProblem(await get(t, DROP_IN(y), bound.token), 404, 'not_found');
    for (const bad of ['not-a-uuid', '1234', `${x}x`, '..%2F..%2Fadmin']) {
      assertProblem(await get(t, DROP_IN(bad), bound.token), 400, 'invalid_workspace_id');
    }
    for (const id of [x, y, randomUUID()]) assert.equal((await get(t, DROP_IN(id), free.token)).statusCode, 200);
    // /codex-auth is not workspace-scoped: a bound client reads it too.
    assert.equal((await get(t, '/codex-auth', bound.token)).statusCode, 200);
  });
});

describe('platform workspace tokens', () => {
  test('PLATFORM_WORKSPACE_TOKENS: a live platform token reads its own workspace; a revoked one or another workspace\'s id is refused', async () => {
    const t = await setup({ platformTokens: true, clientReloadMs: 200 });
    await createPlatformTable(t);
    await seedAdmin(t, t.upstream.seed());
    const ws = randomUUID();
    const other = randomUUID();
    const token = await insertPlatformToken(t, ws);
    const otherToken = await insertPlatformToken(t, other);
    // Picked up by the periodic reload (the platform's table sends no NOTIFY).
    await waitFor('the platform token to be loaded', async () => (await get(t, DROP_IN(ws), token)).statusCode === 200, 3_000);

    const res = await get(t, DROP_IN(ws), token, { 'x-molecule-org-id': randomUUID() });
    assert.equal(res.statusCode, 200);
    const served = JSON.parse((res.json() as { CODEX_AUTH_JSON: string }).CODEX_AUTH_JSON) as Doc;
    assert.equal(served.tokens['access_token'], t.upstream.lastAccessToken());
    assert.match(String(served.tokens['refresh_token']), /^cabrt_[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/);
    // What it was served works at the shim.
    const shim = await call(t, { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: served.tokens['refresh_token'] } });
    assert.equal(shim.statusCode, 200);

    assert.equal((await get(t, DROP_IN(other), otherToken)).statusCode, 200);
    assertProblem(await get(t, DROP_IN(other), token), 404, 'not_found');
    assertProblem(await get(t, DROP_IN(ws), otherToken), 404, 'not_found');
    // /codex-auth is for broker clients only.
    assert401(await get(t, '/codex-auth', token));

    await t.core.pool.query('UPDATE workspace_auth_tokens SET revoked_at = now() WHERE workspace_id = $1', [ws]);
    await waitFor('the revoked platform token to be dropped', async () => (await get(t, DROP_IN(ws), token)).statusCode === 401, 3_000);
    assert401(await get(t, DROP_IN(ws), token));
    assert.equal((await get(t, DROP_IN(other), otherToken)).statusCode, 200);
    // Broker clients keep working alongside.
    const c = await addClient(t, 'broker-client');
    assert.equal((await get(t, DROP_IN(ws), c.token)).statusCode, 200);
  });

  test('a platform token is refused on /status (openapi.yaml: platform tokens are for the drop-in route only)', async () => {
    const t = await setup({ platformTokens: true, clientReloadMs: 200 });
    await createPlatformTable(t);
    await seedAdmin(t, t.upstream.seed());
    const ws = randomUUID();
    const token = await insertPlatformToken(t, ws);
    await waitFor('the platform token to be loaded', async () => (await get(t, DROP_IN(ws), token)).statusCode === 200, 3_000);
    assert401(await get(t, '/status', token));
  });

  test('with PLATFORM_WORKSPACE_TOKENS false a platform token is 401', async () => {
    const t = await setup({ platformTokens: false, clientReloadMs: 200 });
    await createPlatformTable(t);
    await seedAdmin(t, t.upstream.seed());
    const ws = randomUUID();
    const token = await insertPlatformToken(t, ws);
    await t.core.clients.reload();
    await sleep(400); // several periodic reloads
    assert401(await get(t, DROP_IN(ws), token));
    assert401(await get(t, '/codex-auth', token));
  });
});

describe('metrics', () => {
  test('/metrics counts served tokens and clients by state', async () => {
    const t = await setup();
    await seedAdmin(t, t.upstream.seed());
    const a = await addClient(t, 'seen');
    await addClient(t, 'unseen');
    assert.equal((await get(t, '/codex-auth', a.token)).statusCode, 200);
    const etag = String((await get(t, '/codex-auth', a.token)).headers['etag']);
    assert.equal((await get(t, '/codex-auth', a.token, { 'if-none-match': etag })).statusCode, 304);
    assert401(await get(t, '/codex-auth', 'nope-nope-nope-nope'));
    assert.equal((await get(t, DROP_IN(randomUUID()), a.token)).statusCode, 200);
    const res = await get(t, '/metrics');
    assert.equal(res.statusCode, 200);
    const line = (name: string, labels: string) => {
      const m = new RegExp(`^codex_broker_${name}\\{${labels}\\} (\\S+)$`, 'm').exec(res.body);
      return m ? Number(m[1]) : undefined;
    };
    assert.equal(line('token_served_total', 'route="/codex-auth",result="ok"'), 2);
    assert.equal(line('token_served_total', 'route="/codex-auth",result="not_modified"'), 1);
    assert.equal(line('token_served_total', 'route="/codex-auth",result="unauthorized"'), 1);
    assert.equal(line('token_served_total', 'route="/workspaces/:id/secrets/values",result="ok"'), 1);
    assert.equal(line('clients', 'state="active"'), 1);
    assert.equal(line('clients', 'state="never_seen"'), 1);
    assert.equal(line('clients', 'state="stale"'), 0);
    // No per-client label.
    assert.ok(!res.body.includes('client="'));
    assert.ok(!/name="(seen|unseen)"/.test(res.body));
  });
});

// ---------------------------------------------------------------------------------------

describe('no secret leaves where it should not', () => {
  test('in proxy mode no served document and no response body ever contains the upstream refresh token', (t) => {
    if (seen.length === 0) return t.skip('no other test ran');
    const refreshTokens = upstreams.flatMap((u) => u.issuedTokens()).filter((s) => s.startsWith('rt_'));
    assert.ok(refreshTokens.length > 0);
    assert.deepEqual(findLeaks(seen, refreshTokens), []);
    for (const text of seen) for (const rt of refreshTokens) assert.ok(!text.includes(rt));
    // The raw-mode test did serve one: the check above would have caught it.
    if (rawSeen.length > 0) assert.ok(findLeaks(rawSeen, refreshTokens).length > 0);
    return undefined;
  });

  test('no token of any kind appears in any log line', (t) => {
    if (apps.length === 0) return t.skip('no other test ran');
    const secrets = [...upstreams.flatMap((u) => u.issuedTokens()), ...clientSecrets, ADMIN_TOKEN];
    const lines = apps.flatMap((a) => a.logs.lines);
    assert.ok(lines.length > 0);
    assert.deepEqual(findLeaks(lines, secrets), []);
    return undefined;
  });
});
