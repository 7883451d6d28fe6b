import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import { unfinishedIntents } from '../src/audit.js';
import { buildSnapshot } from '../src/credential.js';
import { judgeSeed } from '../src/seed-guard.js';
import { ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import type { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';
import { waitFor } from './helpers/wait.js';

const KEY = 'CODEX_AUTH_JSON';
const DAY = 86_400;
const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
const suite = useSuite();
const nowMs = Date.UTC(2027, 0, 1);
const now = () => nowMs;
const nowSec = () => Math.floor(nowMs / 1000);

type Doc = { tokens: { refresh_token: string } };
const sha = (v: string) => createHash('sha256').update(v).digest('hex');

async function setup() {
  const upstream = await suite.upstream({ now });
  const url = await suite.pg.newDatabase();
  const t = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, now, start: false });
  return { t, upstream, url };
}

function put(t: TestApp, doc: unknown, query = '') {
  return t.app.inject({ method: 'PUT', url: `/admin/credential${query}`, headers: admin, payload: doc as object });
}

async function rowBytes(t: TestApp): Promise<Buffer | undefined> {
  return (await t.core.store.read(KEY))?.raw;
}

async function events(t: TestApp): Promise<Array<Record<string, unknown>>> {
  return (await t.app.inject({ url: '/admin/events', headers: admin })).json().events;
}

/** A login the refresher will find due (issued 9 days ago, expiring in an hour). */
function dueSeed(upstream: FakeUpstream, accountId?: string): Doc {
  return upstream.seed({ iatSec: nowSec() - 9 * DAY, expSec: nowSec() + 3_600, ...(accountId ? { accountId } : {}) }) as Doc;
}

test('a seed of a refresh token the broker already spent is refused with 409 and nothing is stored', async () => {
  const { t, upstream } = await setup();
  const old = dueSeed(upstream);
  assert.equal((await put(t, old)).statusCode, 200);
  assert.equal((await t.core.refresher.runCycle()).attempt, 'rotated');
  const before = await rowBytes(t);
  const res = await put(t, old);
  assert.equal(res.statusCode, 409, res.body);
  assert.match(String(res.headers['content-type']), /application\/problem\+json/);
  const p = res.json();
  assert.equal(p.code, 'stale_seed');
  assert.equal(p.refusal.reason, 'spent');
  assert.match(p.detail, /already spent by the broker .* on 20\d\d-.*Nothing was stored.*force=true/);
  assert.deepEqual(await rowBytes(t), before, 'the stored row is byte-identical');
  assert.equal(upstream.posts, 1, 'no POST for the refused seed');
});

test('a seed older than the stored login of the same account is refused unless forced', async () => {
  const { t, upstream } = await setup();
  const older = upstream.seed({ accountId: 'acct-same', iatSec: nowSec() - 2 * DAY }) as Doc;
  const newer = upstream.seed({ accountId: 'acct-same', iatSec: nowSec() - DAY }) as Doc;
  assert.equal((await put(t, newer)).statusCode, 200);
  const before = await rowBytes(t);
  const refused = await put(t, older);
  assert.equal(refused.statusCode, 409, refused.body);
  assert.equal(refused.json().refusal.reason, 'older');
  assert.match(refused.json().detail, /older than the stored login of the same account acct-same/);
  assert.deepEqual(await rowBytes(t), before);
  const forced = await put(t, older, '?force=true');
  assert.equal(forced.statusCode, 200, forced.body);
  assert.equal(t.core.refresher.current()?.parsed.tokens.refresh_token, older.tokens.refresh_token, 'the forced seed is stored and adopted');
  const seeded = t.logs.withEvent('seeded').at(-1);
  assert.equal(seeded?.['forced'], true);
  assert.equal((seeded?.['overrode'] as { reason: string }).reason, 'older');
});

test('an older login of another account is stored: the age rule is per account', async () => {
  const { t, upstream } = await setup();
  assert.equal((await put(t, upstream.seed({ accountId: 'acct-a', iatSec: nowSec() - DAY }))).statusCode, 200);
  const other = upstream.seed({ accountId: 'acct-b', iatSec: nowSec() - 5 * DAY });
  assert.equal((await put(t, other)).statusCode, 200);
  assert.equal(t.core.refresher.status().accountId, 'acct-b');
});

