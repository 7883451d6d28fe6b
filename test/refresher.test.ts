import { strict as assert } from 'node:assert';
import { randomBytes } from 'node:crypto';
import { after, before, beforeEach, test, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { decodeJwt } from 'jose';
import pg from 'pg';
import type { SecretStore } from '../src/secret-store.js';
import { createUpstreamClient } from '../src/upstream.js';
import { createTestBroker, SECRET_KEY, type TestBroker, type TestBrokerOptions } from './helpers/broker.js';
import { DEFAULT_CLIENT_ID, FakeUpstream, TOKEN_PATH, type FakeUpstreamOptions, type SeedOptions } from './helpers/fake-upstream.js';
import { findLeaks, type LogCapture } from './helpers/logs.js';
import { startTestPostgres, type TestPostgres } from './helpers/pg.js';
import { waitFor } from './helpers/wait.js';

const SEC = 1_000;
const MIN = 60 * SEC;
const HOUR = 60 * MIN;
const DAY = 24 * HOUR;
const T0 = Date.UTC(2030, 0, 1, 12, 0, 0);

let nowMs = T0;
const now = (): number => nowMs;
const nowSec = (): number => Math.floor(nowMs / 1000);

/** Every log capture and fake upstream used in this file: the last test scans them all for leaks. */
const captures: LogCapture[] = [];
const upstreams: FakeUpstream[] = [];

let pgs: TestPostgres;

before(async () => {
  pgs = await startTestPostgres();
});

after(async () => {
  await pgs?.stop();
});

beforeEach(() => {
  nowMs = T0;
});

// ---- helpers ------------------------------------------------------------------

type Doc = Record<string, unknown>;
type Tokens = Record<string, string>;

interface Env {
  databaseUrl: string;
  upstream: FakeUpstream;
  broker: TestBroker;
}

type BrokerOpts = Partial<Omit<TestBrokerOptions, 'databaseUrl' | 'upstreamUrl'>>;

async function newUpstream(t: TestContext, o: FakeUpstreamOptions = {}): Promise<FakeUpstream> {
  const upstream = await FakeUpstream.start({ now, ...o });
  upstreams.push(upstream);
  t.after(() => upstream.close());
  return upstream;
}

async function newBroker(t: TestContext, databaseUrl: string, upstreamUrl: string, o: BrokerOpts = {}): Promise<TestBroker> {
  const broker = await createTestBroker({ databaseUrl, upstreamUrl, now, ...o });
  captures.push(broker.logs);
  t.after(() => broker.close());
  return broker;
}

async function setup(t: TestContext, o: { upstream?: FakeUpstreamOptions; broker?: BrokerOpts } = {}): Promise<Env> {
  const databaseUrl = await pgs.newDatabase();
  const upstream = await newUpstream(t, o.upstream);
  const broker = await newBroker(t, databaseUrl, upstream.url, o.broker);
  return { databaseUrl, upstream, broker };
}

/** A login whose access token lived 10 days and has 1 hour left: due under the default 1-day margin. */
function dueSeed(upstream: FakeUpstream, o: SeedOptions = {}): Doc {
  return upstream.seed({ iatSec: nowSec() - 10 * 86_400 + 3_600, expSec: nowSec() + 3_600, ...o });
}

async function put(broker: TestBroker, doc: Doc | string): Promise<void> {
  await broker.store.put(SECRET_KEY, typeof doc === 'string' ? doc : JSON.stringify(doc));
}

async function storedDoc(broker: TestBroker): Promise<Doc> {
  const row = await broker.store.read(SECRET_KEY);
  assert.ok(row, 'the secret row exists');
  return JSON.parse(broker.store.decrypt(row)) as Doc;
}

function tokensOf(doc: Doc): Tokens {
  return doc['tokens'] as Tokens;
}

/** An unsigned JWT-shaped token with the given payload (the broker never verifies signatures). */
function unsignedJwt(payload: Record<string, unknown>): string {
  const b = (v: unknown) => Buffer.from(JSON.stringify(v)).toString('base64url');
  return `${b({ alg: 'none', typ: 'JWT' })}.${b(payload)}.${randomBytes(8).toString('base64url')}`;
}

function expIso(accessToken: string | undefined): string {
  assert.ok(accessToken);
  const exp = decodeJwt(accessToken).exp;
  assert.ok(exp !== undefined);
  return new Date(exp * 1000).toISOString();
}


function refreshTokensPosted(upstream: FakeUpstream): string[] {
  return upstream.requests.map((r) => (r.body as Record<string, string> | undefined)?.['refresh_token'] ?? '');
}

// ---- tests --------------------------------------------------------------------

test('inert when the secret is absent or blank', async (t) => {
  const { upstream, broker } = await setup(t);
  const absent = await broker.refresher.runCycle();
  assert.equal(absent.check, 'inert');
  assert.equal(absent.attempt, undefined);
  assert.equal(broker.refresher.status().state, 'absent');

  for (const blank of ['', ' ', '  \n\t  ']) {
    await put(broker, blank);
    const r = await broker.refresher.runCycle();
    assert.equal(r.check, 'inert', `blank plaintext ${JSON.stringify(blank)}`);
    assert.equal(r.attempt, undefined);
    assert.equal(broker.refresher.status().state, 'absent');
  }
  // Also inert with a plaintext (version 0) store.
  const plain = await newBroker(t, await pgs.newDatabase(), upstream.url, { key: null });
  await put(plain, '   ');
  assert.equal((await plain.refresher.runCycle()).check, 'inert');

  assert.equal(upstream.posts, 0);
  const inertLines = broker.logs.withEvent('inert');
  assert.ok(inertLines.length >= 1, 'the inert state is logged');
  assert.equal(inertLines.filter((l) => (l['level'] as number) >= 30).length, 1, 'logged once at info, repeats at debug');
});

test('skip when fresh', async (t) => {
  const { upstream, broker } = await setup(t);
  const doc = upstream.seed();
  await put(broker, doc);
  for (const advance of [0, DAY, 8 * DAY]) {
    nowMs = T0 + advance;
    const r = await broker.refresher.runCycle();
    assert.equal(r.check, 'fresh');
    assert.equal(r.attempt, undefined);
  }
  assert.equal(upstream.posts, 0);
  assert.equal(broker.refresher.status().state, 'fresh');
  assert.equal(broker.refresher.status().accessTokenExpiresAt, expIso(tokensOf(doc)['access_token']));
});

test('rotates once when due and re-skips', async (t) => {
  const { upstream, broker } = await setup(t);
  const seed = upstream.seed();
  await put(broker, seed);
  nowMs = T0 + 9.5 * DAY;

  const r = await broker.refresher.runCycle();
  assert.equal(r.check, 'due');
  assert.equal(r.attempt, 'rotated');
  assert.equal(upstream.posts, 1);
  assert.equal(upstream.rotations, 1);

  const stored = tokensOf(await storedDoc(broker));
  const issued = upstream.issuedTokens();
  assert.equal(stored['access_token'], upstream.lastAccessToken());
  assert.equal(stored['refresh_token'], upstream.currentRefreshToken());
  assert.equal(stored['id_token'], issued[issued.length - 1]);
  assert.notEqual(stored['refresh_token'], tokensOf(seed)['refresh_token']);
  assert.equal(stored['account_id'], tokensOf(seed)['account_id']);
  assert.equal(broker.refresher.status().accessTokenExpiresAt, expIso(upstream.lastAccessToken()));

  const again = await broker.refresher.runCycle();
  assert.equal(again.check, 'fresh');
  assert.equal(upstream.posts, 1);
  assert.equal(broker.logs.withEvent('rotation').length, 1);
});

test('parses nested and flat token shapes and keeps the shape on rotation', async (t) => {
  // Nested: {"tokens": {...}}
  const { upstream, broker } = await setup(t);
  const nested = dueSeed(upstream, { accountId: 'acct-nested' });
  await put(broker, nested);
  assert.equal((await broker.refresher.runCycle()).attempt, 'rotated');
  const n = await storedDoc(broker);
  assert.equal(refreshTokensPosted(upstream)[0], tokensOf(nested)['refresh_token']);
  assert.deepEqual(Object.keys(n).sort(), ['OPENAI_API_KEY', 'last_refresh', 'tokens']);
  assert.equal(tokensOf(n)['access_token'], upstream.lastAccessToken());
  assert.equal(tokensOf(n)['refresh_token'], upstream.currentRefreshToken());
  assert.equal(tokensOf(n)['account_id'], 'acct-nested');
  assert.equal(broker.refresher.status().accountId, 'acct-nested');

  // Flat: top-level fields.
  const flat = dueSeed(upstream, { flat: true, accountId: 'acct-flat' });
  await put(broker, flat);
  assert.equal((await broker.refresher.runCycle()).attempt, 'rotated');
  const f = await storedDoc(broker);
  assert.equal(refreshTokensPosted(upstream)[1], flat['refresh_token']);
  assert.equal(f['tokens'], undefined, 'a flat document stays flat');
  assert.deepEqual(Object.keys(f).sort(), ['access_token', 'account_id', 'id_token', 'last_refresh', 'refresh_token']);
  assert.equal(f['access_token'], upstream.lastAccessToken());
  assert.equal(f['refresh_token'], upstream.currentRefreshToken());
  assert.equal(f['account_id'], 'acct-flat');
  assert.equal(broker.refresher.status().accountId, 'acct-flat');

  // A "tokens" member without any token falls back to the flat fields.
  const fallback = dueSeed(upstream, { flat: true, extra: { tokens: { note: 'not tokens' } } });
  await put(broker, fallback);
  assert.equal((await broker.refresher.runCycle()).attempt, 'rotated');
  const fb = await storedDoc(broker);
  assert.equal(refreshTokensPosted(upstream)[2], fallback['refresh_token']);
  assert.deepEqual(fb['tokens'], { note: 'not tokens' });
  assert.equal(fb['refresh_token'], upstream.currentRefreshToken());
  assert.equal(upstream.posts, 3);
  assert.equal(upstream.reuseAnswers, 0);
});

test('an unparseable blob or a missing refresh_token skips the cycle with no POST', async (t) => {
  const { upstream, broker } = await setup(t);
  const good = dueSeed(upstream);
  const noRefresh = structuredClone(good);
  delete (noRefresh['tokens'] as Tokens)['refresh_token'];
  const emptyRefresh = structuredClone(good);
  (emptyRefresh['tokens'] as Tokens)['refresh_token'] = '';
  const flatNoRefresh = { access_token: tokensOf(good)['access_token'], id_token: tokensOf(good)['id_token'] };
  const blobs = ['{not json', '[1,2,3]', '"a string"', 'null', JSON.stringify(noRefresh), JSON.stringify(emptyRefresh), JSON.stringify(flatNoRefresh)];
  for (const blob of blobs) {
    await put(broker, blob);
    const r = await broker.refresher.runCycle();
    assert.equal(r.check, 'read_error', blob.slice(0, 40));
    assert.equal(r.attempt, undefined);
    assert.ok(r.error, 'the report names the problem');
    assert.ok(broker.refresher.status().lastError, 'status names the problem');
  }
  assert.equal(upstream.posts, 0);
  // A good blob afterwards is refreshed as usual.
  await put(broker, good);
  assert.equal((await broker.refresher.runCycle()).attempt, 'rotated');
  assert.equal(upstream.posts, 1);
  assert.equal(broker.refresher.status().lastError, null);
});

test('no readable exp means due', async (t) => {
  const { upstream, broker } = await setup(t);
  const variants: Array<[string, (tokens: Tokens) => void]> = [
    ['a non-JWT access token', (tk) => (tk['access_token'] = 'opaque-access-token')],
    ['a JWT without exp', (tk) => (tk['access_token'] = unsignedJwt({ iat: nowSec(), sub: 'u' }))],
    ['a JWT whose exp is a string', (tk) => (tk['access_token'] = unsignedJwt({ iat: nowSec(), exp: String(nowSec() + 864_000) }))],
    ['a JWT with an undecodable payload', (tk) => (tk['access_token'] = 'eyJhbGciOiJub25lIn0.!!!.sig')],
    ['no access token at all', (tk) => delete tk['access_token']],
  ];
  let posts = 0;
  for (const [name, mutate] of variants) {
    const doc = upstream.seed(); // fresh by exp: only the unreadable exp can make it due
    mutate(doc['tokens'] as Tokens);
    await put(broker, doc);
    const r = await broker.refresher.runCycle();
    posts += 1;
    assert.equal(r.attempt, 'rotated', name);
    assert.equal(upstream.posts, posts, name);
    assert.equal(tokensOf(await storedDoc(broker))['access_token'], upstream.lastAccessToken(), name);
    assert.equal((await broker.refresher.runCycle()).check, 'fresh', `${name}: fresh after rotation`);
  }
  assert.equal(upstream.reuseAnswers, 0);
});

test('the refresh-lead rule min(margin, (exp - iat) / 2)', async (t) => {
  // Access lifetime 2 h, margin 1 day: the half (1 h) wins.
  const { upstream, broker } = await setup(t, { upstream: { accessLifetimeSec: 7_200 }, broker: { marginSeconds: 86_400 } });
  await put(broker, upstream.seed());
  nowMs = T0 + 2 * HOUR - 61 * MIN;
  assert.equal((await broker.refresher.runCycle()).check, 'fresh', '61 min left of 2 h: fresh');
  assert.equal(upstream.posts, 0);
  nowMs = T0 + 2 * HOUR - 59 * MIN;
  assert.equal((await broker.refresher.runCycle()).attempt, 'rotated', '59 min left of 2 h: due');
  assert.equal(upstream.posts, 1);

  // Access lifetime 10 days, margin 1 day: the margin wins.
  nowMs = T0;
  await put(broker, upstream.seed({ iatSec: nowSec(), expSec: nowSec() + 10 * 86_400 }));
  nowMs = T0 + 10 * DAY - DAY - MIN;
  assert.equal((await broker.refresher.runCycle()).check, 'fresh', '1 day + 1 min left: fresh');
  nowMs = T0 + 10 * DAY - DAY + MIN;
  assert.equal((await broker.refresher.runCycle()).attempt, 'rotated', '1 day - 1 min left: due');
  assert.equal(upstream.posts, 2);

  // Without a readable iat the half does not apply: the margin is the lead.
  nowMs = T0;
  const noIat = upstream.seed();
  (noIat['tokens'] as Tokens)['access_token'] = unsignedJwt({ exp: nowSec() + 2 * 3_600 });
  await put(broker, noIat);
  nowMs = T0 + 2 * HOUR - 61 * MIN;
  assert.equal((await broker.refresher.runCycle()).attempt, 'rotated', 'no iat: 61 min left is inside the 1-day margin');
  assert.equal(upstream.posts, 3);
  assert.equal(upstream.reuseAnswers, 0);
});

test('the POST carries exactly grant_type, client_id, refresh_token to the configured URL', async (t) => {
  const { upstream, broker } = await setup(t);
  const seed = dueSeed(upstream);
  await put(broker, seed);
  assert.equal((await broker.refresher.runCycle()).attempt, 'rotated');
  assert.equal(upstream.requests.length, 1);
  const req = upstream.requests[0]!;
  assert.equal(req.method, 'POST');
  assert.equal(req.path, TOKEN_PATH);
  assert.match(String(req.headers['content-type']), /^application\/json\b/);
  assert.equal(req.headers['accept'], 'application/json');
  assert.deepEqual(JSON.parse(req.rawBody), {
    grant_type: 'refresh_token',
    client_id: DEFAULT_CLIENT_ID,
    refresh_token: tokensOf(seed)['refresh_token'],
  });
  assert.deepEqual(Object.keys(JSON.parse(req.rawBody) as Doc).sort(), ['client_id', 'grant_type', 'refresh_token']);

  // Another configured URL is the one POSTed to (the fake answers 404 elsewhere: transient).
  const elsewhere = upstream.url.replace(TOKEN_PATH, '/custom/token-endpoint');
  const other = await newBroker(t, await pgs.newDatabase(), elsewhere);
  await put(other, dueSeed(upstream));
  const r = await other.refresher.runCycle();
  assert.equal(r.attempt, 'transient_failure');
  assert.equal(upstream.requests.length, 2);
  assert.equal(upstream.requests[1]!.path, '/custom/token-endpoint');
  assert.equal(upstream.requests[1]!.method, 'POST');
});

test('merge preserves other fields and never clobbers with an empty value', async (t) => {
  const databaseUrl = await pgs.newDatabase();
  const upstream = await newUpstream(t);
  const real = createUpstreamClient({ url: upstream.url, clientId: DEFAULT_CLIENT_ID, timeoutMs: 5_000 }, now);
  // The upstream answers with an empty id_token.
  const broker = await newBroker(t, databaseUrl, upstream.url, {
    refresh: async (rt) => ({ ...(await real(rt)), id_token: '' }),
  });
  const seed = dueSeed(upstream, {
    extra: { auth_mode: 'chatgpt', OPENAI_API_KEY: null, future_field: { nested: [1, 'two', null], flag: true } },
  });
  (seed['tokens'] as Record<string, unknown>)['future_token_field'] = 'keep-me';
  await put(broker, seed);

  assert.equal((await broker.refresher.runCycle()).attempt, 'rotated');
  const doc = await storedDoc(broker);
  assert.equal(doc['auth_mode'], 'chatgpt');
  assert.ok('OPENAI_API_KEY' in doc);
  assert.equal(doc['OPENAI_API_KEY'], null);
  assert.deepEqual(doc['future_field'], { nested: [1, 'two', null], flag: true });
  const tk = tokensOf(doc);
  assert.equal(tk['future_token_field'], 'keep-me');
  assert.equal(tk['account_id'], tokensOf(seed)['account_id']);
  assert.equal(tk['id_token'], tokensOf(seed)['id_token'], 'an empty id_token in the answer does not clobber the stored one');
  assert.equal(tk['access_token'], upstream.lastAccessToken());
  assert.equal(tk['refresh_token'], upstream.currentRefreshToken());
  assert.deepEqual(Object.keys(doc).sort(), ['OPENAI_API_KEY', 'auth_mode', 'future_field', 'last_refresh', 'tokens']);
  assert.equal(upstream.posts, 1);
});

test('last_refresh is set to now on rotation', async (t) => {
  const { upstream, broker } = await setup(t);
  const seed = upstream.seed();
  assert.equal(seed['last_refresh'], new Date(T0).toISOString());
  await put(broker, seed);
  nowMs = T0 + 9.5 * DAY + 123;
  assert.equal((await broker.refresher.runCycle()).attempt, 'rotated');
  const doc = await storedDoc(broker);
  assert.equal(doc['last_refresh'], new Date(nowMs).toISOString());
  assert.match(String(doc['last_refresh']), /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/);
  assert.equal(broker.refresher.status().lastRotationAt, new Date(nowMs).toISOString());
});

const PERMANENT_CASES = [
  { status: 401, code: 'refresh_token_reused' },
  { status: 400, code: 'refresh_token_expired' },
];

/** Seed a due login, answer its POST with a permanent failure; returns the env after the latch. */
async function latchedEnv(t: TestContext, status = 401, code = 'refresh_token_reused'): Promise<Env & { rowBefore: Buffer; updatedBefore: Date }> {
  const env = await setup(t);
  const { upstream, broker } = env;
  await put(broker, dueSeed(upstream));
  const before = await broker.store.read(SECRET_KEY);
  assert.ok(before);
  upstream.fault({ kind: 'status', status, body: { error: { message: 'no', type: 'invalid_request_error', code } } });
  const r = await broker.refresher.runCycle();
  assert.equal(r.attempt, 'permanent_failure', `${status} ${code}`);
  assert.equal(r.error?.upstreamCode, code);
  return { ...env, rowBefore: before.raw, updatedBefore: before.updatedAt };
}

test('permanent failure writes nothing and never re-POSTs the same blob', async (t) => {
  for (const { status, code } of PERMANENT_CASES) {
    const { upstream, broker, rowBefore, updatedBefore } = await latchedEnv(t, status, code);
    const label = `${status} ${code}`;
    const after1 = await broker.store.read(SECRET_KEY);
    assert.ok(after1);
    assert.ok(after1.raw.equals(rowBefore), `${label}: row byte-identical`);
    assert.equal(after1.updatedAt.getTime(), updatedBefore.getTime(), `${label}: row not rewritten`);
    assert.equal(broker.refresher.status().state, 'latched', label);
    assert.equal(broker.refresher.status().latch?.upstreamCode, code, label);
    assert.equal(broker.refresher.status().latch?.upstreamStatus, status, label);

    for (let i = 0; i < 5; i++) {
      nowMs += 2 * HOUR; // past the permanent backoff: still never re-POSTed
      const r = await broker.refresher.runCycle();
      assert.equal(r.check, 'latched', label);
      assert.equal(r.attempt, undefined, label);
    }
    // Even an explicit forced refresh does not POST a latched token.
    assert.equal((await broker.refresher.runCycle({ force: true, ignoreBackoff: true })).check, 'latched', label);
    assert.equal(upstream.posts, 1, `${label}: exactly one POST`);
    const rowAfter = await broker.store.read(SECRET_KEY);
    assert.ok(rowAfter?.raw.equals(rowBefore), `${label}: still byte-identical`);
    assert.equal(broker.refresher.status().state, 'latched', label);
    assert.equal(broker.logs.withEvent('latched').length, 1, `${label}: logged exactly once`);
    nowMs = T0;
  }
});

test('a changed blob POSTs again after a latch', async (t) => {
  const { upstream, broker } = await latchedEnv(t);
  assert.equal(upstream.posts, 1);
  const reseed = dueSeed(upstream, { accountId: 'new-login' });
  await put(broker, reseed);
  const r = await broker.refresher.runCycle();
  assert.equal(r.attempt, 'rotated');
  assert.equal(upstream.posts, 2);
  assert.equal(refreshTokensPosted(upstream)[1], tokensOf(reseed)['refresh_token']);
  assert.equal(tokensOf(await storedDoc(broker))['refresh_token'], upstream.currentRefreshToken('new-login'));
  assert.equal(broker.refresher.status().state, 'fresh');
  assert.equal(broker.refresher.status().latch, null);
  assert.equal((await broker.refresher.runCycle()).check, 'fresh');
  assert.equal(upstream.posts, 2);
});

test('the latch is shared: another replica does not POST a latched token', async (t) => {
  const { databaseUrl, upstream, broker: a } = await latchedEnv(t);
  const b = await newBroker(t, databaseUrl, upstream.url, { key: a.key ?? null });
  for (let i = 0; i < 3; i++) {
    const r = await b.refresher.runCycle();
    assert.equal(r.check, 'latched');
    assert.equal(r.attempt, undefined);
    nowMs += 2 * HOUR;
  }
  assert.equal(b.refresher.status().state, 'latched');
  assert.equal(b.refresher.status().latch?.upstreamCode, 'refresh_token_reused');
  // A restarted replica (fresh process state) does not POST it either.
  const c = await newBroker(t, databaseUrl, upstream.url, { key: a.key ?? null });
  assert.equal((await c.refresher.runCycle()).check, 'latched');
  assert.equal(upstream.posts, 1);
});

test('transient failure writes nothing, does not latch, and is retried', async (t) => {
  const { upstream, broker } = await setup(t);
  await put(broker, dueSeed(upstream));
  const before = await broker.store.read(SECRET_KEY);
  assert.ok(before);
  upstream.fault({ kind: 'status', status: 503 });
  const r = await broker.refresher.runCycle();
  assert.equal(r.attempt, 'transient_failure');
  assert.equal(r.error?.status, 503);
  const after1 = await broker.store.read(SECRET_KEY);
  assert.ok(after1);
  assert.ok(after1.raw.equals(before.raw), 'row unchanged');
  assert.equal(after1.updatedAt.getTime(), before.updatedAt.getTime());
  assert.equal(broker.refresher.status().state, 'due', 'not latched');
  assert.equal(broker.refresher.status().latch, null);
  assert.equal(broker.refresher.status().consecutiveFailures, 1);

  const soon = await broker.refresher.runCycle();
  assert.equal(soon.backoff, true);
  assert.equal(upstream.posts, 1);

  nowMs += 20 * SEC; // past the first step (15 s, at most +20 % jitter)
  const retry = await broker.refresher.runCycle();
  assert.equal(retry.attempt, 'rotated');
  assert.equal(upstream.posts, 2);
  assert.equal(tokensOf(await storedDoc(broker))['refresh_token'], upstream.currentRefreshToken());
  assert.equal(broker.refresher.status().consecutiveFailures, 0);
  assert.equal(broker.refresher.status().lastError, null);
  assert.equal(upstream.reuseAnswers, 0);
});

test('transient retries back off with jitter from the base up to the check interval and never POST more than once per step', async (t) => {
  const runSteps = async (random: number, expected: number[]): Promise<void> => {
    nowMs = T0;
    const { upstream, broker } = await setup(t, { broker: { transientBaseMs: 15_000, checkIntervalMs: 300_000, random: () => random } });
    await put(broker, dueSeed(upstream));
    for (let i = 0; i < expected.length; i++) upstream.fault({ kind: 'status', status: 502 });
    for (let i = 0; i < expected.length; i++) {
      const r = await broker.refresher.runCycle();
      assert.equal(r.attempt, 'transient_failure', `random ${random}, step ${i}`);
      assert.equal(upstream.posts, i + 1);
      const failedAt = nowMs;
      const notBefore = broker.refresher.status().nextAttemptNotBefore;
      assert.ok(notBefore);
      const step = Date.parse(notBefore) - failedAt;
      assert.equal(step, expected[i], `random ${random}, step ${i}`);
      for (const probe of [0, 1, Math.floor(step / 2), step - 1]) {
        nowMs = failedAt + probe;
        for (let k = 0; k < 3; k++) {
          const waiting = await broker.refresher.runCycle();
          assert.equal(waiting.backoff, true, `random ${random}, step ${i}, +${probe} ms`);
          assert.equal(waiting.attempt, undefined);
        }
      }
      assert.equal(upstream.posts, i + 1, 'no POST inside a backoff step');
      nowMs = failedAt + step;
    }
    const last = await broker.refresher.runCycle();
    assert.equal(last.attempt, 'rotated');
    assert.equal(upstream.posts, expected.length + 1);
  };
  // Middle of the jitter range: exactly the exponential, capped at the check interval.
  await runSteps(0.5, [15_000, 30_000, 60_000, 120_000, 240_000, 300_000, 300_000]);
  // Low end of the jitter range (x0.8), never below the base.
  await runSteps(0, [15_000, 24_000, 48_000, 96_000, 192_000, 240_000]);
  // Near the high end (x1.1996), never above the check interval.
  await runSteps(0.999, [17_994, 35_988, 71_976, 143_952, 287_904, 300_000]);
});

test('honours Retry-After', async (t) => {
  const { upstream, broker } = await setup(t, { broker: { random: () => 0.5 } });
  await put(broker, dueSeed(upstream));
  upstream.fault({ kind: 'status', status: 429, headers: { 'retry-after': '120' }, body: { error: { code: 'rate_limit_exceeded' } } });
  const r = await broker.refresher.runCycle();
  assert.equal(r.attempt, 'transient_failure');
  assert.equal(r.error?.status, 429);
  const start = nowMs;
  for (const at of [0, 15 * SEC, 60 * SEC, 120 * SEC - 1]) {
    nowMs = start + at;
    assert.equal((await broker.refresher.runCycle()).backoff, true, `+${at} ms`);
  }
  assert.equal(upstream.posts, 1);
  nowMs = start + 120 * SEC;
  assert.equal((await broker.refresher.runCycle()).attempt, 'rotated');
  assert.equal(upstream.posts, 2);

  // An HTTP-date Retry-After beyond the check interval is honoured too.
  nowMs += 9.5 * DAY;
  const until = new Date(nowMs + 600 * SEC).toUTCString();
  upstream.fault({ kind: 'status', status: 503, headers: { 'retry-after': until } });
  assert.equal((await broker.refresher.runCycle()).attempt, 'transient_failure');
  const start2 = nowMs;
  nowMs = start2 + 599 * SEC;
  assert.equal((await broker.refresher.runCycle()).backoff, true);
  assert.equal(upstream.posts, 3);
  nowMs = start2 + 600 * SEC;
  assert.equal((await broker.refresher.runCycle()).attempt, 'rotated');
  assert.equal(upstream.posts, 4);
});

test('the backoff step is shared: another replica does not POST before Retry-After', async (t) => {
  const { databaseUrl, upstream, broker: a } = await setup(t, { broker: { random: () => 0.5 } });
  const b = await newBroker(t, databaseUrl, upstream.url, { key: a.key ?? null, random: () => 0.5 });
  await put(a, dueSeed(upstream));
  upstream.fault({ kind: 'status', status: 429, headers: { 'retry-after': '600' } });
  assert.equal((await a.refresher.runCycle()).attempt, 'transient_failure');
  const start = nowMs;
  nowMs = start + 30 * SEC;
  const r = await b.refresher.runCycle();
  assert.equal(r.backoff, true, 'b saw a\'s backoff step');
  assert.equal(upstream.posts, 1);
  assert.equal(b.refresher.status().nextAttemptNotBefore, new Date(start + 600 * SEC).toISOString());
  nowMs = start + 600 * SEC;
  assert.equal((await b.refresher.runCycle()).attempt, 'rotated');
  assert.equal(upstream.posts, 2);
  assert.equal(upstream.reuseAnswers, 0);
  // The rotation cleared the shared step: the next due cycle is not held back.
  nowMs += 9.5 * DAY;
  assert.equal((await a.refresher.runCycle()).attempt, 'rotated');
});

test('a re-seed clears the failure count and the backoff of the old token', async (t) => {
  const { upstream, broker } = await setup(t, { broker: { random: () => 0.5 } });
  await put(broker, dueSeed(upstream));
  upstream.fault({ kind: 'status', status: 503 });
  assert.equal((await broker.refresher.runCycle()).attempt, 'transient_failure');
  assert.equal(broker.refresher.status().consecutiveFailures, 1);
  await put(broker, dueSeed(upstream));
  const r = await broker.refresher.runCycle();
  assert.equal(r.attempt, 'rotated', 'the new login is not held back by the old one\'s backoff');
  assert.equal(broker.refresher.status().consecutiveFailures, 0);
});

test('16 concurrent cycles give exactly 1 POST and 1 write', async (t) => {
  const { databaseUrl, upstream, broker } = await setup(t);
  await put(broker, dueSeed(upstream));
  const updatedBefore = (await broker.store.read(SECRET_KEY))?.updatedAt;

  const listener = new pg.Client({ connectionString: databaseUrl });
  listener.on('error', () => {});
  await listener.connect();
  t.after(() => listener.end());
  let notifications = 0;
  listener.on('notification', () => {
    notifications += 1;
  });
  await listener.query('LISTEN codex_auth_changed');

  const store: SecretStore = broker.store;
  const cas = store.compareAndSet.bind(store);
  let casCalls = 0;
  let casWrites = 0;
  store.compareAndSet = async (...args: Parameters<SecretStore['compareAndSet']>) => {
    casCalls += 1;
    const ok = await cas(...args);
    if (ok) casWrites += 1;
    return ok;
  };

  const reports = await Promise.all(Array.from({ length: 16 }, () => broker.refresher.runCycle()));
  assert.equal(upstream.posts, 1);
  assert.equal(upstream.reuseAnswers, 0);
  assert.equal(casCalls, 1);
  assert.equal(casWrites, 1);
  assert.equal(reports.filter((r) => !r.joined).length, 1);
  assert.ok(reports.every((r) => r.attempt === 'rotated'), 'every caller sees the rotation');
  await listener.query('SELECT 1');
  await waitFor('the NOTIFY of the write', () => notifications >= 1);
  await sleep(100);
  assert.equal(notifications, 1, 'exactly one write notified');
  const updatedAfter = (await broker.store.read(SECRET_KEY))?.updatedAt;
  assert.notEqual(updatedAfter?.getTime(), updatedBefore?.getTime());
  assert.equal(tokensOf(await storedDoc(broker))['refresh_token'], upstream.currentRefreshToken());
});

test('single-flight holds across processes: two brokers on one database POST once', async (t) => {
  const { databaseUrl, upstream, broker: a } = await setup(t);
  const b = await newBroker(t, databaseUrl, upstream.url, { key: a.key ?? null });
  await put(a, upstream.seed());
  const rounds = 20;
  for (let round = 1; round <= rounds; round++) {
    nowMs += 9.5 * DAY;
    const reports = await Promise.all([a.refresher.runCycle(), b.refresher.runCycle(), a.refresher.runCycle(), b.refresher.runCycle()]);
    assert.equal(upstream.posts, round, `round ${round}: one POST`);
    const own = [reports[0]!, reports[1]!];
    assert.equal(own.filter((r) => r.attempt === 'rotated').length, 1, `round ${round}: one replica rotated`);
    const loser = own.find((r) => r.attempt !== 'rotated')!;
    assert.ok(loser.check === 'locked_elsewhere' || loser.check === 'fresh', `round ${round}: loser reported ${loser.check}`);
    assert.equal(loser.attempt, undefined);
  }
  assert.equal(upstream.rotations, rounds);
  assert.equal(upstream.reuseAnswers, 0);
  assert.equal(tokensOf(await storedDoc(a))['refresh_token'], upstream.currentRefreshToken());
  // Both converge on the stored credential at their next check.
  assert.equal((await a.refresher.runCycle()).check, 'fresh');
  assert.equal((await b.refresher.runCycle()).check, 'fresh');
  assert.equal(a.refresher.status().accessTokenExpiresAt, expIso(upstream.lastAccessToken()));
  assert.equal(b.refresher.status().accessTokenExpiresAt, expIso(upstream.lastAccessToken()));
});

test('re-reads under the lock and does not POST a token another replica already rotated', async (t) => {
  const { databaseUrl, upstream, broker: a } = await setup(t);
  const b = await newBroker(t, databaseUrl, upstream.url, { key: a.key ?? null });
  await put(a, upstream.seed());
  nowMs += 9.5 * DAY;

  // B reads the due blob, then A rotates between B's read and B taking the lock.
  const withLock = b.store.withLock.bind(b.store);
  let interposed = 0;
  b.store.withLock = (async (...args: Parameters<typeof withLock>) => {
    interposed += 1;
    const ra = await a.refresher.runCycle();
    assert.equal(ra.attempt, 'rotated');
    return withLock(...args);
  }) as typeof withLock;
  const rb = await b.refresher.runCycle();
  assert.equal(interposed, 1, 'B went for the lock with the stale, due blob');
  assert.equal(rb.check, 'fresh', 'B re-read under the lock and saw the rotation');
  assert.equal(rb.attempt, undefined);
  assert.equal(upstream.posts, 1);
  assert.equal(upstream.reuseAnswers, 0);
  assert.equal(b.refresher.status().accessTokenExpiresAt, expIso(upstream.lastAccessToken()));
  b.store.withLock = withLock;

  // And the simple order: B holds an old snapshot, A rotates, B's next cycle is fresh.
  nowMs += 9.5 * DAY;
  await b.refresher.reload();
  assert.equal(b.refresher.status().state, 'due');
  assert.equal((await a.refresher.runCycle()).attempt, 'rotated');
  assert.equal((await b.refresher.runCycle()).check, 'fresh');
  assert.equal(upstream.posts, 2);
  assert.equal(upstream.reuseAnswers, 0);
});

test('compare-and-set: a rotation does not overwrite a re-seed that landed during the POST', async (t) => {
  const { upstream, broker } = await setup(t);
  await put(broker, dueSeed(upstream));
  upstream.fault({ kind: 'delay', ms: 500 });
  const cycle = broker.refresher.runCycle();
  await waitFor('the POST to arrive', () => upstream.posts === 1);
  const reseed = upstream.seed({ accountId: 'reseeded' });
  await put(broker, reseed);
  const r = await cycle;
  assert.equal(r.check, 'due');
  assert.deepEqual(await storedDoc(broker), reseed, 'the re-seed wins');
  assert.equal(broker.logs.withEvent('rotation_discarded').length, 1);
  assert.equal(broker.refresher.status().accountId, 'reseeded', 'the refresher adopts the re-seed');
  assert.equal((await broker.refresher.runCycle()).check, 'fresh');
  assert.equal(upstream.posts, 1);
  assert.equal(upstream.reuseAnswers, 0);
});

test('a read error skips the cycle with no POST', async (t) => {
  const errorLine = (b: TestBroker, pattern: RegExp): void => {
    const lines = b.logs.withEvent('read_error').filter((l) => (l['level'] as number) >= 50);
    assert.ok(
      lines.some((l) => pattern.test(String(l['msg']))),
      `an error line matching ${pattern}: ${JSON.stringify(lines.map((l) => l['msg']))}`,
    );
  };

  // The table is gone.
  {
    nowMs = T0;
    const { upstream, broker } = await setup(t);
    await put(broker, upstream.seed());
    assert.equal((await broker.refresher.runCycle()).check, 'fresh');
    nowMs += 9.5 * DAY;
    await broker.pool.query('DROP TABLE global_secrets');
    const r = await broker.refresher.runCycle();
    assert.equal(r.check, 'read_error');
    assert.equal(r.error?.code, 'STORE_UNAVAILABLE');
    assert.equal(broker.refresher.status().lastError?.code, 'STORE_UNAVAILABLE');
    assert.match(String(broker.refresher.status().lastError?.message), /global_secrets/);
    errorLine(broker, /could not read the credential/);
    assert.equal(upstream.posts, 0);
  }

  // An unknown encryption version.
  {
    nowMs = T0 + 9.5 * DAY;
    const { upstream, broker } = await setup(t);
    await put(broker, upstream.seed({ iatSec: Math.floor(T0 / 1000) }));
    await broker.pool.query('UPDATE global_secrets SET encryption_version = 7');
    const r = await broker.refresher.runCycle();
    assert.equal(r.check, 'read_error');
    const lastError = broker.refresher.status().lastError;
    assert.equal(lastError?.code, 'ENCRYPTION_VERSION_UNKNOWN');
    assert.match(String(lastError?.message), /encryption_version 7/);
    errorLine(broker, /encryption_version 7/);
    assert.equal(broker.refresher.status().state, 'invalid');
    assert.equal(upstream.posts, 0);
  }

  // A version-1 row read without a key, and with the wrong key.
  {
    nowMs = T0;
    const { databaseUrl, upstream, broker: writer } = await setup(t);
    await put(writer, dueSeed(upstream));
    const noKey = await newBroker(t, databaseUrl, upstream.url, { key: null });
    const r = await noKey.refresher.runCycle();
    assert.equal(r.check, 'read_error');
    assert.equal(noKey.refresher.status().lastError?.code, 'ENCRYPTION_KEY_MISSING');
    errorLine(noKey, /SECRETS_ENCRYPTION_KEY is not set/);
    const wrongKey = await newBroker(t, databaseUrl, upstream.url, { key: randomBytes(32) });
    assert.equal((await wrongKey.refresher.runCycle()).check, 'read_error');
    assert.equal(wrongKey.refresher.status().lastError?.code, 'DECRYPT_FAILED');
    errorLine(wrongKey, /wrong SECRETS_ENCRYPTION_KEY/);
    assert.equal(upstream.posts, 0);
  }

  // The database server is down.
  {
    nowMs = T0;
    const { upstream, broker } = await setup(t);
    await put(broker, upstream.seed());
    assert.equal((await broker.refresher.runCycle()).check, 'fresh');
    nowMs += 9.5 * DAY;
    await pgs.stopServer();
    try {
      const r = await broker.refresher.runCycle();
      assert.equal(r.check, 'read_error');
      assert.equal(broker.refresher.status().lastError?.code, 'STORE_UNAVAILABLE');
      errorLine(broker, /could not read the credential/);
      assert.equal(upstream.posts, 0);
    } finally {
      await pgs.startServer();
    }
    // Back up: the next cycle refreshes and the error clears.
    const ok = await broker.refresher.runCycle();
    assert.equal(ok.attempt, 'rotated');
    assert.equal(broker.refresher.status().lastError, null);
    assert.equal(upstream.posts, 1);
  }
});

test('no token value appears in any log line', () => {
  const secrets = upstreams.flatMap((u) => u.issuedTokens());
  const lines = captures.flatMap((c) => c.lines);
  assert.ok(upstreams.length >= 10 && secrets.length > 0, 'the other tests ran and issued tokens');
  assert.ok(lines.length > 0, 'the other tests logged');
  assert.deepEqual(findLeaks(lines, secrets), []);
});
