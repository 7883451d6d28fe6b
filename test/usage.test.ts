/**
 * Usage limits, piece by piece: reading /wham/usage defensively, the GET itself against a
 * real local fake backend, and the shared row that lets one replica poll per interval.
 */
import { strict as assert } from 'node:assert';
import { describe, test } from 'node:test';
import { createPool, migrate, type Pool } from '../src/db.js';
import { createUsageFetch } from '../src/usage/fetch.js';
import { parseUsage } from '../src/usage/parse.js';
import { claimPoll, readUsage, recordPoll } from '../src/usage/store.js';
import { usageViewOfRow } from '../src/usage/view.js';
import { FakeUsageBackend } from './helpers/fake-usage.js';
import { LogCapture } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';

const suite = useSuite();
const NOW_SEC = 1_800_000_000;

describe('parseUsage', () => {
  test('reads the documented shape: plan, allowed, limit reached, both windows', () => {
    const snap = parseUsage(
      {
        plan_type: 'pro',
        rate_limit: {
          allowed: true,
          limit_reached: false,
          primary_window: { used_percent: 42.5, limit_window_seconds: 18_000, reset_after_seconds: 100, reset_at: 1_800_000_500 },
          secondary_window: { used_percent: 7, limit_window_seconds: 604_800, reset_after_seconds: 9_000, reset_at: 1_800_009_000 },
        },
        credits: { has_credits: false, unlimited: false, balance: '0' },
      },
      NOW_SEC,
    );
    assert.deepEqual(snap, {
      planType: 'pro',
      allowed: true,
      limitReached: false,
      primary: { usedPercent: 42.5, windowSeconds: 18_000, resetAt: 1_800_000_500 },
      secondary: { usedPercent: 7, windowSeconds: 604_800, resetAt: 1_800_009_000 },
    });
  });

  test('every member may be missing, null or of the wrong type: it becomes null, never an exception', () => {
    const junk: unknown[] = [null, 'x', 12, true, [], {}, [1, 2], { a: 1 }, -1, Number.NaN, 1e300, '50', { toString: 1 }];
    let seen = 0;
    for (const a of junk) {
      for (const b of junk) {
        for (const body of [
          { plan_type: a, rate_limit: b },
          { plan_type: 'plus', rate_limit: { allowed: a, limit_reached: b, primary_window: a, secondary_window: b } },
          { plan_type: 'plus', rate_limit: { primary_window: { used_percent: a, limit_window_seconds: b, reset_after_seconds: a, reset_at: b } } },
        ]) {
          const s = parseUsage(body, NOW_SEC);
          if (!s) continue;
          seen++;
          assert.ok(s.planType === null || typeof s.planType === 'string');
          for (const w of [s.primary, s.secondary]) {
            if (!w) continue;
            for (const v of [w.usedPercent, w.windowSeconds, w.resetAt]) assert.ok(v === null || (typeof v === 'number' && Number.isFinite(v) && v >= 0), JSON.stringify(body));
          }
        }
      }
    }
    assert.ok(seen > 100);
    for (const body of [null, 'text', 42, [], [{ plan_type: 'plus' }]]) assert.equal(parseUsage(body, NOW_SEC), undefined, JSON.stringify(body));
  });

  test('a missing reset_at is counted from the fetch with reset_after_seconds', () => {
    const s = parseUsage({ rate_limit: { primary_window: { used_percent: 1, reset_after_seconds: 600, reset_at: null } } }, NOW_SEC);
    assert.equal(s?.primary?.resetAt, NOW_SEC + 600);
    const far = parseUsage({ rate_limit: { primary_window: { used_percent: 1, reset_at: 1e12 } } }, NOW_SEC);
    assert.equal(far?.primary?.resetAt, null, 'a reset time past 2100 is not a date');
  });

  test('an answer with no plan and no readable window is not a snapshot (it must not replace a good one)', () => {
    assert.equal(parseUsage({}, NOW_SEC), undefined);
    assert.equal(parseUsage({ rate_limit: { allowed: true, primary_window: {} } }, NOW_SEC), undefined);
    assert.equal(parseUsage({ plan_type: null, rate_limit: null, credits: null }, NOW_SEC), undefined);
  });

  test('a plan that is not an identifier is not repeated', () => {
    assert.equal(parseUsage({ plan_type: 'plus plan for eyJhbGciOi.secret.token', rate_limit: { primary_window: { used_percent: 1 } } }, NOW_SEC)?.planType, null);
  });
});

