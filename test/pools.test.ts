import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import type { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';
import { settledCount, waitFor } from './helpers/wait.js';

const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
const suite = useSuite();
const secrets: string[] = [];

interface NewClient {
  token: string;
  refreshCredential: string;
  pool: string;
}

async function seed(t: TestApp, name: string, doc: object, pool = 'default') {
  const res = await t.app.inject({ method: 'PUT', url: `/admin/credentials/${name}?pool=${pool}`, headers: admin, payload: doc });
  assert.equal(res.statusCode, 200, res.body);
}

async function addClient(t: TestApp, name: string, pool?: string): Promise<NewClient> {
  const res = await t.app.inject({ method: 'POST', url: '/admin/clients', headers: admin, payload: { name, ...(pool ? { pool } : {}) } });
  assert.equal(res.statusCode, 201, res.body);
  const c = res.json() as NewClient;
  secrets.push(c.token, c.refreshCredential);
  return c;
}

async function served(t: TestApp, c: NewClient): Promise<{ status: number; credential: string | undefined; accessToken: string | undefined }> {
  const res = await t.app.inject({ url: '/codex-auth', headers: { authorization: `Bearer ${c.token}` } });
  const header = res.headers['x-codex-credential'];
  return { status: res.statusCode, credential: typeof header === 'string' ? header : undefined, accessToken: res.statusCode === 200 ? (res.json() as { tokens: { access_token: string } }).tokens.access_token : undefined };
}

async function stored(t: TestApp): Promise<Record<string, string | null>> {
  const r = await t.core.pool.query<{ name: string; assigned_credential: string | null }>('SELECT name, assigned_credential FROM broker_clients WHERE revoked_at IS NULL ORDER BY name');
  return Object.fromEntries(r.rows.map((x) => [x.name, x.assigned_credential]));
}

async function switches(t: TestApp): Promise<Record<string, number>> {
  const m = await t.metrics.poolSwitches.get();
  return Object.fromEntries(m.values.map((v) => [`${v.labels['pool']}/${v.labels['reason']}`, v.value]));
}

function dueSeed(upstream: FakeUpstream, accountId: string) {
  const nowSec = Math.floor(Date.now() / 1000);
  return upstream.seed({ accountId, iatSec: nowSec - 10 * 86_400 + 3_600, expSec: nowSec + 3_600 });
}

test('clients of a pool are spread over its credentials, stored, and served the same one by every replica (x-codex-credential names it)', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const a = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url });
  const b = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url });
  await seed(a, 'one', upstream.seed({ accountId: 'acct-1' }), 'batch');
  await seed(a, 'two', upstream.seed({ accountId: 'acct-2' }), 'batch');
  await seed(a, 'default', upstream.seed({ accountId: 'acct-d' }));
  const clients: Record<string, NewClient> = {};
  for (const name of ['b1', 'b2', 'b3', 'b4']) clients[name] = await addClient(a, name, 'batch');
  clients['d1'] = await addClient(a, 'd1');
  await waitFor('every client assigned', async () => Object.values(await stored(a)).every((v) => v !== null));
  const assigned = await stored(a);
  assert.equal(assigned['d1'], 'default');
  const batch = ['b1', 'b2', 'b3', 'b4'].map((n) => assigned[n]);
  assert.deepEqual(
    batch.filter((x) => x === 'one').length,
    2,
    `spread evenly over the pool: ${JSON.stringify(assigned)}`,
  );
  for (const [name, c] of Object.entries(clients)) {
    await waitFor(`b knows ${name}`, () => b.core.clients.authenticate(c.token)?.assigned === assigned[name]);
    const fromA = await served(a, c);
    const fromB = await served(b, c);
    assert.equal(fromA.credential, assigned[name]);
    assert.deepEqual(fromB, fromA, `${name}: both replicas serve the same credential`);
    // The drop-in route: the same credential, still under CODEX_AUTH_JSON.
    const drop = await a.app.inject({ url: '/workspaces/11111111-1111-4111-8111-111111111111/secrets/values', headers: { authorization: `Bearer ${c.token}` } });
    assert.equal(drop.statusCode, 200);
    assert.equal(drop.headers['x-codex-credential'], assigned[name]);
    assert.equal((JSON.parse((drop.json() as { CODEX_AUTH_JSON: string }).CODEX_AUTH_JSON) as { tokens: { access_token: string } }).tokens.access_token, fromA.accessToken);
  }
  const list = (await a.app.inject({ url: '/admin/clients', headers: admin })).json() as { clients: Array<{ name: string; pool: string; assignedCredential: string }> };
  assert.deepEqual(
    list.clients.map((c) => [c.name, c.pool, c.assignedCredential]),
    Object.keys(clients).sort().map((n) => [n, n === 'd1' ? 'default' : 'batch', assigned[n]]),
  );
  const status = (await a.app.inject({ url: '/status', headers: admin })).json() as { credentials: Array<{ name: string; pool: string; clientsAssigned: number }> };
  assert.deepEqual(
    status.credentials.map((c) => [c.name, c.pool, c.clientsAssigned]),
    [
      ['default', 'default', 1],
      ['one', 'batch', 2],
      ['two', 'batch', 2],
    ],
  );
  // Each login is described as fully as `default` (what the operator page draws per card).
  for (const c of status.credentials as unknown as Array<Record<string, unknown>>) {
    for (const field of ['planType', 'lastRotationAt', 'nextCheckAt', 'latch', 'consecutiveFailures', 'usage']) assert.ok(field in c, `${String(c['name'])}: ${field}`);
  }
  const metrics = (await a.app.inject({ url: '/metrics' })).body;
  assert.match(metrics, /codex_broker_pool_assigned_clients\{pool="batch",credential="one"\} 2/);
  assert.match(metrics, /codex_broker_pool_assigned_clients\{pool="default",credential="default"\} 1/);
});

