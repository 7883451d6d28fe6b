/**
 * The refresh shim (`POST /oauth/token`) that stock codex reaches through
 * CODEX_REFRESH_TOKEN_URL_OVERRIDE, driven through the real app (fastify inject) on a real
 * Postgres, against the strict fake upstream, with one fake clock shared by the upstream
 * and every replica.
 *
 * Callers do exactly what codex does: fetch the served document (GET /codex-auth), then
 * POST `{client_id, grant_type: "refresh_token", refresh_reason, refresh_token:
 * <doc.tokens.refresh_token>}`. The served refresh token is `<credential>.<generation>`,
 * so the broker knows whether the caller holds its current access token.
 */
import { strict as assert } from 'node:assert';
import { performance } from 'node:perf_hooks';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { generationOf } from '../src/clients/credentials.js';
import { ShimTokens } from '../src/serving.js';
import { ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import type { FakeUpstream } from './helpers/fake-upstream.js';
import { FakeUsageBackend } from './helpers/fake-usage.js';
import { findLeaks } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';
import { waitFor } from './helpers/wait.js';

const CLIENT_ID = 'app_EMoamEEZ73f0CkXaXp7hrann';
const FLOOR_S = 600;
const DAY_S = 86_400;

/** Every client secret minted in this file (bearer tokens, refresh credentials), for the leak scan. */
const clientSecrets: string[] = [];

const suite = useSuite();
const { apps, upstreams } = suite;
const backends: FakeUsageBackend[] = [];
after(async () => {
  for (const b of backends) await b.close();
});

/** A fake clock on whole seconds, shared by the upstream (iat/exp) and the broker. */
class Clock {
  ms = Date.UTC(2030, 0, 1, 12, 0, 0);
  readonly now = (): number => this.ms;
  advance(seconds: number): void {
    this.ms += seconds * 1000;
  }
}

interface Caller {
  name: string;
  token: string;
  refreshCredential: string;
}

interface Doc {
  tokens: { access_token: string; id_token: string; refresh_token: string; account_id: string };
  last_refresh: string;
}

interface Fleet {
  clock: Clock;
  upstream: FakeUpstream;
  /** The backend the broker verifies a reported rejection with: by default it rejects every token, as when a login is revoked. */
  backend: FakeUsageBackend;
  replicas: TestApp[];
  callers: Caller[];
  seed: Record<string, unknown>;
}


const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };

/**
 * `replicas` apps on one fresh database (they share its encryption key), one fake upstream,
 * a seeded login and `clients` clients, every replica holding both.
 */
async function fleet(o: { replicas?: number; clients?: number; floorSeconds?: number } = {}): Promise<Fleet> {
  const clock = new Clock();
  const upstream = await suite.upstream({ now: clock.now });
  const backend = await FakeUsageBackend.start();
  backends.push(backend);
  backend.answer = 'reject';
  const databaseUrl = await suite.pg.newDatabase();
  const replicas: TestApp[] = [];
  for (let i = 0; i < (o.replicas ?? 1); i++) {
    const t = await suite.app({
      databaseUrl,
      upstreamUrl: upstream.url,
      now: clock.now,
      floorSeconds: o.floorSeconds ?? FLOOR_S,
      config: { CHATGPT_BASE_URL: backend.url },
    });
    replicas.push(t);
  }
  const first = replicas[0]!;
  const seed = upstream.seed();
  const put = await first.app.inject({ method: 'PUT', url: '/admin/credential', headers: admin, payload: seed });
  assert.equal(put.statusCode, 200, put.body);
  const callers: Caller[] = [];
  for (let i = 0; i < (o.clients ?? 1); i++) {
    const res = await first.app.inject({ method: 'POST', url: '/admin/clients', headers: admin, payload: { name: `ws-${i}` } });
    assert.equal(res.statusCode, 201, res.body);
    const c = res.json() as { token: string; refreshCredential: string };
    callers.push({ name: `ws-${i}`, token: c.token, refreshCredential: c.refreshCredential });
    clientSecrets.push(c.token, c.refreshCredential);
  }
  const seededAt = (seed['tokens'] as Record<string, string>)['access_token'];
  await waitFor('every replica to hold the seed and every client', () =>
    replicas.every((r) => r.core.refresher.current()?.parsed.tokens.access_token === seededAt && r.core.clients.size === callers.length),
  );
  // Let the change notifications' reload + check settle (a fresh seed: no POST).
  await sleep(50);
  await Promise.all(replicas.map((r) => r.core.refresher.inflight));
  assert.equal(upstream.posts, 0, 'a fresh seed is not refreshed');
  return { clock, upstream, backend, replicas, callers, seed };
}

