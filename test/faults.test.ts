import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { ADMIN_TOKEN, createTestApp, type TestApp } from './helpers/app.js';
import { tempDirs } from './helpers/tmp.js';
import type { Fault, FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';
import { waitFor } from './helpers/wait.js';

const KEY = 'CODEX_AUTH_JSON';
const suite = useSuite();
let nowMs = Date.UTC(2027, 0, 1);
const now = () => nowMs;
const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
const extraLogs: string[] = [];

const tmp = tempDirs('cab-faults-');

function dueSeed(upstream: FakeUpstream) {
  const nowSec = Math.floor(nowMs / 1000);
  return upstream.seed({ iatSec: nowSec - 10 * 86_400 + 3_600, expSec: nowSec + 3_600 });
}



async function storedTokens(t: TestApp): Promise<{ access_token: string; refresh_token: string }> {
  const row = await t.core.store.read(KEY);
  assert.ok(row);
  return (JSON.parse(t.core.store.decrypt(row)) as { tokens: { access_token: string; refresh_token: string } }).tokens;
}

test('Postgres stopped while the upstream answers a due refresh: clients are served the new token, the row holds it after restart, the next rotation POSTs the new refresh token, zero reuse', async () => {
  const upstream = await suite.upstream({ now });
  const url = await suite.pg.newDatabase();
  const t = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, now, journalDir: tmp(), start: false });
  await t.core.store.put(KEY, JSON.stringify(dueSeed(upstream)));
  await t.core.refresher.reload();
  const created = await t.app.inject({ method: 'POST', url: '/admin/clients', headers: admin, payload: { name: 'pg-down' } });
  assert.equal(created.statusCode, 201, created.body);
  const client = (created.json() as { token: string }).token;

  upstream.fault({ kind: 'delay', ms: 1500 });
  const cycle = t.core.refresher.runCycle();
  await waitFor('the POST', () => upstream.posts === 1, 10_000);
  await suite.pg.stopServer();
  let restarted = false;
  try {
    const report = await cycle;
    assert.equal(report.attempt, 'rotated');
    const newAccess = upstream.lastAccessToken();
    const newRefresh = upstream.currentRefreshToken();
    assert.ok(newAccess && newRefresh);
    assert.equal(t.core.refresher.status().writebackPending, true);
    assert.equal(t.logs.withEvent('writeback_pending').length, 1);

    const served = await t.app.inject({ method: 'GET', url: '/codex-auth', headers: { authorization: `Bearer ${client}` } });
    assert.equal(served.statusCode, 200, served.body);
    assert.equal((served.json() as { tokens: { access_token: string } }).tokens.access_token, newAccess, 'the pending rotation is served');
    const ready = await t.app.inject({ method: 'GET', url: '/readyz' });
    assert.equal(ready.statusCode, 200, ready.body);

    // Still down: the write-back keeps failing, the rotation stays pending, no second POST.
    await t.core.refresher.runCycle();
    assert.equal(t.core.refresher.status().writebackPending, true);
    assert.equal(upstream.posts, 1);

    await suite.pg.startServer();
    restarted = true;
    for (let i = 0; i < 50 && t.core.refresher.status().writebackPending; i++) {
      await t.core.refresher.runCycle();
      if (t.core.refresher.status().writebackPending) await sleep(100);
    }
    assert.equal(t.core.refresher.status().writebackPending, false, 'the pending write-back landed');
    assert.equal(t.logs.withEvent('writeback_landed').length, 1);
    const stored = await storedTokens(t);
    assert.equal(stored.access_token, newAccess);
    assert.equal(stored.refresh_token, newRefresh);
    assert.equal(upstream.posts, 1, 'no POST while the write-back was pending');

    nowMs += 10 * 86_400_000;
    assert.equal((await t.core.refresher.runCycle()).attempt, 'rotated');
    assert.equal(upstream.posts, 2);
    const last = upstream.requests.filter((r) => r.method === 'POST').at(-1);
    assert.equal((last?.body as { refresh_token?: string } | undefined)?.refresh_token, newRefresh, 'the next rotation POSTs the new refresh token');
    assert.equal(upstream.reuseAnswers, 0);
    assert.equal((await storedTokens(t)).access_token, upstream.lastAccessToken());
  } finally {
    if (!restarted) await suite.pg.startServer();
  }
});

interface Case {
  name: string;
  fault: Fault;
  kind: 'transient' | 'permanent';
  /** Retry-After of the fault, ms. */
  retryAfterMs?: number;
  config?: Record<string, number>;
}

const PERMANENT_CODES = ['refresh_token_expired', 'refresh_token_reused', 'refresh_token_invalidated', 'token_expired', 'account_deactivated', 'invalid_grant'];

const CASES: Case[] = [
  { name: '500', fault: { kind: 'status', status: 500 }, kind: 'transient' },
  { name: '502', fault: { kind: 'status', status: 502 }, kind: 'transient' },
  { name: '503', fault: { kind: 'status', status: 503 }, kind: 'transient' },
  { name: '429 + Retry-After: 120', fault: { kind: 'status', status: 429, headers: { 'retry-after': '120' } }, kind: 'transient', retryAfterMs: 120_000 },
  { name: 'hang (timeout 0.5 s)', fault: { kind: 'hang' }, kind: 'transient', config: { UPSTREAM_TIMEOUT_SECONDS: 0.5 } },
  { name: 'oversized (2 MiB body)', fault: { kind: 'oversized' }, kind: 'transient' },
  { name: 'malformed (non-JSON 200)', fault: { kind: 'malformed' }, kind: 'transient' },
  { name: 'no-access-token (200)', fault: { kind: 'no-access-token' }, kind: 'transient' },
  { name: 'non-jwt-access-token (200)', fault: { kind: 'non-jwt-access-token' }, kind: 'transient' },
  { name: 'error-200 (200 with error object)', fault: { kind: 'error-200' }, kind: 'transient' },
  ...PERMANENT_CODES.flatMap((code): Case[] =>
    [401, 400].map((status) => ({
      name: `${status} ${code}`,
      fault: { kind: 'status', status, body: { error: { code, message: 'refused', type: 'invalid_request_error' } } },
      kind: 'permanent',
    })),
  ),
  { name: '403 (no code)', fault: { kind: 'status', status: 403 }, kind: 'permanent' },
];