test('/status shows the admin every client\'s pool and served credential, and a client only its own entry, with no database query', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  // Background reloads and flushes slowed right down: only /status itself could query during the count.
  const t = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, clientReloadMs: 3_600_000, clientFlushMs: 3_600_000 });
  await seed(t, 'one', upstream.seed({ accountId: 'acct-1' }), 'batch');
  await seed(t, 'default', upstream.seed({ accountId: 'acct-d' }));
  const b1 = await addClient(t, 'b1', 'batch');
  await addClient(t, 'd1');
  await waitFor('both assigned, and known in memory', async () => Object.values(await stored(t)).every((v) => v !== null) && t.core.clients.authenticate(b1.token)?.assigned === 'one');
  const queries = async () => (await t.metrics.dbQueries.get()).values[0]?.value ?? 0;
  const before = await settledCount(queries);
  assert.ok(before > 0, 'the counter counts (setup issued queries)');

  const asAdmin = await t.app.inject({ url: '/status', headers: admin });
  assert.equal(asAdmin.statusCode, 200, asAdmin.body);
  const adminView = asAdmin.json() as Record<string, unknown>;
  assert.deepEqual(adminView['clients'], [
    { name: 'b1', pool: 'batch', credential: 'one' },
    { name: 'd1', pool: 'default', credential: 'default' },
  ]);
  assert.equal(adminView['client'], undefined);

  const asClient = await t.app.inject({ url: '/status', headers: { authorization: `Bearer ${b1.token}` } });
  assert.equal(asClient.statusCode, 200, asClient.body);
  const clientView = asClient.json() as Record<string, unknown>;
  assert.deepEqual(clientView['client'], { name: 'b1', pool: 'batch', credential: 'one' });
  assert.equal(clientView['clients'], undefined);
  assert.doesNotMatch(asClient.body, /"d1"/, 'another client\'s name is never shown to a client');
  assert.equal((await queries()) - before, 0, '/status reads memory only');
});