async function fetchDoc(t: TestApp, c: Caller): Promise<Doc> {
  const res = await t.app.inject({ method: 'GET', url: '/codex-auth', headers: { authorization: `Bearer ${c.token}` } });
  assert.equal(res.statusCode, 200, res.body);
  return res.json() as Doc;
}

/** The refresh request exactly as codex 0.169.0 sends it. */
function codexBody(refreshToken: string, reason: string | null = 'unauthorized_recovery'): Record<string, string> {
  return {
    client_id: CLIENT_ID,
    grant_type: 'refresh_token',
    ...(reason !== null ? { refresh_reason: reason } : {}),
    refresh_token: refreshToken,
  };
}

async function shim(t: TestApp, body: unknown, headers: Record<string, string> = {}) {
  return t.app.inject({ method: 'POST', url: '/oauth/token', payload: body as Record<string, unknown>, headers });
}

interface TokenAnswer {
  access_token: string;
  id_token?: string;
  refresh_token: string;
  token_type: string;
  expires_in: number;
}

function assertUpstreamShapedError(res: { statusCode: number; headers: Record<string, unknown>; body: string }, status: number, code?: string): void {
  assert.equal(res.statusCode, status, res.body);
  const ct = String(res.headers['content-type']);
  assert.match(ct, /^application\/json/, `content-type ${ct}: ${res.body}`);
  assert.doesNotMatch(ct, /problem/);
  const body = JSON.parse(res.body) as { error?: { code?: unknown; message?: unknown; type?: unknown } };
  assert.equal(typeof body.error, 'object', res.body);
  assert.equal(typeof body.error?.message, 'string', res.body);
  assert.equal(typeof body.error?.type, 'string', res.body);
  if (code !== undefined) assert.equal(body.error?.code, code, res.body);
  else assert.equal(typeof body.error?.code, 'string', res.body);
}

