import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import { ADMIN_TOKEN } from './helpers/app.js';
import type { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';

const KEY = 'CODEX_AUTH_JSON';
const suite = useSuite();
let nowMs = Date.UTC(2027, 0, 1);
const now = () => nowMs;

const sha8 = (v: string) => createHash('sha256').update(v).digest('hex').slice(0, 8);

async function setup(databaseUrl?: string) {
  const upstream = await suite.upstream({ now });
  const url = databaseUrl ?? (await suite.pg.newDatabase());
  const t = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, now, start: false });
  return { t, upstream, url };
}

function dueSeed(upstream: FakeUpstream) {
  const nowSec = Math.floor(nowMs / 1000);
  return upstream.seed({ iatSec: nowSec - 10 * 86_400 + 3_600, expSec: nowSec + 3_600 }) as { tokens: { refresh_token: string } };
}

test('every upstream POST is audited: intent before, outcome after, only 8-hex hash prefixes', async () => {
  const { t, upstream } = await setup();
  const doc = dueSeed(upstream);
  await t.core.store.put(KEY, JSON.stringify(doc));
  assert.equal((await t.core.refresher.runCycle()).attempt, 'rotated');
  upstream.fault({ kind: 'status', status: 503 });
  nowMs += 10 * 86_400_000;
  assert.equal((await t.core.refresher.runCycle()).attempt, 'transient_failure');
  const res = await t.app.inject({ url: '/admin/events', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
  assert.equal(res.statusCode, 200);
  const events = res.json().events as Array<Record<string, unknown>>;
  assert.equal(events.length, 2);
  const [failed, rotated] = events;
  assert.equal(rotated?.['outcome'], 'rotated');
  assert.equal(rotated?.['upstreamStatus'], 200);
  assert.equal(rotated?.['refreshTokenSha8'], sha8(doc.tokens.refresh_token));
  const rotatedTo = upstream.requests.filter((r) => r.method === 'POST').length;
  assert.equal(rotatedTo, 2);
  const stored = JSON.parse(t.core.store.decrypt((await t.core.store.read(KEY)) ?? { raw: Buffer.alloc(0), version: 0, updatedAt: new Date() }));
  assert.equal(rotated?.['newRefreshTokenSha8'], sha8(stored.tokens.refresh_token));
  assert.equal(rotated?.['reason'], 'due');
  assert.ok(typeof rotated?.['durationMs'] === 'number');
  assert.equal(failed?.['outcome'], 'transient_failure');
  assert.equal(failed?.['upstreamStatus'], 503);
  assert.equal(failed?.['refreshTokenSha8'], sha8(stored.tokens.refresh_token));
  // The table itself holds no token.
  const rows = await t.core.pool.query('SELECT * FROM broker_refresh_events');
  assert.deepEqual(findLeaks([JSON.stringify(rows.rows), res.body], upstream.issuedTokens()), []);
});

test('no POST when the audit intent cannot be written', async () => {
  const { t, upstream } = await setup();
  await t.core.store.put(KEY, JSON.stringify(dueSeed(upstream)));
  await t.core.pool.query('ALTER TABLE broker_refresh_events RENAME TO broker_refresh_events_gone');
  const r = await t.core.refresher.runCycle();
  assert.equal(r.check, 'read_error');
  assert.equal(upstream.posts, 0);
  assert.match(String(t.core.refresher.status().lastError?.message), /refresh intent/);
  await t.core.pool.query('ALTER TABLE broker_refresh_events_gone RENAME TO broker_refresh_events');
  assert.equal((await t.core.refresher.runCycle()).attempt, 'rotated');
});

test('an intent with no outcome found at start is reported loudly in the log and /status', async () => {
  const { t, url } = await setup();
  await t.core.pool.query(
    `INSERT INTO broker_refresh_events (secret_key, replica_id, reason, refresh_token_sha8, started_at)
     VALUES ($1, 'crashed-replica', 'due', 'deadbeef', now() - interval '10 minutes')`,
    [KEY],
  );
  const { t: restarted } = await setup(url);
  await restarted.core.start();
  const status = (await restarted.app.inject({ url: '/status', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } })).json();
  assert.equal(status.unfinishedRefreshes.length, 1);
  assert.equal(status.unfinishedRefreshes[0].replicaId, 'crashed-replica');
  const lines = restarted.logs.withEvent('unfinished_refresh');
  assert.equal(lines.length, 1);
  assert.equal(lines[0]?.['level'], 50);
});

test('GET /admin/events validates limit and needs the admin token', async () => {
  const { t } = await setup();
  assert.equal((await t.app.inject({ url: '/admin/events' })).statusCode, 401);
  const bad = await t.app.inject({ url: '/admin/events?limit=0', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
  assert.equal(bad.statusCode, 400);
  assert.equal(bad.json().field, 'limit');
});

test('no token value appears in any log line of the audit tests', () => {
  assert.deepEqual(findLeaks(suite.logLines(), suite.issuedTokens()), []);
});
