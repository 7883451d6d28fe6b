/**
 * Usage-driven switching (DESIGN: Pools; issue #13): real apps on one real Postgres, a real
 * local fake of the backend's /wham/usage reporting each login's own percentages, and the
 * stored assignments, metrics and alerts that follow.
 */
import { strict as assert } from 'node:assert';
import { test, type TestContext } from 'node:test';
import { ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import { insertClients, type BulkClient } from './helpers/bulk-clients.js';
import { FakeUsageBackend, type FakeUsage } from './helpers/fake-usage.js';
import type { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { expectAlerts, promtoolOrSkip } from './helpers/promtool.js';
import { useSuite } from './helpers/suite.js';
import { settledCount, waitFor } from './helpers/wait.js';

const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
const suite = useSuite();
const POOL = 'team';
const LOGINS = ['one', 'two', 'three'] as const;
const INTERVAL_S = 0.2;
const RESET = 1_900_000_000;

const figures = (primary: number, secondary = 5): FakeUsage => ({
  plan: 'plus',
  primary: { usedPercent: primary, resetAt: RESET },
  secondary: { usedPercent: secondary, resetAt: RESET + 500_000 },
});

interface Fleet {
  replicas: TestApp[];
  usage: FakeUsageBackend;
  upstream: FakeUpstream;
  /** The access token of each login (the fake backend answers each its own figures). */
  tokens: Record<string, string>;
  clients: BulkClient[];
}

/**
 * `replicas` brokers polling usage every 0.2 s, three logins in pool `team` (at 10, 20
 * and 30 %, so ties break the same way everywhere) and `n` clients of the pool, assigned.
 */
async function fleet(t: TestContext, n: number, replicas = 2): Promise<Fleet> {
  const usage = await FakeUsageBackend.start();
  t.after(() => usage.close());
  const upstream = await suite.upstream();
  const databaseUrl = await suite.pg.newDatabase();
  const config = { CHATGPT_BASE_URL: usage.url, USAGE_POLL_INTERVAL_SECONDS: INTERVAL_S, POOL_SWITCH_PERCENT: 90 };
  const apps: TestApp[] = [];
  for (let i = 0; i < replicas; i++) apps.push(
      // Background client reloads and last-seen flushes slowed down: the tests reload when they
      // need to, and the query count below sees only what serving does.
      await suite.app({ databaseUrl, upstreamUrl: upstream.url, config: { ...config, replicaId: `replica-${i}` }, clientReloadMs: 3_600_000, clientFlushMs: 3_600_000, login: { sweepMs: 0 } }),
    );
  const tokens: Record<string, string> = {};
  for (const [i, name] of LOGINS.entries()) {
    const doc = upstream.seed({ accountId: `acct-${name}` }) as { tokens: { access_token: string } };
    tokens[name] = doc.tokens.access_token;
    usage.setUsage(doc.tokens.access_token, figures(10 * (i + 1)));
    const res = await apps[0]!.app.inject({ method: 'PUT', url: `/admin/credentials/${name}?pool=${POOL}`, headers: admin, payload: doc });
    assert.equal(res.statusCode, 200, res.body);
  }
  await waitFor('every replica to hold the logins and their usage', () =>
    apps.every((a) => LOGINS.every((name) => { const h = a.core.credentials.get(name); return h?.refresher.state() === 'fresh' && a.core.usage.headroom(h.secretKey) !== undefined; })),
  10_000);
  const clients = await insertClients(apps[0]!.core, n, 'ws', POOL);
  for (const a of apps.slice(1)) await a.core.clients.reload();
  await apps[0]!.core.assignments.rebalance();
  await waitFor('every client assigned', async () => Object.values(await stored(apps[0]!)).every((c) => c !== null));
  for (const a of apps) await a.core.clients.reload();
  return { replicas: apps, usage, upstream, tokens, clients };
}

async function stored(t: TestApp): Promise<Record<string, string | null>> {
  const r = await t.core.pool.query<{ name: string; assigned_credential: string | null }>('SELECT name, assigned_credential FROM broker_clients WHERE revoked_at IS NULL ORDER BY name');
  return Object.fromEntries(r.rows.map((x) => [x.name, x.assigned_credential]));
}

function tally(assigned: Record<string, string | null>): Record<string, number> {
  const out: Record<string, number> = Object.fromEntries(LOGINS.map((n) => [n, 0]));
  for (const c of Object.values(assigned)) if (c) out[c] = (out[c] ?? 0) + 1;
  return out;
}

/** pool_switches_total by reason, summed over every replica. */
async function switches(apps: TestApp[]): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const a of apps) {
    for (const v of (await a.metrics.poolSwitches.get()).values) {
      const k = `${v.labels['pool']}/${v.labels['reason']}`;
      out[k] = (out[k] ?? 0) + v.value;
    }
  }
  return out;
}