describe('POST /oauth/token (refresh shim)', () => {
  test('a stale caller gets the current token with no upstream call', async () => {
    const f = await fleet();
    const t = f.replicas[0]!;
    const caller = f.callers[0]!;
    const old = await fetchDoc(t, caller);
    assert.equal(old.tokens.refresh_token, `${caller.refreshCredential}.${generationOf(old.tokens.access_token)}`);

    // The broker rotates by itself: 9.5 days into a 10-day token, inside the 1-day margin.
    f.clock.advance(9.5 * DAY_S);
    const report = await t.core.refresher.runCycle();
    assert.ok(report.attempt === 'rotated' || report.joined, JSON.stringify(report));
    assert.equal(f.upstream.posts, 1);
    const fresh = f.upstream.lastAccessToken()!;
    assert.notEqual(fresh, old.tokens.access_token);
    const current = await fetchDoc(t, caller);
    assert.equal(current.tokens.access_token, fresh);

    const res = await shim(t, codexBody(old.tokens.refresh_token));
    assert.equal(res.statusCode, 200, res.body);
    assert.match(String(res.headers['content-type']), /^application\/json/);
    assert.equal(res.headers['cache-control'], 'no-store');
    const a = res.json() as TokenAnswer;
    assert.equal(a.access_token, fresh, 'the NEW access token');
    assert.equal(a.id_token, current.tokens.id_token);
    assert.equal(a.refresh_token, `${caller.refreshCredential}.${generationOf(fresh)}`);
    assert.equal(a.refresh_token, current.tokens.refresh_token, 'the same refresh token a fresh GET /codex-auth serves');
    assert.equal(a.token_type, 'Bearer');
    assert.ok(Number.isInteger(a.expires_in) && a.expires_in > 0 && a.expires_in <= 864_000, `expires_in ${a.expires_in}`);
    assert.equal(res.body, JSON.stringify(a), 'the bytes JSON.stringify makes of the answer');
    assert.equal(f.upstream.posts, 1, 'no upstream call for a stale caller');
    assert.equal(f.upstream.reuseAnswers, 0);
    assert.ok(!res.body.includes(f.upstream.currentRefreshToken()!), 'the upstream refresh token is never served');
  });

  test('a caller holding the current token with unauthorized_recovery past the floor forces one refresh', async () => {
    const f = await fleet();
    const t = f.replicas[0]!;
    const caller = f.callers[0]!;
    const doc = await fetchDoc(t, caller);
    f.clock.advance(FLOOR_S + 1); // the token is still fresh (10-day lifetime); only the floor has passed

    const res = await shim(t, codexBody(doc.tokens.refresh_token));
    assert.equal(res.statusCode, 200, res.body);
    const a = res.json() as TokenAnswer;
    assert.equal(f.upstream.posts, 1, 'exactly one forced refresh');
    assert.equal(f.upstream.rotations, 1);
    assert.equal(f.upstream.reuseAnswers, 0);
    const fresh = f.upstream.lastAccessToken()!;
    assert.notEqual(fresh, doc.tokens.access_token);
    assert.equal(a.access_token, fresh, 'the answer carries the new token');
    assert.equal(a.refresh_token, `${caller.refreshCredential}.${generationOf(fresh)}`);
    assert.equal(a.expires_in, 864_000);
    const rotation = t.logs.withEvent('rotation');
    assert.equal(rotation.length, 1);
    assert.equal(rotation[0]!['reason'], 'shim_unauthorized_recovery');

    // The caller now holds the new token and reports it rejected again, inside the floor: no POST.
    const again = await shim(t, codexBody(a.refresh_token));
    assert.equal(again.statusCode, 200, again.body);
    assert.equal((again.json() as TokenAnswer).access_token, fresh);
    assert.equal(f.upstream.posts, 1, 'a second rejection within the floor costs nothing');
  });

  test('within the floor a caller holding the current token gets it back with no upstream call', async () => {
    const f = await fleet();
    const t = f.replicas[0]!;
    const caller = f.callers[0]!;
    const doc = await fetchDoc(t, caller);
    f.clock.advance(FLOOR_S - 1);
    for (let i = 0; i < 3; i++) {
      const res = await shim(t, codexBody(doc.tokens.refresh_token));
      assert.equal(res.statusCode, 200, res.body);
      const a = res.json() as TokenAnswer;
      assert.equal(a.access_token, doc.tokens.access_token);
      assert.equal(a.refresh_token, doc.tokens.refresh_token);
      assert.equal(a.id_token, doc.tokens.id_token);
    }
    assert.equal(f.upstream.posts, 0);
  });

  test('without refresh_reason=unauthorized_recovery a caller holding a fresh current token causes no refresh', async () => {
    const f = await fleet();
    const t = f.replicas[0]!;
    const caller = f.callers[0]!;
    const doc = await fetchDoc(t, caller);
    f.clock.advance(FLOOR_S + 1); // past the floor: only the missing reason keeps the upstream quiet
    for (const reason of [null, 'proactive_expiry', 'stale_token', '']) {
      const res = await shim(t, codexBody(doc.tokens.refresh_token, reason));
      assert.equal(res.statusCode, 200, `${String(reason)}: ${res.body}`);
      assert.equal((res.json() as TokenAnswer).access_token, doc.tokens.access_token, String(reason));
    }
    assert.equal(f.upstream.posts, 0);
  });

  test('accepts JSON and form bodies as codex sends them', async () => {
    const f = await fleet();
    const t = f.replicas[0]!;
    const caller = f.callers[0]!;
    const doc = await fetchDoc(t, caller);
    const body = codexBody(doc.tokens.refresh_token);
    const variants: Array<{ name: string; payload: string; type: string }> = [
      { name: 'JSON (codex)', payload: JSON.stringify(body), type: 'application/json' },
      { name: 'JSON with charset', payload: JSON.stringify(body), type: 'application/json; charset=utf-8' },
      { name: 'form', payload: new URLSearchParams(body).toString(), type: 'application/x-www-form-urlencoded' },
      { name: 'form with charset', payload: new URLSearchParams(body).toString(), type: 'application/x-www-form-urlencoded; charset=UTF-8' },
    ];
    for (const v of variants) {
      const res = await t.app.inject({ method: 'POST', url: '/oauth/token', payload: v.payload, headers: { 'content-type': v.type } });
      assert.equal(res.statusCode, 200, `${v.name}: ${res.body}`);
      const a = res.json() as TokenAnswer;
      assert.equal(a.access_token, doc.tokens.access_token, v.name);
      assert.equal(a.refresh_token, doc.tokens.refresh_token, v.name);
      assert.equal(a.token_type, 'Bearer', v.name);
    }
    assert.equal(f.upstream.posts, 0);
  });

  test('400 for a malformed body or another grant_type', async () => {
    const f = await fleet();
    const t = f.replicas[0]!;
    const doc = await fetchDoc(t, f.callers[0]!);
    const rt = doc.tokens.refresh_token;
    const cases: Array<{ name: string; payload: string; type?: string; code?: string }> = [
      { name: 'truncated JSON', payload: '{"grant_type":"refresh_token","refresh_token":', type: 'application/json', code: 'invalid_request' },
      { name: 'empty JSON body', payload: '', type: 'application/json', code: 'invalid_request' },
      { name: 'unsupported media type', payload: '<grant_type>refresh_token</grant_type>', type: 'application/xml', code: 'invalid_request' },
      { name: 'no content-type', payload: JSON.stringify(codexBody(rt)), code: 'invalid_request' },
      { name: 'over the 1 MiB body limit', payload: JSON.stringify({ ...codexBody(rt), pad: 'x'.repeat(1024 * 1024) }), type: 'application/json', code: 'invalid_request' },
      { name: 'JSON array', payload: '[]', type: 'application/json', code: 'invalid_request' },
      { name: 'JSON string', payload: '"refresh_token"', type: 'application/json', code: 'invalid_request' },
      { name: 'JSON null', payload: 'null', type: 'application/json', code: 'invalid_request' },
      { name: 'text body', payload: `grant_type=refresh_token&refresh_token=${rt}`, type: 'text/plain', code: 'invalid_request' },
      { name: 'authorization_code grant', payload: JSON.stringify({ client_id: CLIENT_ID, grant_type: 'authorization_code', code: 'x', refresh_token: rt }), type: 'application/json', code: 'unsupported_grant_type' },
      { name: 'no grant_type', payload: JSON.stringify({ client_id: CLIENT_ID, refresh_token: rt }), type: 'application/json', code: 'unsupported_grant_type' },
      { name: 'form, client_credentials', payload: `grant_type=client_credentials&refresh_token=${encodeURIComponent(rt)}`, type: 'application/x-www-form-urlencoded', code: 'unsupported_grant_type' },
      { name: 'no refresh_token', payload: JSON.stringify({ client_id: CLIENT_ID, grant_type: 'refresh_token' }), type: 'application/json', code: 'invalid_request' },
      { name: 'empty refresh_token', payload: JSON.stringify({ client_id: CLIENT_ID, grant_type: 'refresh_token', refresh_token: '' }), type: 'application/json', code: 'invalid_request' },
      { name: 'numeric refresh_token', payload: JSON.stringify({ client_id: CLIENT_ID, grant_type: 'refresh_token', refresh_token: 42 }), type: 'application/json', code: 'invalid_request' },
    ];
    for (const c of cases) {
      const res = await t.app.inject({ method: 'POST', url: '/oauth/token', payload: c.payload, headers: c.type ? { 'content-type': c.type } : {} });
      assert.equal(res.statusCode, 400, `${c.name}: ${res.statusCode} ${res.body}`);
      assertUpstreamShapedError(res, 400, c.code);
    }
    assert.equal(f.upstream.posts, 0);
  });

  test('401 refresh_token_invalidated for an unknown or revoked credential', async () => {
    const f = await fleet({ clients: 2 });
    const t = f.replicas[0]!;
    const [kept, revoked] = f.callers as [Caller, Caller];
    const keptDoc = await fetchDoc(t, kept);
    const revokedDoc = await fetchDoc(t, revoked);
    const gen = generationOf(keptDoc.tokens.access_token);
    const del = await t.app.inject({ method: 'DELETE', url: `/admin/clients/${revoked.name}`, headers: admin });
    assert.equal(del.statusCode, 204, del.body);

    const cases: Array<[string, string]> = [
      ['revoked client', revokedDoc.tokens.refresh_token],
      ['revoked client, bare credential', revoked.refreshCredential],
      ['unknown credential', `cabrt_${'A'.repeat(43)}.${gen}`],
      ['garbage', 'not-a-broker-credential'],
      ['a client bearer token', kept.token],
      ['the real upstream refresh token', String((f.seed['tokens'] as Record<string, string>)['refresh_token'])],
      ['a kept credential with a tampered tag', `${kept.refreshCredential.slice(0, -2)}xx.${gen}`],
    ];
    for (const [name, rt] of cases) {
      const res = await shim(t, codexBody(rt));
      assertUpstreamShapedError(res, 401, 'refresh_token_invalidated');
      assert.ok(!res.body.includes(rt), `${name}: the presented token is not echoed`);
    }
    // The surviving client is unaffected.
    const ok = await shim(t, codexBody(keptDoc.tokens.refresh_token));
    assert.equal(ok.statusCode, 200, ok.body);
    assert.equal(f.upstream.posts, 0);
  });

  test("401 with the upstream's code when the credential is latched upstream and the access token has expired", async () => {
    const f = await fleet();
    const t = f.replicas[0]!;
    const doc = await fetchDoc(t, f.callers[0]!);
    // The upstream refuses the refresh token for good (a reuse elsewhere, an expired login).
    f.upstream.fault({
      kind: 'status',
      status: 401,
      body: { error: { message: 'Your refresh token has expired.', type: 'invalid_request_error', code: 'refresh_token_expired' } },
    });
    const refresh = await t.app.inject({ method: 'POST', url: '/admin/refresh', headers: admin });
    assert.equal(refresh.statusCode, 200, refresh.body);
    assert.equal(f.upstream.posts, 1);
    const latch = t.core.refresher.status().latch;
    assert.ok(latch, 'latched');
    assert.equal(latch.upstreamCode, 'refresh_token_expired');

    // Latched but unexpired: still the best the fleet has, served without another POST.
    f.clock.advance(FLOOR_S + 1);
    const before = await shim(t, codexBody(doc.tokens.refresh_token));
    assert.equal(before.statusCode, 200, before.body);
    assert.equal((before.json() as TokenAnswer).access_token, doc.tokens.access_token);

    f.clock.advance(11 * DAY_S); // the access token has expired
    for (const [name, rt, reason] of [
      ['current holder, unauthorized_recovery', doc.tokens.refresh_token, 'unauthorized_recovery'],
      ['current holder, proactive', doc.tokens.refresh_token, 'proactive_expiry'],
      ['stale tag', `${f.callers[0]!.refreshCredential}.AAAAAAAAAAAA`, 'unauthorized_recovery'],
    ] as const) {
      const res = await shim(t, codexBody(rt, reason));
      assertUpstreamShapedError(res, 401, 'refresh_token_expired');
      assert.ok(!res.body.includes(doc.tokens.access_token), name);
    }
    assert.equal(f.upstream.posts, 1, 'a latched refresh token is never sent again');
    assert.equal(f.upstream.reuseAnswers, 0);
  });

  test('503 when there is no unexpired token and the upstream is unreachable', async (t) => {
    await t.test('the upstream answers 503', async () => {
      const f = await fleet();
      const app = f.replicas[0]!;
      const doc = await fetchDoc(app, f.callers[0]!);
      for (let i = 0; i < 10; i++) f.upstream.fault({ kind: 'status', status: 503 });
      f.clock.advance(11 * DAY_S);
      for (const reason of ['unauthorized_recovery', 'proactive_expiry']) {
        const res = await shim(app, codexBody(doc.tokens.refresh_token, reason));
        assertUpstreamShapedError(res, 503, 'temporarily_unavailable');
        assert.ok(res.headers['retry-after'], 'Retry-After');
      }
      assert.ok(f.upstream.posts >= 1, 'the broker tried the upstream');
      assert.ok(f.upstream.posts <= 2, `at most one POST per backoff step: ${f.upstream.posts}`);
      assert.equal(f.upstream.rotations, 0);
    });

    await t.test('the upstream is down (connection refused)', async () => {
      const f = await fleet();
      const app = f.replicas[0]!;
      const doc = await fetchDoc(app, f.callers[0]!);
      await f.upstream.close();
      f.clock.advance(11 * DAY_S);
      const res = await shim(app, codexBody(doc.tokens.refresh_token));
      assertUpstreamShapedError(res, 503, 'temporarily_unavailable');
      assert.ok(res.headers['retry-after'], 'Retry-After');
      const stale = await shim(app, codexBody(`${f.callers[0]!.refreshCredential}.AAAAAAAAAAAA`));
      assertUpstreamShapedError(stale, 503, 'temporarily_unavailable');
      assert.equal(app.core.refresher.status().lastError?.code, 'upstream_transient');
    });
  });
});

