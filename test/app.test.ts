import { strict as assert } from 'node:assert';
import { describe, test } from 'node:test';
import { decodeJwt } from 'jose';
import { ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import type { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';
import { waitFor } from './helpers/wait.js';

const KEY = 'CODEX_AUTH_JSON';
const bodies: string[] = [];

const suite = useSuite();
const { apps, upstreams } = suite;

async function setup(
  opts: { now?: () => number; adminToken?: string | undefined; metricsToken?: string; databaseUrl?: string; start?: boolean; upstream?: FakeUpstream } = {},
) {
  const upstream = opts.upstream ?? (await suite.upstream(opts.now ? { now: opts.now } : {}));
  const databaseUrl = opts.databaseUrl ?? (await suite.pg.newDatabase());
  const t = await suite.app({
    databaseUrl,
    upstreamUrl: upstream.url,
    ...(opts.now ? { now: opts.now } : {}),
    ...('adminToken' in opts ? { adminToken: opts.adminToken } : {}),
    ...(opts.metricsToken ? { metricsToken: opts.metricsToken } : {}),
    ...(opts.start === false ? { start: false } : {}),
  });
  return { upstream, databaseUrl, ...t };
}

async function get(t: TestApp, url: string, token?: string) {
  const res = await t.app.inject({ method: 'GET', url, headers: token ? { authorization: `Bearer ${token}` } : {} });
  bodies.push(res.body);
  return res;
}


describe('operator routes', () => {
  test('/healthz is 200 and says degraded while no credential is stored', async () => {
    const t = await setup();
    const res = await get(t, '/healthz');
    assert.equal(res.statusCode, 200);
    const body = res.json();
    assert.equal(body.status, 'degraded');
    assert.equal(body.credentialState, 'absent');
  });

  test('/healthz is ok with a fresh credential', async () => {
    const t = await setup();
    await t.core.store.put(KEY, JSON.stringify(t.upstream.seed()));
    await t.core.refresher.reload();
    const res = await get(t, '/healthz');
    assert.equal(res.statusCode, 200);
    assert.equal(res.json().status, 'ok');
    assert.equal(res.json().credentialState, 'fresh');
    assert.match(String(res.headers['content-type']), /^application\/json; charset=utf-8$/);
    assert.deepEqual(Object.keys(res.json()), ['status', 'credentialState', 'writebackPending', 'listener', 'replicaId', 'uptimeSeconds']);
    assert.equal(res.body, JSON.stringify(res.json()), 'the bytes JSON.stringify writes');
  });

  test('/readyz is 503 naming no_credential when nothing is stored', async () => {
    const t = await setup();
    const res = await get(t, '/readyz');
    assert.equal(res.statusCode, 503);
    assert.match(String(res.headers['content-type']), /application\/problem\+json/);
    assert.equal(res.json().code, 'no_credential');
    assert.ok(res.headers['retry-after']);
  });

  test('/readyz is 200 with an unexpired token and 503 token_expired once it expires', async () => {
    let nowMs = Date.UTC(2026, 0, 1);
    const t = await setup({ now: () => nowMs });
    await t.core.store.put(KEY, JSON.stringify(t.upstream.seed()));
    await t.core.refresher.reload();
    assert.equal((await get(t, '/readyz')).statusCode, 200);
    nowMs += 11 * 86_400_000;
    const res = await get(t, '/readyz');
    assert.equal(res.statusCode, 503);
    assert.equal(res.json().code, 'token_expired');
  });

  test('/readyz is 503 credential_unreadable for a row of an unknown encryption version', async () => {
    // Not started (no listener): the put's NOTIFY must not load the readable copy first, or
    // the broker would rightly keep serving that last good token.
    const t = await setup({ start: false });
    await t.core.store.put(KEY, JSON.stringify(t.upstream.seed()));
    await t.core.pool.query('UPDATE global_secrets SET encryption_version = 7 WHERE key = $1', [KEY]);
    await t.core.refresher.reload();
    const res = await get(t, '/readyz');
    assert.equal(res.statusCode, 503);
    assert.equal(res.json().code, 'credential_unreadable');
    const status = (await get(t, '/status', ADMIN_TOKEN)).json();
    assert.equal(status.state, 'invalid');
    assert.equal(status.lastError.code, 'ENCRYPTION_VERSION_UNKNOWN');
  });

  test('/metrics exposes every refresher metric of DESIGN.md in Prometheus text format', async () => {
    const t = await setup();
    await t.core.store.put(KEY, JSON.stringify(t.upstream.seed()));
    await t.core.refresher.runCycle();
    await get(t, '/healthz');
    assert.equal((await get(t, '/no-such-route')).statusCode, 404);
    assert.equal((await get(t, '/codex-auth')).statusCode, 401);
    const res = await get(t, '/metrics');
    assert.equal(res.statusCode, 200);
    assert.match(String(res.headers['content-type']), /^text\/plain; version=0\.0\.4/);
    for (const name of [
      'codex_broker_refresh_attempts_total',
      'codex_broker_refresh_checks_total',
      'codex_broker_access_token_expiry_timestamp_seconds',
      'codex_broker_last_rotation_timestamp_seconds',
      'codex_broker_credential_state',
      'codex_broker_upstream_request_duration_seconds',
      'codex_broker_writeback_pending',
      'codex_broker_refresh_lock_held',
      'codex_broker_token_served_total',
      'codex_broker_clients',
      'codex_broker_http_request_duration_seconds',
    ]) {
      assert.match(res.body, new RegExp(`^# TYPE ${name} `, 'm'), name);
    }
    // Per-login series carry the credential's name (issue #12).
    assert.match(res.body, /codex_broker_refresh_checks_total\{credential="default",result="fresh"\} 1/);
    assert.match(res.body, /codex_broker_credential_state\{credential="default",state="fresh"\} 1/);
    assert.match(res.body, /codex_broker_http_request_duration_seconds_count\{method="GET",route="\/healthz",status_code="200"\} 1/);
    assert.match(res.body, /codex_broker_http_request_duration_seconds_count\{method="GET",route="\/codex-auth",status_code="401"\} 1/);
    assert.match(res.body, /codex_broker_http_request_duration_seconds_count\{method="GET",route="unmatched",status_code="404"\} 1/);
  });

  test('every response carries a distinct x-request-id, and a line logged while handling a request carries the same id as reqId', async () => {
    const t = await setup();
    const ids = new Set<string>();
    for (let i = 0; i < 50; i++) ids.add(String((await get(t, '/healthz')).headers['x-request-id']));
    assert.equal(ids.size, 50, 'request ids are unique');
    // A caller's own request id is kept (so a proxy's id reaches the log).
    assert.equal((await t.app.inject({ url: '/healthz', headers: { 'x-request-id': 'from-the-proxy-42' } })).headers['x-request-id'], 'from-the-proxy-42');
    const res = await t.app.inject({ method: 'POST', url: '/admin/clients', headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, payload: { name: 'logged-by-request' } });
    assert.equal(res.statusCode, 201);
    bodies.push(res.body);
    const line = t.logs.withEvent('client_added').at(-1);
    assert.ok(line, 'the route logged through req.log');
    assert.equal(line['reqId'], res.headers['x-request-id']);
    assert.equal(line['level'], 30);
    assert.equal(line['service'], 'codex-auth-broker', 'the request logger is a child of the broker logger');
  });

  test('/metrics asks for METRICS_TOKEN when one is configured', async () => {
    const t = await setup({ metricsToken: 'metrics-token-0123456789' });
    assert.equal((await get(t, '/metrics')).statusCode, 401);
    assert.equal((await get(t, '/metrics', 'metrics-token-0123456789')).statusCode, 200);
  });

  test('/status requires the admin token and reports the credential without any secret', async () => {
    const t = await setup();
    const doc = t.upstream.seed({ accountId: 'acct-1234', planType: 'team' });
    await t.core.store.put(KEY, JSON.stringify(doc));
    await t.core.refresher.runCycle();
    assert.equal((await get(t, '/status')).statusCode, 401);
    assert.equal((await get(t, '/status', 'wrong-token-wrong-token')).statusCode, 401);
    const res = await get(t, '/status', ADMIN_TOKEN);
    assert.equal(res.statusCode, 200);
    const s = res.json();
    assert.equal(s.state, 'fresh');
    assert.equal(s.accountId, 'acct-1234');
    assert.equal(s.planType, 'team');
    assert.equal(s.consecutiveFailures, 0);
    assert.equal(s.refreshLockHeld, false);
    assert.equal(typeof s.replicaId, 'string');
    assert.ok(s.nextCheckAt);
    const exp = decodeJwt((doc as { tokens: { access_token: string } }).tokens.access_token).exp ?? 0;
    assert.equal(s.accessTokenExpiresAt, new Date(exp * 1000).toISOString());
    assert.deepEqual(findLeaks([res.body], t.upstream.issuedTokens()), []);
  });

  test('/status is closed to everyone when ADMIN_TOKEN is unset and there are no clients', async () => {
    const t = await setup({ adminToken: undefined });
    const res = await get(t, '/status', ADMIN_TOKEN);
    assert.equal(res.statusCode, 401);
    assert.equal(res.headers['www-authenticate'], 'Bearer');
  });

  test('unknown routes answer 404 problem+json', async () => {
    const t = await setup();
    const res = await get(t, '/nope');
    assert.equal(res.statusCode, 404);
    assert.match(String(res.headers['content-type']), /application\/problem\+json/);
    assert.deepEqual(Object.keys(res.json()).sort(), ['code', 'detail', 'status', 'title', 'type']);
  });

  test('/openapi.yaml serves the spec', async () => {
    const t = await setup();
    const res = await get(t, '/openapi.yaml');
    assert.equal(res.statusCode, 200);
    assert.match(res.body, /^openapi: 3\./m);
  });
});

describe('fan-out', () => {
  test('NOTIFY codex_auth_changed: every instance reloads a re-seed at once', async () => {
    const a = await setup();
    const b = await setup({ databaseUrl: a.databaseUrl });
    await waitFor('both listeners connected', () => a.core.listener.connected && b.core.listener.connected);
    const doc = a.upstream.seed();
    await a.core.store.put(KEY, JSON.stringify(doc));
    const exp = decodeJwt((doc as { tokens: { access_token: string } }).tokens.access_token).exp ?? 0;
    const iso = new Date(exp * 1000).toISOString();
    // The check interval is 300 s: only the NOTIFY can make this happen within waitFor's 5 s
    // (no tighter timing asserted: a loaded machine may take seconds).
    await waitFor('b to adopt the re-seed', () => b.core.refresher.status().accessTokenExpiresAt === iso);
    const res = await get(b, '/status', ADMIN_TOKEN);
    assert.equal(res.json().accessTokenExpiresAt, iso);
  });

  test('NOTIFY codex_auth_changed: a rotation on one replica is adopted by the others', async () => {
    let nowMs = Date.now();
    const now = () => nowMs;
    const upstream = await suite.upstream({ now, accessLifetimeSec: 3_600 });
    const a = await setup({ now, upstream, start: false });
    // b runs on the real clock: the 40 minutes a skips ahead never make the seed due for b,
    // so the rotation b adopts is a's (b's own re-check after the seed's NOTIFY may run late
    // on a loaded machine; with a's clock it could rotate first).
    const b = await setup({ upstream, databaseUrl: a.databaseUrl });
    await waitFor("b's listener connected", () => b.core.listener.connected);
    await a.core.store.put(KEY, JSON.stringify(upstream.seed()));
    await waitFor('b to load the seed', () => b.core.refresher.state() === 'fresh');
    nowMs += 40 * 60_000;
    const report = await a.core.refresher.runCycle();
    assert.equal(report.attempt, 'rotated');
    const exp = decodeJwt(upstream.lastAccessToken() ?? '').exp ?? 0;
    const iso = new Date(exp * 1000).toISOString();
    // b's next check is 300 s away: only the NOTIFY can make this happen within waitFor's 5 s.
    await waitFor('b to adopt the rotation', () => b.core.refresher.status().accessTokenExpiresAt === iso);
    assert.equal(upstream.posts, 1);
    assert.equal(upstream.reuseAnswers, 0);
  });

  test('NOTIFY codex_auth_changed: a deleted credential is dropped everywhere', async () => {
    const a = await setup();
    const b = await setup({ databaseUrl: a.databaseUrl });
    await waitFor("b's listener connected", () => b.core.listener.connected);
    await a.core.store.put(KEY, JSON.stringify(a.upstream.seed()));
    await waitFor('b to load the seed', () => b.core.refresher.state() === 'fresh');
    await a.core.store.remove(KEY);
    await waitFor('b to drop the deleted credential', () => b.core.refresher.state() === 'absent');
  });
});

describe('store outage', () => {
  test('/readyz is 503 store_unreachable while the database is down, and recovers', async () => {
    const t = await setup();
    await t.core.store.put(KEY, JSON.stringify(t.upstream.seed()));
    await t.core.refresher.reload();
    await suite.pg.stopServer();
    try {
      // /readyz re-checks the database at most once a second: wait for it to look, not a fixed second.
      await waitFor('/readyz to find the database down', async () => (await get(t, '/readyz')).statusCode === 503, 10_000);
      const res = await get(t, '/readyz');
      assert.equal(res.statusCode, 503);
      assert.equal(res.json().code, 'store_unreachable');
      assert.equal((await get(t, '/healthz')).statusCode, 200);
    } finally {
      await suite.pg.startServer();
    }
    await waitFor('/readyz to find the database back', async () => (await get(t, '/readyz')).statusCode === 200, 10_000);
  });
});

test('no token value appears in any log line or response of the app tests', () => {
  const secrets = [...upstreams.flatMap((u) => u.issuedTokens()), ADMIN_TOKEN];
  const texts = [...apps.flatMap((a) => a.logs.lines), ...bodies];
  assert.ok(texts.length > 0);
  assert.deepEqual(findLeaks(texts, secrets), []);
});