/** Wait until every replica has fetched `percent` for this login (the poll, then the NOTIFY). */
async function fills(f: Fleet, name: string, percent: number, secondary = 5): Promise<void> {
  f.usage.setUsage(f.tokens[name]!, figures(percent, secondary));
  await waitFor(`every replica to see ${name} at ${percent} %`, () =>
    f.replicas.every((a) => a.core.usage.view(a.core.credentials.get(name)!.secretKey)?.primary?.usedPercent === percent),
  10_000);
}

/** A few more polls of every login, so that anything they were going to move has moved. */
async function settle(f: Fleet): Promise<void> {
  const gets = f.usage.gets;
  await waitFor('two more rounds of polls', () => f.usage.gets >= gets + 2 * LOGINS.length, 10_000);
  for (const a of f.replicas) await a.core.assignments.rebalance();
}

async function served(a: TestApp, c: BulkClient): Promise<string | undefined> {
  const res = await a.app.inject({ url: '/codex-auth', headers: { authorization: `Bearer ${c.token}` } });
  assert.equal(res.statusCode, 200, res.body);
  return res.headers['x-codex-credential'] as string | undefined;
}

test('a login reaching POOL_SWITCH_PERCENT moves its clients, spread over the logins of the pool under it (300 clients: 100/100/100, then 0/150/150, never all on one)', async (t) => {
  const f = await fleet(t, 300);
  const [a, b] = f.replicas as [TestApp, TestApp];
  const before = await stored(a);
  assert.deepEqual(tally(before), { one: 100, two: 100, three: 100 }, 'new clients go to the login with the fewest clients');

  await fills(f, 'one', 92);
  await waitFor('nobody left on one', async () => tally(await stored(a))['one'] === 0, 10_000);
  await settle(f);
  const after = await stored(a);
  const counts = tally(after);
  t.diagnostic(`after one filled up: ${JSON.stringify(counts)}`);
  assert.equal(counts['one'], 0);
  for (const name of ['two', 'three']) assert.ok(counts[name]! >= 140 && counts[name]! <= 160, `spread, not piled on one login: ${JSON.stringify(counts)}`);
  // Only those on the full login moved; everyone else stayed (sticky).
  for (const [client, cred] of Object.entries(before)) if (cred !== 'one') assert.equal(after[client], cred, `${client} stays`);
  // Each move is written once fleet-wide (compare-and-set) and counted once.
  assert.deepEqual(await switches(f.replicas), { [`${POOL}/usage`]: 100 });
  assert.equal(a.logs.withEvent('pool_switch').length + b.logs.withEvent('pool_switch').length, 100, 'each switch logged once');
  assert.equal(a.logs.withEvent('pool_switch')[0]?.['reason'] ?? b.logs.withEvent('pool_switch')[0]?.['reason'], 'usage');

  // On the next fetch every replica serves a moved client its new login.
  for (const r of f.replicas) await r.core.clients.reload();
  const moved = f.clients.filter((c) => before[c.name] === 'one').slice(0, 10);
  for (const c of moved) {
    const fromA = await served(a, c);
    assert.equal(fromA, after[c.name]);
    assert.equal(await served(b, c), fromA, 'both replicas serve the same login');
  }
  const text = (await a.app.inject({ url: '/metrics' })).body;
  assert.match(text, /^codex_broker_pool_assigned_clients\{pool="team",credential="one"\} 0$/m);
  assert.match(text, /^codex_broker_usage_used_percent\{credential="one",window="primary"\} 92$/m);
  assert.match(text, /^codex_broker_pool_switch_percent 90$/m);
  assert.deepEqual(a.core.assignments.exhaustedPools(), []);
  // GET /admin/credentials shows each login's usage beside its clients.
  const listed = (await a.app.inject({ url: '/admin/credentials', headers: admin })).json() as {
    credentials: Array<{ name: string; clientsAssigned: number; usage: { planType: string; primary: { usedPercent: number; resetAt: string }; ageSeconds: number } | null }>;
  };
  const one = listed.credentials.find((c) => c.name === 'one')!;
  assert.equal(one.clientsAssigned, 0);
  assert.equal(one.usage?.planType, 'plus');
  assert.equal(one.usage?.primary.usedPercent, 92);
  assert.equal(one.usage?.primary.resetAt, new Date(RESET * 1000).toISOString());
  assert.ok(typeof one.usage?.ageSeconds === 'number');

  // Serving by usage costs no query: with polling stopped (its queries aside) and one login
  // still full, 300 fetches (the full login's former clients included) send nothing.
  for (const r of f.replicas) await r.core.usage.close();
  const queries = async () => (await a.metrics.dbQueries.get()).values[0]?.value ?? 0;
  const quietAt = await settledCount(queries);
  for (const c of f.clients) assert.equal(await served(a, c), after[c.name]);
  assert.equal((await queries()) - quietAt, 0, 'no database query while serving');
});