describe('the usage GET', () => {
  test('asks {CHATGPT_BASE_URL}/wham/usage with the bearer token and the account id, and reads the figures', async (t) => {
    const backend = await FakeUsageBackend.start();
    t.after(() => backend.close());
    backend.usage = { plan: 'team', primary: { usedPercent: 91, resetAt: 1_800_000_100 }, secondary: { usedPercent: 40, resetAt: 1_800_500_000 } };
    const fetch = createUsageFetch({ baseUrl: `${backend.url}/`, timeoutMs: 2_000 });
    const r = await fetch('access-token-0123456789abcdef', 'acct-1');
    assert.ok(r.ok, JSON.stringify(r));
    assert.equal(r.snapshot.planType, 'team');
    assert.equal(r.snapshot.primary?.usedPercent, 91);
    assert.equal(r.snapshot.secondary?.resetAt, 1_800_500_000);
    assert.deepEqual(backend.seen, [{ bearer: 'access-token-0123456789abcdef', accountId: 'acct-1' }]);
  });

  test('every failure is a short code and a detail without the token: 401, 502, malformed, too large, timeout, unreachable', async (t) => {
    const backend = await FakeUsageBackend.start();
    t.after(() => backend.close());
    const token = 'access-token-that-must-not-leak-0123456789';
    const fetch = createUsageFetch({ baseUrl: backend.url, timeoutMs: 300 });
    const codes: string[] = [];
    const details: string[] = [];
    const attempt = async () => {
      const r = await fetch(token, 'acct');
      assert.equal(r.ok, false);
      if (!r.ok) {
        codes.push(r.code);
        details.push(r.detail);
      }
    };
    for (const answer of ['reject', 'error', 'malformed', 'hang'] as const) {
      backend.answer = answer;
      await attempt();
    }
    backend.answer = 'accept';
    backend.body = { plan_type: 'plus', pad: 'x'.repeat(100 * 1024) };
    await attempt();
    backend.body = { unrelated: true };
    await attempt();
    await backend.close();
    await attempt();
    assert.deepEqual(codes, ['status_401', 'status_502', 'malformed', 'timeout', 'too_large', 'malformed', 'unreachable']);
    for (const d of details) assert.ok(!d.includes(token) && !d.includes('/wham'), d);
  });
});

describe('the shared usage row', () => {
  async function pools(n: number): Promise<Pool[]> {
    const url = await suite.pg.newDatabase();
    const logs = new LogCapture();
    const out = Array.from({ length: n }, () => createPool(url, logs.logger, 4));
    await migrate(out[0]!, logs.logger);
    return out;
  }

  test('exactly one of many concurrent claimants wins an interval: the first claim, and each time the interval is up', async (t) => {
    const ps = await pools(3);
    t.after(() => Promise.all(ps.map((p) => p.end())));
    for (let round = 0; round < 5; round++) {
      const claims = await Promise.all(ps.flatMap((p, i) => Array.from({ length: 4 }, (_, j) => claimPoll(p, 'CODEX_AUTH_JSON', 60_000, `replica-${i}-${j}`))));
      assert.equal(claims.filter((c) => c !== undefined).length, 1, `round ${round}: one winner of ${claims.length}`);
      const again = await Promise.all(ps.map((p) => claimPoll(p, 'CODEX_AUTH_JSON', 60_000, 'late')));
      assert.equal(again.filter((c) => c !== undefined).length, 0, `round ${round}: not due again within the interval`);
      // The interval passes.
      await ps[0]!.query(`UPDATE broker_usage SET next_poll_at = now() - interval '1 second'`);
    }
  });

  test('a failure keeps the last snapshot and marks it; a slow poll never overwrites a newer claim', async (t) => {
    const [p] = await pools(1);
    t.after(() => p!.end());
    const key = 'CODEX_AUTH_JSON';
    const snapshot = parseUsage({ plan_type: 'plus', rate_limit: { primary_window: { used_percent: 50 } } }, NOW_SEC)!;
    const first = (await claimPoll(p!, key, 60_000, 'a'))!;
    assert.equal(await recordPoll(p!, key, first, { ok: true, snapshot }), true);
    await p!.query(`UPDATE broker_usage SET next_poll_at = now() - interval '1 second'`);
    const slow = (await claimPoll(p!, key, 60_000, 'a'))!;
    await p!.query(`UPDATE broker_usage SET next_poll_at = now() - interval '1 second'`);
    const newer = (await claimPoll(p!, key, 60_000, 'b'))!;
    assert.equal(await recordPoll(p!, key, newer, { ok: false, code: 'status_502', detail: '502' }), true);
    assert.equal(await recordPoll(p!, key, slow, { ok: true, snapshot: { ...snapshot, planType: 'old' } }), false, 'the older claim is dropped');
    const row = (await readUsage(p!, [key])).get(key);
    const view = usageViewOfRow(row, 60_000);
    assert.equal(view.planType, 'plus', 'the last good snapshot is kept');
    assert.equal(view.primary?.usedPercent, 50);
    assert.equal(view.stale, true);
    assert.equal(view.lastError, 'status_502');
    assert.equal(view.polledBy, 'b');
    assert.equal(typeof view.ageSeconds, 'number');
  });
});