describe('forced refreshes are verified against the backend (Hardening)', () => {
  /** n concurrent unauthorized_recovery calls from callers holding the current token. */
  async function reportRejected(f: Fleet, n: number, t = f.replicas[0]!): Promise<TokenAnswer[]> {
    const doc = await fetchDoc(t, f.callers[0]!);
    const answers = await Promise.all(Array.from({ length: n }, () => shim(t, codexBody(doc.tokens.refresh_token))));
    for (const r of answers) assert.equal(r.statusCode, 200, r.body);
    return answers.map((r) => r.json() as TokenAnswer);
  }

  test('100 unauthorized_recovery calls with a token the backend accepts cost 0 upstream POSTs and get the current token back', async () => {
    const f = await fleet();
    f.backend.answer = 'accept';
    const held = f.replicas[0]!.core.refresher.current()!.parsed.tokens.access_token;
    f.clock.advance(FLOOR_S + 1);
    const answers = await reportRejected(f, 100);
    assert.equal(f.upstream.posts, 0, 'no rotation for a token the backend accepts');
    for (const a of answers) assert.equal(a.access_token, held);
    assert.equal(f.backend.gets, 1, 'one shared backend check for the whole burst');
    const checks = await f.replicas[0]!.metrics.tokenChecks.get();
    assert.equal(checks.values.find((v) => v.labels['verdict'] === 'accepted')?.value, 1);
    assert.equal(f.replicas[0]!.logs.withEvent('token_check')[0]?.['verdict'], 'accepted');
  });

  test('100 unauthorized_recovery calls with a token the backend truly rejects cost exactly 1 upstream POST', async () => {
    const f = await fleet();
    const held = f.replicas[0]!.core.refresher.current()!.parsed.tokens.access_token;
    f.clock.advance(FLOOR_S + 1);
    const answers = await reportRejected(f, 100);
    assert.equal(f.upstream.posts, 1);
    assert.equal(f.upstream.rotations, 1);
    assert.equal(f.upstream.reuseAnswers, 0);
    const fresh = f.upstream.lastAccessToken()!;
    for (const a of answers) assert.equal(a.access_token, fresh);
    assert.equal(f.backend.seen[0]?.bearer, held, 'the backend was asked about the token the callers hold');
    assert.equal(f.backend.seen[0]?.accountId, f.replicas[0]!.core.refresher.current()!.account.accountId, 'with the account id');
    assert.ok(f.backend.seen[0]?.accountId, 'the seed carries an account id');
  });

  test('a backend that cannot answer (5xx, down) forces nothing and the caller keeps the current token', async () => {
    const f = await fleet();
    const held = f.replicas[0]!.core.refresher.current()!.parsed.tokens.access_token;
    f.clock.advance(FLOOR_S + 1);
    f.backend.answer = 'error';
    for (const a of await reportRejected(f, 10)) assert.equal(a.access_token, held);
    assert.equal(f.upstream.posts, 0, 'a 502 is no proof of rejection');
    await f.backend.close();
    f.clock.advance(120); // past the verdict's reuse window: the next report asks again
    for (const a of await reportRejected(f, 10)) assert.equal(a.access_token, held);
    assert.equal(f.upstream.posts, 0, 'an unreachable backend is no proof of rejection');
    const unknown = f.replicas[0]!.logs.withEvent('token_check').filter((e) => e['verdict'] === 'unknown');
    assert.equal(unknown.length, 2, 'each failed check is logged once');
    assert.match(String(unknown[1]!['detail']), /127\.0\.0\.1:\d+: (ECONNREFUSED|UND_ERR_SOCKET)/, 'names the host and the cause');
  });

  test('within the floor the backend is not even asked', async () => {
    const f = await fleet();
    f.clock.advance(FLOOR_S - 1);
    await reportRejected(f, 5);
    assert.equal(f.backend.gets, 0);
    assert.equal(f.upstream.posts, 0);
  });

  test('the forced-refresh floor holds without last_refresh: a document stored without it is not rotated again within the floor', async () => {
    const f = await fleet({ replicas: 2 });
    const [a, b] = f.replicas as [TestApp, TestApp];
    f.clock.advance(FLOOR_S + 1);
    await reportRejected(f, 1, a);
    assert.equal(f.upstream.posts, 1, 'the first forced refresh');
    // The stored document loses its last_refresh (an operator re-stores it without one).
    const stored = JSON.parse(a.core.refresher.current()!.plaintext) as Record<string, unknown>;
    delete stored['last_refresh'];
    const put = await a.app.inject({ method: 'PUT', url: '/admin/credential', headers: admin, payload: stored });
    assert.equal(put.statusCode, 200, put.body);
    await waitFor('replica b to hold the document without last_refresh', () => b.core.refresher.current()?.lastRefreshMs === undefined);
    // b has rotated nothing itself and the document names no rotation: only the audit knows.
    await reportRejected(f, 20, b);
    assert.equal(f.upstream.posts, 1, 'no second forced refresh within the floor');
    assert.equal(f.upstream.reuseAnswers, 0);
  });
});

