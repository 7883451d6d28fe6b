import { strict as assert } from 'node:assert';
import * as fs from 'node:fs';
import { test } from 'node:test';
import { ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import type { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';
import { tempDirs } from './helpers/tmp.js';
import { waitFor } from './helpers/wait.js';

const KEY = 'CODEX_AUTH_JSON';
const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
const suite = useSuite();
const tmp = tempDirs('cab-credentials-');

interface Described {
  name: string;
  pool: string;
  state: string;
  secretKey: string;
  accountId: string | null;
  latch: { upstreamCode: string | null } | null;
}

/** A document the fake upstream will rotate once, due now (1 h left of a 10-day token, 1-day margin). */
function dueSeed(upstream: FakeUpstream, accountId: string) {
  const nowSec = Math.floor(Date.now() / 1000);
  return upstream.seed({ accountId, iatSec: nowSec - 10 * 86_400 + 3_600, expSec: nowSec + 3_600 });
}

function put(t: TestApp, name: string, doc: object, query = '') {
  return t.app.inject({ method: 'PUT', url: `/admin/credentials/${name}${query}`, headers: admin, payload: doc });
}

async function list(t: TestApp): Promise<Described[]> {
  const res = await t.app.inject({ url: '/admin/credentials', headers: admin });
  assert.equal(res.statusCode, 200);
  return (res.json() as { credentials: Described[] }).credentials;
}

async function storedAccess(t: TestApp, key: string): Promise<string | undefined> {
  const row = await t.core.store.read(key);
  return row ? (JSON.parse(t.core.store.decrypt(row)) as { tokens: { access_token: string } }).tokens.access_token : undefined;
}

test('a named credential is stored under CODEX_AUTH_JSON__<NAME>, listed with its pool, and appears on every replica through NOTIFY', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const a = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url });
  const b = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url });
  const res = await put(a, 'team-2', upstream.seed({ accountId: 'acct-team-2' }), '?pool=batch');
  assert.equal(res.statusCode, 200, res.body);
  assert.equal((res.json() as Described).pool, 'batch');
  assert.ok(await a.core.store.read('CODEX_AUTH_JSON__TEAM_2'), 'stored under the derived key');
  await waitFor('replica b holds team-2', () => b.core.credentials.get('team-2')?.refresher.current()?.account.accountId === 'acct-team-2');
  const names = (await list(b)).map((c) => [c.name, c.pool, c.secretKey, c.accountId]);
  assert.deepEqual(names, [
    ['default', 'default', KEY, null],
    ['team-2', 'batch', 'CODEX_AUTH_JSON__TEAM_2', 'acct-team-2'],
  ]);
  // The default login is untouched by the named one.
  assert.equal(await a.core.store.read(KEY), null);
  const metrics = await b.app.inject({ url: '/metrics' });
  assert.match(metrics.body, /codex_broker_credential_state\{credential="team-2",state="fresh"\} 1/);
  assert.match(metrics.body, /codex_broker_credential_state\{credential="default",state="absent"\} 1/);
});

test('bad names and pools are 400, an unknown credential is 404, and default cannot be removed', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const t = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, start: false });
  for (const bad of ['Team', 'a_b', '-a', 'x'.repeat(41)]) {
    const res = await put(t, encodeURIComponent(bad), upstream.seed());
    assert.equal(res.statusCode, 400, bad);
    assert.equal((res.json() as { code: string }).code, 'invalid_credential', bad);
  }
  assert.equal((await put(t, 'ok', upstream.seed(), '?pool=Bad_Pool')).statusCode, 400);
  assert.equal((await t.app.inject({ method: 'POST', url: '/admin/credentials/nope/refresh', headers: admin })).statusCode, 404);
  assert.equal((await t.app.inject({ method: 'DELETE', url: '/admin/credentials/nope', headers: admin })).statusCode, 404);
  const dflt = await t.app.inject({ method: 'DELETE', url: '/admin/credentials/default', headers: admin });
  assert.equal(dflt.statusCode, 409);
  assert.equal((dflt.json() as { code: string }).code, 'default_credential');
});

test('PUT /admin/credentials/:name goes through the stale-seed guard: an older copy is 409 stale_seed, ?force=true stores it', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const t = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, start: false });
  const nowSec = Math.floor(Date.now() / 1000);
  const older = upstream.seed({ accountId: 'acct-w', iatSec: nowSec - 7_200, expSec: nowSec + 86_400 * 5 });
  const newer = upstream.seed({ accountId: 'acct-w', iatSec: nowSec - 60, expSec: nowSec + 86_400 * 9 });
  assert.equal((await put(t, 'work', newer)).statusCode, 200);
  const refused = await put(t, 'work', older);
  assert.equal(refused.statusCode, 409);
  assert.equal((refused.json() as { code: string }).code, 'stale_seed');
  assert.equal((await put(t, 'work', older, '?force=true')).statusCode, 200);
});