test('a latched credential moves its clients to the usable one of the pool; the switch is stored, counted and logged, and the proxy refresh credential keeps working', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const t = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, start: false });
  await t.core.credentials.load();
  const burned = dueSeed(upstream, 'acct-burned') as { tokens: { refresh_token: string } };
  burned.tokens.refresh_token = 'a-refresh-token-the-upstream-never-issued';
  await seed(t, 'burned', burned, 'p');
  const c = await addClient(t, 'ws', 'p');
  await waitFor('assigned to burned', async () => (await stored(t))['ws'] === 'burned');
  await t.core.clients.reload();
  const before = await served(t, c);
  assert.equal(before.credential, 'burned');
  const doc = (await t.app.inject({ url: '/codex-auth', headers: { authorization: `Bearer ${c.token}` } })).json() as { tokens: { refresh_token: string } };
  await seed(t, 'spare', upstream.seed({ accountId: 'acct-spare' }), 'p');
  assert.equal((await t.core.credentials.get('burned')?.refresher.runCycle())?.attempt, 'permanent_failure');
  await waitFor('moved to spare', async () => (await stored(t))['ws'] === 'spare');
  assert.deepEqual(await switches(t), { 'p/latched': 1 });
  const line = t.logs.withEvent('pool_switch')[0];
  assert.ok(line, 'the switch is logged');
  await t.core.clients.reload();
  const after = await served(t, c);
  assert.equal(after.credential, 'spare');
  assert.notEqual(after.accessToken, before.accessToken);
  // The client's broker refresh credential (served before the switch) still works at the shim.
  const shim = await t.app.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: doc.tokens.refresh_token, client_id: 'x' } });
  assert.equal(shim.statusCode, 200, shim.body);
  assert.equal((shim.json() as { access_token: string }).access_token, after.accessToken);
  assert.equal(shim.headers['x-codex-credential'], 'spare');
});

test('removing a credential with clients is refused unless told to reassign them; then they move (reason removed)', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const t = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url });
  await seed(t, 'old', upstream.seed({ accountId: 'acct-old' }));
  await addClient(t, 'ws');
  await waitFor('assigned', async () => (await stored(t))['ws'] !== null);
  // Only `old` holds a login: an absent default is never assigned.
  assert.equal((await stored(t))['ws'], 'old');
  await seed(t, 'new', upstream.seed({ accountId: 'acct-new' }));
  const refused = await t.app.inject({ method: 'DELETE', url: '/admin/credentials/old', headers: admin });
  assert.equal(refused.statusCode, 409);
  assert.equal((refused.json() as { code: string }).code, 'credential_in_use');
  assert.ok(t.core.credentials.get('old'), 'nothing removed');
  const removed = await t.app.inject({ method: 'DELETE', url: '/admin/credentials/old?reassign=true', headers: admin });
  assert.equal(removed.statusCode, 204);
  await waitFor('moved to new', async () => (await stored(t))['ws'] === 'new');
  assert.deepEqual(await switches(t), { 'default/removed': 1 });
});

test('a client whose pool holds no credential gets 503 no_credential', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const t = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url });
  await seed(t, 'default', upstream.seed());
  const c = await addClient(t, 'lonely', 'empty-pool');
  const res = await t.app.inject({ url: '/codex-auth', headers: { authorization: `Bearer ${c.token}` } });
  assert.equal(res.statusCode, 503);
  assert.equal((res.json() as { code: string }).code, 'no_credential');
  assert.equal((await t.app.inject({ method: 'POST', url: '/admin/clients', headers: admin, payload: { name: 'bad', pool: 'Bad_Pool' } })).statusCode, 400);
});

test('no secret appears in any log line of the pools tests', () => {
  assert.deepEqual(findLeaks(suite.logLines(), [...suite.issuedTokens(), ...secrets]), []);
});
