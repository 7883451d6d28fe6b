import { strict as assert } from 'node:assert';
import { after, before, test } from 'node:test';
import { createTestApp, ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import { FakeUpstream } from './helpers/fake-upstream.js';
import { startTestPostgres, type TestPostgres } from './helpers/pg.js';
import { settledCount } from './helpers/wait.js';
import { bulkInsert } from './helpers/bulk-clients.js';

let pg: TestPostgres;
let upstream: FakeUpstream;
let t: TestApp;

before(async () => {
  pg = await startTestPostgres();
  upstream = await FakeUpstream.start();
  // Background work (client reloads, last-seen flushes, the refresh check) is slowed right
  // down, and the login sweep (every 15 s: on a loaded machine it lands inside a count) is
  // off, so that only the requests themselves could issue queries during the count.
  t = await createTestApp({ databaseUrl: await pg.newDatabase(), upstreamUrl: upstream.url, clientReloadMs: 3_600_000, clientFlushMs: 3_600_000, login: { sweepMs: 0 } });
});
after(async () => {
  await t.close();
  await upstream.close();
  await pg.stop();
});

async function queries(): Promise<number> {
  const m = await t.metrics.dbQueries.get();
  return m.values[0]?.value ?? 0;
}

test('zero database queries per served request in steady state', async () => {
  const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
  assert.equal((await t.app.inject({ method: 'PUT', url: '/admin/credential', headers: admin, payload: upstream.seed() })).statusCode, 200);
  const clients: Array<{ token: string; workspaceId: string | null }> = [];
  for (let i = 0; i < 20; i++) {
    const r = await t.app.inject({ method: 'POST', url: '/admin/clients', headers: admin, payload: { name: `ws-${i}`, workspaceId: i % 2 ? null : `00000000-0000-4000-8000-${String(i).padStart(12, '0')}` } });
    assert.equal(r.statusCode, 201);
    clients.push(r.json() as { token: string; workspaceId: string | null });
  }
  // Warm-up: the first render builds the document template.
  const first = await t.app.inject({ url: '/codex-auth', headers: { authorization: `Bearer ${clients[0]?.token}` } });
  const doc = first.json() as { tokens: { refresh_token: string } };
  // Setup's NOTIFYs make the listener reload (clients, credential) asynchronously: wait
  // until those queries have landed, so that only the serving below is counted.
  const before = await settledCount(queries);
  assert.ok(before > 0, 'the counter counts (setup issued queries)');
  let served = 0;
  for (let round = 0; round < 25; round++) {
    for (const c of clients) {
      const auth = { authorization: `Bearer ${c.token}` };
      const ok = await t.app.inject({ url: '/codex-auth', headers: auth });
      assert.equal(ok.statusCode, 200, ok.body);
      const nm = await t.app.inject({ url: '/codex-auth', headers: { ...auth, 'if-none-match': String(ok.headers.etag) } });
      assert.equal(nm.statusCode, 304);
      const ws = c.workspaceId ?? '11111111-1111-4111-8111-111111111111';
      const drop = await t.app.inject({ url: `/workspaces/${ws}/secrets/values`, headers: { ...auth, 'x-molecule-org-id': 'org' } });
      assert.equal(drop.statusCode, 200, drop.body);
      served += 3;
    }
    // A stale-caller shim call and the health probes are on the hot path too.
    const shim = await t.app.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: `${doc.tokens.refresh_token.split('.')[0]}.stale`, client_id: 'x' } });
    assert.equal(shim.statusCode, 200, shim.body);
    assert.equal((await t.app.inject({ url: '/healthz' })).statusCode, 200);
    served += 2;
  }
  const after = await queries();
  assert.equal(after - before, 0, `${after - before} queries for ${served} served requests`);
  assert.equal(upstream.posts, 0);
});

test('3 credentials and 10,000 clients: each client is served its assigned credential on every serving route with zero database queries', async () => {
  const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
  for (const name of ['one', 'two']) {
    const r = await t.app.inject({ method: 'PUT', url: `/admin/credentials/${name}`, headers: admin, payload: upstream.seed({ accountId: `acct-${name}` }) });
    assert.equal(r.statusCode, 200, r.body);
  }
  // 10,000 clients in one statement, as a bulk import would land them; one reload.
  const workspaceId = (i: number) => `00000000-0000-4000-9000-${String(i).padStart(12, '0')}`;
  const bulk = bulkInsert(t.core.credentialSecret, 10_000, { prefix: 'bulk', workspaceId });
  const { tokens } = bulk;
  await t.core.pool.query(bulk.text, bulk.values);
  await t.core.clients.reload();
  // The first replica to see them stores an assignment for each (one statement).
  await t.core.assignments.rebalance();
  const spread = await t.core.pool.query<{ assigned_credential: string; n: string }>(
    `SELECT assigned_credential, count(*) AS n FROM broker_clients WHERE name LIKE 'bulk-%' GROUP BY 1 ORDER BY 1`,
  );
  const counts = Object.fromEntries(spread.rows.map((r) => [r.assigned_credential, Number(r.n)]));
  assert.deepEqual(Object.keys(counts), ['default', 'one', 'two']);
  for (const n of Object.values(counts)) assert.ok(n >= 3_300 && n <= 3_400, `evenly spread: ${JSON.stringify(counts)}`);
  await t.core.clients.reload();
  const before = await settledCount(queries);
  const seen: Record<string, number> = {};
  let served = 0;
  for (let i = 0; i < tokens.length; i += 7) {
    const auth = { authorization: `Bearer ${tokens[i]}` };
    const res = await t.app.inject({ url: '/codex-auth', headers: auth });
    assert.equal(res.statusCode, 200, res.body);
    const name = String(res.headers['x-codex-credential']);
    seen[name] = (seen[name] ?? 0) + 1;
    served += 1;
    if (i % 5 !== 0) continue;
    // Every other serving route answers for the same client from the same credential.
    const nm = await t.app.inject({ url: '/codex-auth', headers: { ...auth, 'if-none-match': String(res.headers.etag) } });
    assert.equal(nm.statusCode, 304);
    const drop = await t.app.inject({ url: `/workspaces/${workspaceId(i)}/secrets/values`, headers: auth });
    assert.equal(drop.statusCode, 200, drop.body);
    assert.equal(drop.headers['x-codex-credential'], name);
    const doc = res.json() as { tokens: { refresh_token: string } };
    const shim = await t.app.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: `${doc.tokens.refresh_token.split('.')[0]}.stale`, client_id: 'x' } });
    assert.equal(shim.statusCode, 200, shim.body);
    assert.equal(shim.headers['x-codex-credential'], name);
    assert.equal((await t.app.inject({ url: '/healthz' })).statusCode, 200);
    served += 4;
  }
  const after = await queries();
  assert.equal(after - before, 0, `${after - before} queries for ${served} served requests`);
  assert.deepEqual(Object.keys(seen).sort(), ['default', 'one', 'two'], 'every credential is served');
});
