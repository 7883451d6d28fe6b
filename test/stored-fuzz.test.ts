import { strict as assert } from 'node:assert';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import type { InjectOptions } from 'fastify';
import { ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import type { FakeUpstream } from './helpers/fake-upstream.js';
import { prng } from './helpers/fuzz.js';
import { useSuite } from './helpers/suite.js';

/**
 * Whatever the stored row holds (the platform, an old refresher or a person may have
 * written it; no seed validation saw it), no route answers 500. Documents are written
 * straight through SecretStore.put, then every route is hit on two apps sharing the
 * database (exposure proxy and omit), which also must never serve the refresh token.
 */

const KEY = 'CODEX_AUTH_JSON';
const SEED = 0x570_4ed;
const DOCUMENTS = 240;
const suite = useSuite();

type Obj = Record<string, unknown>;
const b64url = (s: string) => Buffer.from(s).toString('base64url');
const jwt = (payload: unknown) => `${b64url('{"alg":"RS256","typ":"JWT"}')}.${b64url(typeof payload === 'string' ? payload : JSON.stringify(payload))}.${b64url('sig')}`;

function generator(rand: () => number, upstream: FakeUpstream) {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
  const int = (n: number) => Math.floor(rand() * n);
  const oddTimes = [1e13, -1, -1e13, 0, 4_102_444_801, 1e308, Number.MAX_SAFE_INTEGER, 1.5, 'NaN', 'Infinity', '1900000000', null, true, [1], { n: 1 }, 1_700_000_000, 1_900_000_000];
  const oddDates = ['+275760-09-13T00:00:00.000Z', '-271821-04-20T00:00:00.000Z', '2200-01-01T00:00:00Z', 'not a date', '', 12, null, '1969-01-01T00:00:00Z', '2025-01-01T00:00:00Z'];
  const unicode = ['ü∆😀', '\u0000', '\u2028\u2029', '\ud800', '\uffff', 'ｔｏｋｅｎｓ', 'ا'];
  const junk = (depth: number): unknown => {
    const r = rand();
    if (depth > 5 || r < 0.4) return pick<unknown>([int(1e9), rand(), true, null, pick(unicode), `s${int(99)}`, '']);
    if (r < 0.7) return Array.from({ length: int(4) }, () => junk(depth + 1));
    const o: Obj = {};
    for (let i = int(4); i > 0; i--) Object.defineProperty(o, pick(['x', 'refresh_token', 'tokens', '__proto__', 'constructor', ...unicode]), { value: junk(depth + 1), enumerable: true, writable: true, configurable: true });
    return o;
  };
  const deep = (n: number): unknown => {
    let v: unknown = 'bottom';
    for (let i = 0; i < n; i++) v = rand() < 0.5 ? [v] : { d: v };
    return v;
  };
  /** A real login from the fake upstream, then broken or padded in one or two places. */
  const mutated = (): { text: string; rt?: string } => {
    const doc = upstream.seed({ flat: rand() < 0.2 }) as Obj;
    const tokens = (doc['tokens'] ?? doc) as Obj;
    const rt = tokens['refresh_token'] as string;
    const mutations = 1 + int(3);
    for (let m = 0; m < mutations; m++) {
      switch (int(12)) {
        case 0:
          tokens['access_token'] = jwt({ exp: pick(oddTimes), iat: pick(oddTimes) });
          break;
        case 1:
          tokens['id_token'] = jwt({ exp: pick(oddTimes), iat: pick(oddTimes), email: pick(unicode) });
          break;
        case 2:
          tokens['access_token'] = pick<unknown>([jwt('not json'), jwt('[1]'), jwt('null'), 'a.b.c', 'opaque', '', 12, null, ['x']]);
          break;
        case 3:
          delete tokens[pick(['access_token', 'refresh_token', 'id_token', 'account_id'])];
          break;
        case 4:
          doc['last_refresh'] = pick(oddDates);
          break;
        case 5:
          if (doc['tokens']) doc['tokens'] = pick<unknown>([[tokens], 'tokens', 7, null, {}]);
          break;
        case 6:
          doc[pick(['extra', ...unicode])] = junk(0);
          break;
        case 7:
          // Copies of the refresh token where codex never looks.
          doc['refresh_token'] = rt;
          doc['history'] = [{ note: `old file had ${rt} in it` }, rt];
          (doc['nested'] ??= {}) as Obj;
          (doc['nested'] as Obj)['deeper'] = { again: rt, [`key-${rt}`]: 1 };
          break;
        case 8:
          doc['padding'] = 'p'.repeat(int(3) === 0 ? 1024 * 1024 - 2048 : 4096);
          break;
        case 9:
          doc['deep'] = deep(pick([10, 70, 2000]));
          break;
        case 10:
          tokens['account_id'] = pick<unknown>([5, null, ['a'], { a: 1 }, pick(unicode)]);
          break;
        default:
          tokens['refresh_token'] = pick<unknown>([12, null, '', ['rt'], { rt }]);
      }
    }
    return { text: JSON.stringify(doc), rt: typeof tokens['refresh_token'] === 'string' ? (tokens['refresh_token'] as string) : rt };
  };
  return (): { text: string; rt?: string } => {
    const r = rand();
    if (r < 0.08) return { text: pick(['', ' ', '{', 'null', '[]', '"str"', '12', 'NaN', '\u0000', '{"tokens":', '{"a":1}}', '\ud800']) };
    if (r < 0.14) return { text: JSON.stringify(junk(0)) };
    if (r < 0.18) return { text: `{"tokens":{"access_token":"${jwt({ exp: 1_900_000_000 })}"},"deep":${'['.repeat(200_000)}${']'.repeat(200_000)}}` };
    return mutated();
  };
}

test(`no route answers 500 for any of ${DOCUMENTS} seeded stored documents, and none serves the refresh token`, async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  // No refresh loop or listener: what each request sees follows from the seed alone.
  const proxy = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, exposure: 'proxy', start: false });
  const omit = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, exposure: 'omit', start: false });
  const ws = randomUUID();
  const created = await proxy.app.inject({ method: 'POST', url: '/admin/clients', headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, payload: { name: 'fuzz', workspaceId: ws } });
  assert.equal(created.statusCode, 201, created.body);
  const client = created.json<{ token: string; refreshCredential: string }>();
  await proxy.core.clients.reload();
  await omit.core.clients.reload();

  const asClient = { authorization: `Bearer ${client.token}` };
  const asAdmin = { authorization: `Bearer ${ADMIN_TOKEN}` };
  const served = new Set(['/codex-auth', `/workspaces/${ws}/secrets/values`, '/oauth/token']);
  const requests: InjectOptions[] = [
    { method: 'GET', url: '/codex-auth', headers: asClient },
    { method: 'GET', url: `/workspaces/${ws}/secrets/values`, headers: asClient },
    { method: 'GET', url: '/status', headers: asAdmin },
    { method: 'GET', url: '/status', headers: asClient },
    { method: 'GET', url: '/readyz' },
    { method: 'GET', url: '/healthz' },
    { method: 'GET', url: '/metrics' },
    { method: 'GET', url: '/admin/clients', headers: asAdmin },
    { method: 'GET', url: '/admin/events', headers: asAdmin },
    { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: client.refreshCredential } },
    { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: client.refreshCredential, refresh_reason: 'unauthorized_recovery' } },
  ];
  const adminRefresh: InjectOptions = { method: 'POST', url: '/admin/refresh', headers: asAdmin };

  console.log(`stored fuzz seed 0x${SEED.toString(16)} (${DOCUMENTS} documents)`);
  const gen = generator(prng(SEED), upstream);
  const tally: Record<string, number> = {};
  let checkedForToken = 0;
  for (let i = 0; i < DOCUMENTS; i++) {
    const { text } = gen();
    const where = `document #${i} (seed 0x${SEED.toString(16)}): ${text.slice(0, 200)}`;
    await proxy.core.store.put(KEY, text);
    await proxy.core.refresher.reload();
    await omit.core.refresher.reload();
    // Every 8th document is also refreshed by an operator (one upstream POST each).
    const batch = i % 8 === 0 ? [...requests, adminRefresh] : requests;
    for (const t of [proxy, omit] as TestApp[]) {
      for (const req of batch) {
        // The refresh token held when the request starts and when it ends (a forced refresh may rotate it).
        const before = t.core.refresher.current()?.parsed.tokens.refresh_token;
        const res = await t.app.inject(req);
        const after = t.core.refresher.current()?.parsed.tokens.refresh_token;
        const key = `${req.method} ${req.url === `/workspaces/${ws}/secrets/values` ? 'drop-in' : req.url} ${res.statusCode}`;
        tally[key] = (tally[key] ?? 0) + 1;
        assert.ok(res.statusCode < 500 || res.statusCode === 503, `${req.method} ${req.url} answered ${res.statusCode} ${res.body.slice(0, 300)} for ${where}`);
        assert.doesNotMatch(res.body, /internal_error|"code":"server_error"|Invalid time value/, `${req.method} ${req.url}: ${where}`);
        if (served.has(String(req.url)) && res.statusCode === 200) {
          for (const rt of new Set([before, after])) {
            if (rt === undefined || rt.length < 8) continue;
            checkedForToken++;
            assert.ok(!res.body.includes(rt) && !res.body.includes(JSON.stringify(rt).slice(1, -1)), `${req.url} served the refresh token for ${where}`);
          }
        }
      }
    }
  }
  const failed = suite.logLines().filter((l) => l.includes('"request_failed"'));
  assert.deepEqual(failed, [], 'no request failed inside a route');
  console.log(`stored fuzz: ${checkedForToken} served bodies searched for the refresh token; ${JSON.stringify(tally)}`);
  // The generator reaches both sides: documents served, and documents refused with a reason.
  assert.ok((tally['GET /codex-auth 200'] ?? 0) > 40, JSON.stringify(tally));
  assert.ok((tally['GET /codex-auth 503'] ?? 0) > 40, JSON.stringify(tally));
  assert.ok(checkedForToken > 200, `too few served bodies searched: ${checkedForToken}`);
});