describe('STORM: 1,000 concurrent refreshes against 3 replicas', () => {
  const CLIENTS = 10;
  const PER_CLIENT = 100;
  const REPLICAS = 3;
  let f: Fleet;
  let held: Doc[] = [];

  before(async () => {
    f = await fleet({ replicas: REPLICAS, clients: CLIENTS, floorSeconds: FLOOR_S });
    // Every client holds the current document, fetched from any replica.
    held = await Promise.all(f.callers.map((c, i) => fetchDoc(f.replicas[i % REPLICAS]!, c)));
    const gen = generationOf(held[0]!.tokens.access_token);
    for (const [i, d] of held.entries()) assert.equal(d.tokens.refresh_token, `${f.callers[i]!.refreshCredential}.${gen}`);
  });

  async function checkCounts(t: TestApp): Promise<Record<string, number>> {
    const m = await t.metrics.refreshChecks.get();
    return Object.fromEntries(m.values.map((v) => [String(v.labels['result']), v.value]));
  }

  /** 1,000 calls, client i % 10, replica i % 3, all in flight at once. */
  async function burst(refreshTokenOf: (i: number) => string) {
    const started = performance.now();
    const results = await Promise.all(
      Array.from({ length: CLIENTS * PER_CLIENT }, (_, i) =>
        f.replicas[i % REPLICAS]!.app.inject({ method: 'POST', url: '/oauth/token', payload: codexBody(refreshTokenOf(i)) }),
      ),
    );
    return { results, ms: performance.now() - started };
  }

  test('1,000 concurrent unauthorized_recovery calls from callers holding the current token against 3 replicas cost exactly one upstream POST and all get the new access token', async () => {
    f.clock.advance(FLOOR_S + 1); // the floor has passed: a rejected current token may force a refresh
    // The upstream takes 250 ms to answer, so the whole burst lands while the one refresh is
    // in flight: every replica's forced cycle contends for the advisory lock.
    f.upstream.fault({ kind: 'delay', ms: 250 });
    const postsBefore = f.upstream.posts;
    const checksBefore = await Promise.all(f.replicas.map((r) => checkCounts(r)));
    const { results, ms } = await burst((i) => held[i % CLIENTS]!.tokens.refresh_token);
    const fresh = f.upstream.lastAccessToken()!;
    const statuses = new Map<number, number>();
    for (const r of results) statuses.set(r.statusCode, (statuses.get(r.statusCode) ?? 0) + 1);
    const rotationsBy = f.replicas.map((r) => r.logs.withEvent('rotation').length);
    const checksAfter = await Promise.all(f.replicas.map((r) => checkCounts(r)));
    const cycles = checksAfter.map((a, i) => Object.entries(a).filter(([k, v]) => v - (checksBefore[i]![k] ?? 0) > 0).map(([k, v]) => `${k}:${v - (checksBefore[i]![k] ?? 0)}`).join(','));
    console.log(
      `storm (current holders): ${results.length} calls over ${REPLICAS} replicas in ${ms.toFixed(0)} ms (upstream answers after 250 ms); ` +
        `upstream POSTs ${f.upstream.posts - postsBefore} (total ${f.upstream.posts}), rotations ${f.upstream.rotations}, reuse answers ${f.upstream.reuseAnswers}; ` +
        `statuses ${JSON.stringify(Object.fromEntries(statuses))}; rotation log lines by replica ${rotationsBy.join('/')}; refresh checks by replica ${cycles.map((c) => `[${c}]`).join(' ')}`,
    );
    // Every replica ran its own (shared, single-flight) forced cycle and did not POST.
    for (const [i, c] of cycles.entries()) assert.ok(c !== '', `replica ${i} ran a refresh check`);
    assert.equal(f.upstream.posts, 1, 'exactly one upstream POST');
    assert.equal(f.upstream.rotations, 1);
    assert.equal(f.upstream.reuseAnswers, 0);
    assert.notEqual(fresh, held[0]!.tokens.access_token);
    const gen = generationOf(fresh);
    for (const [i, r] of results.entries()) {
      assert.equal(r.statusCode, 200, `call ${i}: ${r.body}`);
      const a = r.json() as TokenAnswer;
      assert.equal(a.access_token, fresh, `call ${i} got the new access token`);
      assert.equal(a.refresh_token, `${f.callers[i % CLIENTS]!.refreshCredential}.${gen}`, `call ${i}`);
    }
    assert.equal(rotationsBy.reduce((a, b) => a + b, 0), 1, 'one rotation across the fleet');
    // Every replica serves the rotation.
    await waitFor('every replica to hold the new token', () => f.replicas.every((r) => r.core.refresher.current()?.parsed.tokens.access_token === fresh));
  });

  test('the same burst from stale callers costs zero upstream POSTs', async () => {
    const postsBefore = f.upstream.posts;
    assert.equal(postsBefore, 1, 'runs after the storm');
    const fresh = f.upstream.lastAccessToken()!;
    // Still presenting the pre-rotation refresh token, reporting it rejected.
    const { results, ms } = await burst((i) => held[i % CLIENTS]!.tokens.refresh_token);
    console.log(
      `storm (stale holders): ${results.length} calls over ${REPLICAS} replicas in ${ms.toFixed(0)} ms; upstream POSTs ${f.upstream.posts - postsBefore} (total ${f.upstream.posts}), reuse answers ${f.upstream.reuseAnswers}`,
    );
    assert.equal(f.upstream.posts, postsBefore, 'zero upstream POSTs');
    assert.equal(f.upstream.reuseAnswers, 0);
    for (const [i, r] of results.entries()) {
      assert.equal(r.statusCode, 200, `call ${i}: ${r.body}`);
      assert.equal((r.json() as TokenAnswer).access_token, fresh, `call ${i}`);
    }
  });
});