test('re-seeding the stored login, and a token whose refresh failed only transiently, is allowed', async () => {
  const { t, upstream } = await setup();
  const doc = dueSeed(upstream);
  assert.equal((await put(t, doc)).statusCode, 200);
  // Seed rows are not spending: the same document again is fine.
  assert.equal((await put(t, doc)).statusCode, 200);
  upstream.fault({ kind: 'status', status: 503 });
  assert.equal((await t.core.refresher.runCycle()).attempt, 'transient_failure');
  // The broker still holds and retries that token: it is not spent.
  assert.equal((await put(t, doc)).statusCode, 200);
});

test('a token spent before the full hash was kept is matched by its 8-hex prefix', async () => {
  const { t, upstream } = await setup();
  const doc = dueSeed(upstream);
  await t.core.pool.query(
    `INSERT INTO broker_refresh_events (secret_key, replica_id, reason, refresh_token_sha8, finished_at, outcome)
     VALUES ($1, 'old-replica', 'due', $2, now(), 'rotated')`,
    [KEY, sha(doc.tokens.refresh_token).slice(0, 8)],
  );
  const res = await put(t, doc);
  assert.equal(res.statusCode, 409, res.body);
  assert.equal(res.json().refusal.reason, 'spent');
  assert.equal(await rowBytes(t), undefined, 'nothing stored');
});

test('every seed is audited with its source and outcome, and seed rows are never taken for crashed POSTs', async () => {
  const { t, upstream } = await setup();
  const old = dueSeed(upstream);
  await put(t, old);
  await t.core.refresher.runCycle();
  await put(t, old);
  await put(t, old, '?force=true');
  const rows = await events(t);
  const seeds = rows.filter((e) => e['kind'] === 'seed');
  assert.deepEqual(
    seeds.map((e) => [e['outcome'], e['source'], e['reason']]),
    [
      ['stored_forced', 'admin_api', 'seed'],
      ['refused_spent', 'admin_api', 'seed'],
      ['stored', 'admin_api', 'seed'],
    ],
  );
  const sha8 = sha(old.tokens.refresh_token).slice(0, 8);
  for (const s of seeds) {
    assert.equal(s['refreshTokenSha8'], sha8);
    assert.ok(s['finishedAt'], 'written complete');
  }
  assert.equal(seeds[1]?.['newRefreshTokenSha8'], null, 'a refused seed stored nothing');
  assert.equal(seeds[0]?.['newRefreshTokenSha8'], sha8);
  assert.deepEqual(
    rows.filter((e) => e['kind'] === 'refresh').map((e) => e['outcome']),
    ['rotated'],
  );
  // Aged past any running POST, still nothing unfinished.
  await t.core.pool.query("UPDATE broker_refresh_events SET started_at = now() - interval '1 hour'");
  assert.deepEqual(await unfinishedIntents(t.core.pool, KEY, 60_000), []);
  // Logged with hash prefixes, never a token.
  const refused = t.logs.withEvent('seed_refused');
  assert.equal(refused.length, 1);
  assert.equal(refused[0]?.['source'], 'admin_api');
  assert.equal(refused[0]?.['refreshTokenSha8'], sha8);
  assert.equal(t.logs.withEvent('seeded').length, 2);
  const table = await t.core.pool.query('SELECT * FROM broker_refresh_events');
  assert.deepEqual(findLeaks([...t.logs.lines, JSON.stringify(rows), JSON.stringify(table.rows)], upstream.issuedTokens()), []);
});

test('a refresh intent records the full SHA-256 of the token it POSTs; a seed row records only the prefix', async () => {
  const { t, upstream } = await setup();
  const doc = dueSeed(upstream);
  await put(t, doc);
  await t.core.refresher.runCycle();
  const r = await t.core.pool.query<{ kind: string; refresh_token_sha256: string | null }>('SELECT kind, refresh_token_sha256 FROM broker_refresh_events ORDER BY id');
  assert.deepEqual(
    r.rows.map((x) => [x.kind, x.refresh_token_sha256]),
    [
      ['seed', null],
      ['refresh', sha(doc.tokens.refresh_token)],
    ],
  );
});