const EXPECTED = {
  transient: 'transient: no write, no latch, 1 POST; retried after backoff -> rotates (2 POSTs), 0 reuse',
  permanent: 'permanent: latched, row byte-identical, no second POST (1 POST)',
};

test('the upstream fault matrix', async () => {
  const rows: string[] = [];
  const failures: string[] = [];
  for (const c of CASES) {
    const upstream = await suite.upstream({ now });
    const url = await suite.pg.newDatabase();
    const t = await createTestApp({ databaseUrl: url, upstreamUrl: upstream.url, now, start: false, ...(c.config ? { config: c.config } : {}) });
    const observed: string[] = [];
    try {
      await t.core.store.put(KEY, JSON.stringify(dueSeed(upstream)));
      const before = await t.core.store.read(KEY);
      assert.ok(before);
      upstream.fault(c.fault);
      const first = await t.core.refresher.runCycle();
      const afterFirst = await t.core.store.read(KEY);
      const identical = afterFirst !== null && afterFirst.raw.equals(before.raw);
      observed.push(`${first.attempt ?? first.check}${first.error?.status !== undefined ? ` (${first.error.status}${first.error.upstreamCode ? ` ${first.error.upstreamCode}` : ''})` : ''}`);
      observed.push(identical ? 'row identical' : 'ROW CHANGED');
      observed.push(t.core.refresher.latched ? 'latched' : 'not latched');
      assert.equal(upstream.posts, 1, `${c.name}: one POST`);
      assert.ok(identical, `${c.name}: the row is byte-identical`);
      if (c.kind === 'transient') {
        assert.equal(first.attempt, 'transient_failure', c.name);
        assert.equal(t.core.refresher.latched, false, c.name);
        if (c.retryAfterMs !== undefined) {
          // Retry-After is honoured: well past the 15 s base step, still no POST.
          nowMs += c.retryAfterMs / 2;
          const early = await t.core.refresher.runCycle();
          assert.equal(early.backoff, true, `${c.name}: still backing off`);
          assert.equal(upstream.posts, 1, `${c.name}: no POST before Retry-After`);
          observed.push(`no POST at +${c.retryAfterMs / 2000} s`);
          nowMs += c.retryAfterMs / 2 + 1_000;
        } else {
          // Inside the backoff step: no POST.
          const early = await t.core.refresher.runCycle();
          assert.equal(early.backoff, true, `${c.name}: backing off`);
          assert.equal(upstream.posts, 1);
          nowMs += 5 * 60_000;
        }
        const retry = await t.core.refresher.runCycle();
        assert.equal(retry.attempt, 'rotated', `${c.name}: the retry rotates`);
        assert.equal(upstream.posts, 2, `${c.name}: two POSTs in all`);
        const row = await t.core.store.read(KEY);
        assert.ok(row);
        assert.equal(JSON.parse(t.core.store.decrypt(row)).tokens.access_token, upstream.lastAccessToken());
        observed.push(`retry rotated, ${upstream.posts} POSTs`);
      } else {
        assert.equal(first.attempt, 'permanent_failure', c.name);
        assert.equal(t.core.refresher.latched, true, c.name);
        nowMs += 2 * 3_600_000;
        const again = await t.core.refresher.runCycle({ reason: 'scheduled' });
        assert.equal(again.check, 'latched', c.name);
        const row = await t.core.store.read(KEY);
        assert.ok(row && row.raw.equals(before.raw), `${c.name}: the row is byte-identical after the retry window`);
        assert.equal(upstream.posts, 1, `${c.name}: no second POST`);
        observed.push(`next cycle ${again.check}, ${upstream.posts} POST`);
      }
      assert.equal(upstream.reuseAnswers, 0);
      observed.push(`${upstream.reuseAnswers} reuse`);
    } catch (err) {
      failures.push(`${c.name}: ${(err as Error).message}`);
      observed.push(`FAILED: ${(err as Error).message.split('\n')[0]}`);
    } finally {
      const health = await t.app.inject({ method: 'GET', url: '/healthz' });
      if (health.statusCode !== 200) failures.push(`${c.name}: /healthz ${health.statusCode}`);
      extraLogs.push(...t.logs.lines);
      await t.close();
      await upstream.close();
    }
    rows.push(`| ${c.name} | ${EXPECTED[c.kind]} | ${observed.join('; ')} |`);
  }
  console.log(['', '| fault | expected | observed |', '| --- | --- | --- |', ...rows, ''].join('\n'));
  // The process is alive at the end of the matrix (nothing crashed it), and still serves.
  assert.equal(process.exitCode ?? 0, 0);
  assert.deepEqual(failures, []);
});

test('no token value appears in any log line of the fault tests', () => {
  assert.deepEqual(findLeaks([...suite.logLines(), ...extraLogs], suite.issuedTokens()), []);
});