test('the same storm during an upstream outage costs one upstream POST and every caller keeps the still-valid current token', async () => {
  const f = await fleet({ replicas: 3, clients: 10 });
  const held = await Promise.all(f.callers.map((c, i) => fetchDoc(f.replicas[i % 3]!, c)));
  f.clock.advance(FLOOR_S + 1);
  for (let i = 0; i < 5; i++) f.upstream.fault({ kind: 'status', status: 503, headers: { 'retry-after': '120' } });
  const started = performance.now();
  const results = await Promise.all(
    Array.from({ length: 1_000 }, (_, i) => f.replicas[i % 3]!.app.inject({ method: 'POST', url: '/oauth/token', payload: codexBody(held[i % 10]!.tokens.refresh_token) })),
  );
  const ms = performance.now() - started;
  console.log(`storm during an upstream outage: ${results.length} calls over 3 replicas in ${ms.toFixed(0)} ms; upstream POSTs ${f.upstream.posts}, rotations ${f.upstream.rotations}`);
  assert.equal(f.upstream.posts, 1, 'one POST per backoff step, fleet-wide');
  assert.equal(f.upstream.rotations, 0);
  for (const [i, r] of results.entries()) {
    assert.equal(r.statusCode, 200, `call ${i}: ${r.body}`);
    assert.equal((r.json() as TokenAnswer).access_token, held[0]!.tokens.access_token, `call ${i}`);
  }
});