test('3 replicas and 3 credentials all due at once: one POST each, zero reuse, every replica serves each rotation', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const apps = [];
  for (let i = 0; i < 3; i++) apps.push(await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, config: { replicaId: `replica-${i}` } }));
  const [a] = apps as [TestApp];
  // Stored directly, all before any replica hears of them: they are due together.
  await a.core.store.put(KEY, JSON.stringify(dueSeed(upstream, 'acct-0')));
  await a.core.store.put(`${KEY}__ONE`, JSON.stringify(dueSeed(upstream, 'acct-1')));
  await a.core.store.put(`${KEY}__TWO`, JSON.stringify(dueSeed(upstream, 'acct-2')));
  await a.core.pool.query(
    `INSERT INTO broker_credentials (name, secret_key) VALUES ('one', '${KEY}__ONE'), ('two', '${KEY}__TWO');
     SELECT pg_notify('broker_credentials_changed', 'one')`,
  );
  await waitFor('three rotations', () => upstream.rotations === 3, 15_000);
  for (const t of apps) {
    for (const [name, key] of [['default', KEY], ['one', `${KEY}__ONE`], ['two', `${KEY}__TWO`]] as const) {
      const stored = await storedAccess(t, key);
      await waitFor(`${name} adopted`, () => t.core.credentials.get(name)?.refresher.current()?.parsed.tokens.access_token === stored);
    }
  }
  assert.equal(upstream.posts, 3, 'one POST per credential across three replicas');
  assert.equal(upstream.reuseAnswers, 0);
  const events = await a.core.pool.query<{ secret_key: string; n: string }>(`SELECT secret_key, count(*) AS n FROM broker_refresh_events WHERE kind = 'refresh' GROUP BY secret_key ORDER BY secret_key`);
  assert.deepEqual(
    events.rows.map((r) => [r.secret_key, Number(r.n)]),
    [[KEY, 1], [`${KEY}__ONE`, 1], [`${KEY}__TWO`, 1]],
    'audit rows carry each credential key',
  );
});

test('a latched credential leaves the others serving and rotating', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const t = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, start: false });
  await t.core.credentials.load();
  const burned = dueSeed(upstream, 'acct-burned') as { tokens: { refresh_token: string } };
  burned.tokens.refresh_token = 'a-refresh-token-the-upstream-never-issued';
  assert.equal((await put(t, 'burned', burned)).statusCode, 200);
  assert.equal((await put(t, 'work', dueSeed(upstream, 'acct-work'))).statusCode, 200);
  assert.equal((await put(t, 'default', dueSeed(upstream, 'acct-default'))).statusCode, 200);
  const burnedR = t.core.credentials.get('burned')?.refresher;
  assert.ok(burnedR);
  assert.equal((await burnedR.runCycle()).attempt, 'permanent_failure');
  assert.equal((await t.core.credentials.get('work')?.refresher.runCycle())?.attempt, 'rotated');
  assert.equal((await t.core.refresher.runCycle()).attempt, 'rotated');
  assert.equal((await burnedR.runCycle()).check, 'latched', 'never POSTed again');
  const states = Object.fromEntries((await list(t)).map((c) => [c.name, [c.state, c.latch?.upstreamCode ?? null]]));
  assert.deepEqual(states, { default: ['fresh', null], burned: ['latched', 'refresh_token_invalidated'], work: ['fresh', null] });
  assert.equal(upstream.posts, 3);
  const metrics = await t.app.inject({ url: '/metrics' });
  assert.match(metrics.body, /codex_broker_credential_state\{credential="burned",state="latched"\} 1/);
  assert.match(metrics.body, /codex_broker_refresh_attempts_total\{credential="work",outcome="rotated"\} 1/);
  assert.match(metrics.body, /codex_broker_refresh_attempts_total\{credential="default",outcome="permanent_failure"\} 0/);
  // POST /admin/credentials/:name/refresh reaches the named refresher only.
  const refreshed = await t.app.inject({ method: 'POST', url: '/admin/credentials/work/refresh', headers: admin });
  assert.equal((refreshed.json() as { outcome: string }).outcome, 'rotated');
  assert.equal(upstream.posts, 4);
});

test('a removed credential disappears on every replica, with its stored login and metric series', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const a = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url });
  const b = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url });
  assert.equal((await put(a, 'spare', upstream.seed({ accountId: 'acct-spare' }))).statusCode, 200);
  await waitFor('b holds spare', () => b.core.credentials.get('spare') !== undefined);
  const del = await a.app.inject({ method: 'DELETE', url: '/admin/credentials/spare', headers: admin });
  assert.equal(del.statusCode, 204);
  await waitFor('b dropped spare', () => b.core.credentials.get('spare') === undefined);
  assert.equal(await a.core.store.read(`${KEY}__SPARE`), null);
  assert.deepEqual((await list(b)).map((c) => c.name), ['default']);
  assert.doesNotMatch((await b.app.inject({ url: '/metrics' })).body, /credential="spare"/);
});

test('a SIGKILL with two journaled rotations: both are written back at start, before any POST', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const dir = tmp();
  const first = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, journalDir: dir, start: false });
  await first.core.credentials.load();
  assert.equal((await put(first, 'default', dueSeed(upstream, 'acct-d'))).statusCode, 200);
  assert.equal((await put(first, 'work', dueSeed(upstream, 'acct-w'))).statusCode, 200);
  // The process got both answers, journaled them, and died before either write-back.
  const store = first.core.store as unknown as { compareAndSet: (...a: unknown[]) => Promise<boolean> };
  store.compareAndSet = async () => {
    throw new Error('killed');
  };
  assert.equal((await first.core.refresher.runCycle()).attempt, 'rotated');
  const rotatedDefault = upstream.lastAccessToken();
  assert.equal((await first.core.credentials.get('work')?.refresher.runCycle())?.attempt, 'rotated');
  const rotatedWork = upstream.lastAccessToken();
  assert.equal(fs.readdirSync(dir).filter((f) => f.startsWith('rotation-journal.')).length, 2, 'one journal file per credential');
  await first.close();
  const restarted = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, journalDir: dir });
  assert.equal(await storedAccess(restarted, KEY), rotatedDefault);
  assert.equal(await storedAccess(restarted, `${KEY}__WORK`), rotatedWork);
  assert.equal(restarted.logs.withEvent('journal_recovered').length, 2);
  assert.equal(upstream.posts, 2);
  assert.equal(upstream.reuseAnswers, 0);
});

test('no token value appears in any log line of the credentials tests', () => {
  assert.deepEqual(findLeaks(suite.logLines(), suite.issuedTokens()), []);
});