test('sticky after a reset: when the full login resets nobody moves back, and new clients go to it (the fewest)', async (t) => {
  const f = await fleet(t, 30);
  const [a] = f.replicas as [TestApp];
  const onOne = tally(await stored(a))['one'];
  await fills(f, 'one', 95);
  await waitFor('nobody left on one', async () => tally(await stored(a))['one'] === 0, 10_000);
  // A replica counts its moves once its statement has committed, a moment after the rows change.
  await waitFor('every move counted', async () => (await switches(f.replicas))[`${POOL}/usage`] === onOne, 10_000);
  const moved = await stored(a);
  const switched = await switches(f.replicas);

  await fills(f, 'one', 4);
  await settle(f);
  assert.deepEqual(await stored(a), moved, 'the window reset: everyone stays where they are');
  assert.deepEqual(await switches(f.replicas), switched);

  const [late] = await insertClients(a.core, 1, 'late', POOL);
  await a.core.assignments.rebalance();
  assert.equal((await stored(a))[late!.name], 'one', 'a new client goes to the login with the fewest clients');
});

test('every login of the pool over the threshold: nobody moves, the pool is exhausted (status, alert); the first to reset takes the others\' clients', async (t) => {
  const f = await fleet(t, 30);
  const [a, b] = f.replicas as [TestApp, TestApp];
  // two and three fill up (three in its weekly window): everyone ends on one.
  await Promise.all([fills(f, 'two', 96), fills(f, 'three', 40, 93)]);
  await waitFor('everyone on one', async () => tally(await stored(a))['one'] === 30, 10_000);
  // Moves are counted once their statement has committed, a moment after the rows change.
  const usageMoves = async () => (await switches(f.replicas))[`${POOL}/usage`] ?? 0;
  await waitFor('the moves counted', async () => (await usageMoves()) >= 20, 10_000);
  await settledCount(usageMoves);
  const switched = await switches(f.replicas);
  // 20 moves at least (some of two's clients may have gone to three before it filled).
  assert.ok((switched[`${POOL}/usage`] ?? 0) >= 20, JSON.stringify(switched));
  // Then one fills up too: no login has headroom, so nobody moves.
  await fills(f, 'one', 91);
  await settle(f);
  assert.equal(tally(await stored(a))['one'], 30, 'no login has headroom: clients stay where they are');
  assert.deepEqual(await switches(f.replicas), switched);
  for (const r of f.replicas) assert.deepEqual(r.core.assignments.exhaustedPools(), [POOL]);
  const status = (await a.app.inject({ url: '/status', headers: admin })).json() as { exhaustedPools: string[] };
  assert.deepEqual(status.exhaustedPools, [POOL]);

  // The alert rules on what the two replicas actually expose.
  if (promtoolOrSkip(t)) {
    const scrapes = await Promise.all(f.replicas.map(async (r) => (await r.app.inject({ url: '/metrics' })).body));
    expectAlerts(scrapes, '10m', [
      { alertname: 'CodexBrokerPoolExhausted', exp: [{ severity: 'critical', pool: POOL }] },
      {
        alertname: 'CodexBrokerUsageHigh',
        exp: [
          { severity: 'warning', credential: 'one', window: 'primary' },
          { severity: 'warning', credential: 'three', window: 'secondary' },
          { severity: 'warning', credential: 'two', window: 'primary' },
        ],
      },
    ]);
  }

  // two resets: the clients of the full login now have somewhere to go.
  await fills(f, 'two', 3);
  await waitFor('everyone on two', async () => tally(await stored(a))['two'] === 30, 10_000);
  assert.deepEqual(a.core.assignments.exhaustedPools(), []);
  assert.deepEqual(b.core.assignments.exhaustedPools(), []);
});

test('no token appears in any log line of the switching tests', () => {
  assert.deepEqual(findLeaks(suite.logLines(), suite.issuedTokens()), []);
});