test('a seed waits for the refresh lock: it cannot land between a refresher\'s re-read and its compare-and-set', async () => {
  const { t, upstream } = await setup();
  const first = upstream.seed({ accountId: 'acct-lock' });
  assert.equal((await put(t, first)).statusCode, 200);
  const before = await rowBytes(t);
  let release!: () => void;
  const released = new Promise<void>((r) => (release = r));
  let held = false;
  const holder = t.core.store.withLock(KEY, true, async () => {
    held = true;
    await released;
  });
  await waitFor('the test to hold the refresh lock', () => held);
  const pending = put(t, upstream.seed({ accountId: 'acct-lock' }));
  await waitFor('the seed to queue on the advisory lock', async () => {
    const r = await t.core.pool.query("SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted");
    return r.rows[0].n === 1;
  });
  assert.deepEqual(await rowBytes(t), before, 'nothing written while the lock is held elsewhere');
  release();
  await holder;
  assert.equal((await pending).statusCode, 200);
  assert.notDeepEqual(await rowBytes(t), before);
});

test('PUT /admin/credential: force must be true or false', async () => {
  const { t, upstream } = await setup();
  const res = await put(t, upstream.seed(), '?force=yes');
  assert.equal(res.statusCode, 400);
  assert.equal(res.json().field, 'force');
  assert.equal(await rowBytes(t), undefined);
});

test('judgeSeed: no age refusal without both iat claims, for an equal iat, or without an account id', () => {
  const tok = (claims: Record<string, unknown>) => `${Buffer.from('{"alg":"none"}').toString('base64url')}.${Buffer.from(JSON.stringify(claims)).toString('base64url')}.x`;
  const snap = (iat: number | undefined, account: string | undefined, rt: string) =>
    buildSnapshot(
      Buffer.alloc(0),
      JSON.stringify({ tokens: { access_token: tok(iat === undefined ? {} : { iat }), id_token: tok({}), refresh_token: rt, ...(account ? { account_id: account } : {}) } }),
    );
  assert.equal(judgeSeed(snap(100, 'a', 'r1'), snap(200, 'a', 'r2'), undefined)?.reason, 'older');
  assert.equal(judgeSeed(snap(200, 'a', 'r1'), snap(200, 'a', 'r2'), undefined), undefined);
  assert.equal(judgeSeed(snap(undefined, 'a', 'r1'), snap(200, 'a', 'r2'), undefined), undefined);
  assert.equal(judgeSeed(snap(100, undefined, 'r1'), snap(200, undefined, 'r2'), undefined), undefined);
  assert.equal(judgeSeed(snap(300, 'a', 'r1'), snap(200, 'a', 'r2'), { at: new Date(0), kind: 'refresh' })?.reason, 'spent');
});

test('no token value appears in any log line of the seed-guard tests', () => {
  assert.deepEqual(findLeaks(suite.logLines(), suite.issuedTokens()), []);
});

test('the stale-seed guard applies to logins too: a login of a spent token or an older login of the same account is refused (409 stale_login), audited as login, unless forced', async () => {
  const { t, upstream } = await setup();
  const { storeLogin } = await import('../src/login/store.js');
  const { LoginError } = await import('../src/login/errors.js');
  const login = (doc: Doc, force = false) =>
    storeLogin({ store: t.core.store, secretKey: KEY, replicaId: 'test', method: 'device', doc: doc as never, startedAt: nowMs, now, source: 'admin_api', force });
  const refusedAs = async (doc: Doc) => {
    const before = await rowBytes(t);
    await assert.rejects(login(doc), (err: unknown) => err instanceof LoginError && err.reason === 'stale_login' && /nothing was stored|not stored/.test(err.message));
    assert.deepEqual(await rowBytes(t), before, 'nothing stored');
  };
  // A spent token: stored by a login, rotated by the broker, then the same login again.
  const first = dueSeed(upstream, 'acct-login');
  await login(first);
  assert.equal((await t.core.refresher.runCycle()).attempt, 'rotated');
  await refusedAs(first);
  // An older login of the same account.
  const older = upstream.seed({ accountId: 'acct-login', iatSec: nowSec() - 20 * DAY, expSec: nowSec() + DAY }) as Doc;
  await refusedAs(older);
  await login(older, true);
  assert.equal(JSON.parse(t.core.store.decrypt((await t.core.store.read(KEY))!)).tokens.refresh_token, older.tokens.refresh_token, 'forced: stored');
  const logins = (await events(t)).filter((e) => e['kind'] === 'login');
  assert.deepEqual(
    logins.map((e) => e['outcome']),
    ['stored_forced', 'refused_older', 'refused_spent', 'stored'],
  );
  for (const e of logins) assert.equal(e['source'], 'admin_api');
  // A stored login is not itself "spent": storing the same login again is allowed.
  await login(older);
});