test("the shim's answer is byte for byte JSON.stringify of its fields, with and without an id_token, whatever they hold; its content-length is counted without measuring it", () => {
  const credential = 'cabrt_AbC-_09xyzAbC-_09xyzAbC-_09xyzAbC-_09xy';
  for (const idToken of [undefined, '', 'eyJ.a.b', 'quote " backslash \\ newline \n tab \t nul \u0000 é 😀 \u2028']) {
    for (const accessToken of ['eyJhbGciOiJIUzI1NiJ9.e30.sig', '"<\\>"\u007f']) {
      const t = new ShimTokens(accessToken, idToken, 1_800_000_000, 'Gen-_123');
      for (const expiresIn of [0, 1, 863_999]) {
        const expected = JSON.stringify({
          access_token: accessToken,
          ...(idToken ? { id_token: idToken } : {}),
          refresh_token: `${credential}.Gen-_123`,
          token_type: 'Bearer',
          expires_in: expiresIn,
        });
        assert.equal(t.answer(credential, String(expiresIn)), expected);
        assert.equal(t.answerBytes(credential, String(expiresIn)), Buffer.byteLength(expected));
      }
    }
  }
});

test('no token, client secret or refresh credential reaches any log', () => {
  const secrets = [...upstreams.flatMap((u) => u.issuedTokens()), ...clientSecrets, ADMIN_TOKEN];
  const lines = apps.flatMap((a) => a.logs.lines);
  assert.ok(lines.length > 0, 'the apps logged something');
  assert.ok(secrets.length > 0);
  assert.deepEqual(findLeaks(lines, secrets), []);
});
