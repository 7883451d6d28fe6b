/**
 * Usage polling as deployed: real apps (createTestApp) on one real Postgres, a real local
 * fake of the backend's /wham/usage, and the figures reaching /status and /metrics.
 */
import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import { FakeUsageBackend } from './helpers/fake-usage.js';
import type { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';
import { waitFor } from './helpers/wait.js';
import type { UsageView } from '../src/usage/view.js';

const suite = useSuite();
const KEY = 'CODEX_AUTH_JSON';

async function backend(t: { after(fn: () => Promise<void>): void }): Promise<FakeUsageBackend> {
  const b = await FakeUsageBackend.start();
  t.after(() => b.close());
  return b;
}

async function statusUsage(a: TestApp): Promise<UsageView | null> {
  const res = await a.app.inject({ method: 'GET', url: '/status', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
  assert.equal(res.statusCode, 200, res.body);
  return (res.json() as { usage: UsageView | null }).usage;
}

async function seed(a: TestApp, upstream: FakeUpstream, opts: Parameters<FakeUpstream['seed']>[0] = {}) {
  const doc = upstream.seed(opts);
  await a.core.store.put(KEY, JSON.stringify(doc));
  await a.core.refresher.reload();
  return doc;
}

test('three replicas poll the backend once per interval between them, not once each, and all show the same figures', async (t) => {
  const usage = await backend(t);
  const upstream = await suite.upstream();
  const databaseUrl = await suite.pg.newDatabase();
  const intervalMs = 300;
  const config = { CHATGPT_BASE_URL: usage.url, USAGE_POLL_INTERVAL_SECONDS: intervalMs / 1000 };
  const apps: TestApp[] = [];
  for (let i = 0; i < 3; i++) apps.push(await suite.app({ databaseUrl, upstreamUrl: upstream.url, config: { ...config, replicaId: `replica-${i}` } }));
  const started = Date.now();
  const doc = upstream.seed({ accountId: 'acct-usage' });
  await apps[0]!.core.store.put(KEY, JSON.stringify(doc));
  await waitFor('every replica to load the seed', () => apps.every((a) => a.core.refresher.state() === 'fresh'));

  await waitFor('six polls', () => usage.gets >= 6, 15_000);
  // Read the count before the clock: the database spaces claims at least one interval apart
  // on its clock (this machine's), so n GETs need at least n - 1 whole intervals.
  const gets = usage.gets;
  const intervals = (Date.now() - started) / intervalMs;
  const perReplica = apps.map((a) => a.core.usage.polls);
  t.diagnostic(`${gets} GETs over ${intervals.toFixed(1)} intervals with 3 replicas; polls per replica ${perReplica.join('/')}`);
  assert.ok(gets <= Math.floor(intervals) + 1, `${gets} GETs in ${intervals.toFixed(1)} intervals: at most one per interval`);
  assert.ok(usage.seen.every((s) => s.accountId === 'acct-usage' && s.bearer === (doc['tokens'] as Record<string, string>)['access_token']));

  // A new figure, fetched by whichever replica polls next, reaches every replica (NOTIFY).
  usage.usage = { plan: 'pro', primary: { usedPercent: 95, resetAt: 1_900_000_123 }, secondary: { usedPercent: 60, resetAt: 1_900_500_000 } };
  await waitFor('every replica to show 95 %', async () => (await Promise.all(apps.map(statusUsage))).every((u) => u?.primary?.usedPercent === 95), 10_000);
  for (const a of apps) {
    const u = (await statusUsage(a))!;
    assert.equal(u.planType, 'pro');
    assert.equal(u.primary?.resetAt, new Date(1_900_000_123_000).toISOString());
    assert.equal(u.secondary?.usedPercent, 60);
    assert.equal(u.stale, false);
    assert.equal(u.lastError, null);
    assert.ok(u.ageSeconds !== null && u.ageSeconds >= 0);
    const text = await a.metrics.registry.metrics();
    assert.match(text, /^codex_broker_usage_used_percent\{credential="default",window="primary"\} 95$/m);
    assert.match(text, /^codex_broker_usage_used_percent\{credential="default",window="secondary"\} 60$/m);
    assert.match(text, /^codex_broker_usage_reset_timestamp_seconds\{credential="default",window="primary"\} 1900000123$/m);
    assert.match(text, /^codex_broker_usage_snapshot_age_seconds\{credential="default"\} \d+$/m);
  }
  const tokens = [(doc['tokens'] as Record<string, string>)['access_token']!, (doc['tokens'] as Record<string, string>)['refresh_token']!];
  assert.deepEqual(findLeaks(suite.logLines(), tokens), []);
  const stored = await apps[0]!.core.pool.query<{ s: string }>('SELECT snapshot::text AS s FROM broker_usage');
  assert.deepEqual(findLeaks(stored.rows.map((r) => r.s), tokens), [], 'the stored snapshot holds figures, not the answer or a token');
});

test('a failed poll keeps the last figures, marked stale with their age and the reason, and never refreshes', async (t) => {
  const usage = await backend(t);
  const upstream = await suite.upstream();
  const a = await suite.app({ databaseUrl: await suite.pg.newDatabase(), upstreamUrl: upstream.url, config: { CHATGPT_BASE_URL: usage.url, USAGE_POLL_INTERVAL_SECONDS: 0.1 } });
  await seed(a, upstream);
  await waitFor('a first snapshot', async () => (await statusUsage(a))?.stale === false);
  const good = (await statusUsage(a))!;
  assert.equal(good.primary?.usedPercent, 12);
  const postsBefore = upstream.posts;
  // The figures the failed polls keep: those of the last good poll, which is `good` or one
  // that was in flight when the answer changed below (polls run every 100 ms; on a loaded
  // machine one answered 'accept' can land after `good` was read).
  let kept: string | null | undefined;

  for (const [answer, code] of [
    ['reject', 'status_401'],
    ['error', 'status_502'],
    ['malformed', 'malformed'],
  ] as const) {
    usage.answer = answer;
    await waitFor(`a poll answered ${answer}`, async () => (await statusUsage(a))?.lastError === code);
    const u = (await statusUsage(a))!;
    assert.equal(u.stale, true);
    assert.equal(u.primary?.usedPercent, 12, 'the last figures are kept');
    assert.ok(u.fetchedAt !== null && good.fetchedAt !== null && Date.parse(u.fetchedAt) >= Date.parse(good.fetchedAt), `from the last good poll (${u.fetchedAt}, first read ${good.fetchedAt})`);
    kept ??= u.fetchedAt;
    assert.equal(u.fetchedAt, kept, 'a failed poll never replaces the kept figures');
    assert.ok(u.ageSeconds !== null && u.ageSeconds >= 0);
    assert.match(await a.metrics.registry.metrics(), /^codex_broker_usage_used_percent\{credential="default",window="primary"\} 12$/m);
  }
  assert.equal(upstream.posts, postsBefore, 'a 401 from /wham/usage triggers no refresh');
  assert.equal(a.core.refresher.state(), 'fresh');
  assert.equal(a.logs.lines.filter((l) => l.includes('"usage_poll_failed"') && l.includes('"level":40')).length, 1, 'one warning per outage, not one per poll');

  usage.answer = 'accept';
  await waitFor('recovery', async () => (await statusUsage(a))?.stale === false);
  assert.equal((await statusUsage(a))?.lastError, null);
});

test('a latched or expired credential is not polled; a usable one is', async (t) => {
  const usage = await backend(t);
  const upstream = await suite.upstream();
  // Not started: no timers; each look for a due poll is an explicit tick.
  const a = await suite.app({ databaseUrl: await suite.pg.newDatabase(), upstreamUrl: upstream.url, start: false, config: { CHATGPT_BASE_URL: usage.url, USAGE_POLL_INTERVAL_SECONDS: 0.01 } });
  const nowSec = Math.floor(Date.now() / 1000);

  await a.core.usage.tick();
  assert.equal(usage.gets, 0, 'nothing stored: nothing to poll');

  await seed(a, upstream, { iatSec: nowSec - 7_200, expSec: nowSec - 60 });
  assert.equal(a.core.refresher.state(), 'expired');
  for (let i = 0; i < 3; i++) await a.core.usage.tick();
  assert.equal(usage.gets, 0, 'an expired credential is not polled');

  await seed(a, upstream);
  upstream.fault({ kind: 'status', status: 401, body: { error: { message: 'invalidated', code: 'refresh_token_invalidated' } } });
  await a.core.refresher.runCycle({ force: true, ignoreBackoff: true, waitForLock: true });
  assert.equal(a.core.refresher.state(), 'latched');
  for (let i = 0; i < 3; i++) await a.core.usage.tick();
  assert.equal(usage.gets, 0, 'a latched credential is not polled');

  await seed(a, upstream);
  await a.core.usage.tick();
  assert.equal(usage.gets, 1, 'a usable credential is polled');
});

test('with USAGE_POLL_INTERVAL_SECONDS=0 nothing is polled, /status usage is null and no usage series is exported', async (t) => {
  const usage = await backend(t);
  const upstream = await suite.upstream();
  const a = await suite.app({ databaseUrl: await suite.pg.newDatabase(), upstreamUrl: upstream.url, config: { CHATGPT_BASE_URL: usage.url, USAGE_POLL_INTERVAL_SECONDS: 0 } });
  await seed(a, upstream);
  await a.core.usage.tick();
  assert.equal(usage.gets, 0);
  assert.equal(await statusUsage(a), null);
  assert.doesNotMatch(await a.metrics.registry.metrics(), /^codex_broker_usage_\w+\{/m);
});
