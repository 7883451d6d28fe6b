import { strict as assert } from 'node:assert';
import { randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import Fastify from 'fastify';
import { AuthFailures, bearerOf } from '../src/http/auth.js';
import { ADMIN_TOKEN } from './helpers/app.js';
import { findLeaks, LogCapture } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';
import { waitFor } from './helpers/wait.js';

const suite = useSuite();
const FLOOD = 200;

const failedLines = (logs: LogCapture) => logs.withEvent('admin_auth_failed');
const counted = (logs: LogCapture, field = 'count') => failedLines(logs).reduce((n, l) => n + Number(l[field]), 0);

async function adminApp(logs: LogCapture) {
  const upstream = await suite.upstream();
  return suite.app({ databaseUrl: await suite.pg.newDatabase(), upstreamUrl: upstream.url, start: false, logs });
}

describe('admin-token failures are slowed, capped and logged', () => {
  test(`${FLOOD} wrong admin tokens at once: some answered 429 unchecked, logged with counts and no token, the right token works afterwards`, async () => {
    const logs = new LogCapture();
    const t = await adminApp(logs);
    const wrong = Array.from({ length: FLOOD }, (_, i) => `wrong-admin-token-${i}-${randomBytes(12).toString('base64url')}`);
    const flood = wrong.map((token) => t.app.inject({ method: 'GET', url: '/admin/clients', headers: { authorization: `Bearer ${token}` } }));
    // While the cap is reached even the right token gets 429: a quick 429 for a guess beside a
    // quick 200 for the token would let a flood guess at full speed.
    const right = t.app.inject({ method: 'GET', url: '/admin/clients', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
    const results = await Promise.all(flood);
    const by = (s: number) => results.filter((r) => r.statusCode === s);
    assert.equal(by(401).length + by(429).length, FLOOD, `only 401 and 429: ${[...new Set(results.map((r) => r.statusCode))].join(', ')}`);
    assert.ok(by(429).length > 0, 'a concurrent flood is capped: some answered 429 at once');
    for (const r of by(429)) {
      assert.equal(r.headers['retry-after'], '1');
      assert.equal(r.json<{ code: string }>().code, 'too_many_auth_failures');
    }
    console.log(`admin-auth flood: ${by(401).length} answered 401 after the delay, ${by(429).length} answered 429 at once`);

    assert.ok([200, 429].includes((await right).statusCode));
    const after = await t.app.inject({ method: 'GET', url: '/admin/clients', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
    assert.equal(after.statusCode, 200);

    await t.close(); // the window's line is written at the latest when the app closes
    assert.equal(counted(logs) + counted(logs, 'throttled'), FLOOD + ((await right).statusCode === 429 ? 1 : 0), 'every attempt counted');
    assert.equal(counted(logs), by(401).length);
    assert.ok(failedLines(logs).length >= 1 && failedLines(logs).length < 10, `a few lines, not one per failure: ${failedLines(logs).length}`);
    const line = failedLines(logs)[0]!;
    assert.equal(line['level'], 40);
    assert.deepEqual(findLeaks(logs.lines, [...wrong, ADMIN_TOKEN]), []);
  });

  test('a wrong token on /status is slowed and counted the same way; a client token and the admin token still pass', async () => {
    const logs = new LogCapture();
    const t = await adminApp(logs);
    const made = await t.app.inject({ method: 'POST', url: '/admin/clients', headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, payload: { name: 'dash' } });
    await t.core.clients.reload();
    const clientToken = made.json<{ token: string }>().token;
    const bad = await t.app.inject({ method: 'GET', url: '/status', headers: { authorization: 'Bearer not-the-admin-token-at-all' } });
    assert.equal(bad.statusCode, 401);
    for (const token of [clientToken, ADMIN_TOKEN]) {
      assert.equal((await t.app.inject({ method: 'GET', url: '/status', headers: { authorization: `Bearer ${token}` } })).statusCode, 200);
    }
    await t.close();
    assert.equal(counted(logs), 1);
  });

  test('a request with no token at all is answered 401 at once and not counted as a guess', async () => {
    const logs = new LogCapture();
    const t = await adminApp(logs);
    for (const url of ['/admin/clients', '/status']) assert.equal((await t.app.inject({ method: 'GET', url })).statusCode, 401);
    await t.close();
    assert.equal(failedLines(logs).length, 0);
  });
});

describe('AuthFailures', () => {
  test('holds at most maxDelayed late answers; while full, any token gets 429 unchecked; all counted in one line', async () => {
    const logs = new LogCapture();
    const waiting: Array<() => void> = [];
    const failures = new AuthFailures({ logger: logs.logger, maxDelayed: 3, sleep: () => new Promise<void>((resolve) => waiting.push(resolve)) });
    const app = Fastify();
    app.get('/x', (req, reply) => failures.reject(req, reply, 'nope'));
    await app.ready();
    try {
      const replies = Array.from({ length: 10 }, () => app.inject({ method: 'GET', url: '/x' }));
      await waitFor('three answers held back', () => waiting.length === 3);
      assert.equal(failures.delayed, 3);
      assert.equal(failures.saturated, true);
      for (const release of waiting) release();
      const codes = (await Promise.all(replies)).map((r) => r.statusCode).sort();
      assert.deepEqual(codes, [401, 401, 401, 429, 429, 429, 429, 429, 429, 429]);
      assert.equal(failures.delayed, 0);
      failures.flush();
      failures.flush(); // nothing new: no second line
      assert.equal(failedLines(logs).length, 1);
      assert.equal(failedLines(logs)[0]!['count'], 3);
      assert.equal(failedLines(logs)[0]!['throttled'], 7);
    } finally {
      await app.close();
    }
  });
});

describe('bearer header', () => {
  test('a bearer token is read exactly as the regular expression /^Bearer\\s+(\\S+)\\s*$/i reads it, also where the plain form is read without it', () => {
    const reference = (h: string) => /^Bearer\s+(\S+)\s*$/i.exec(h)?.[1];
    const token = `cab_${randomBytes(24).toString('base64url')}`;
    const cases = [
      `Bearer ${token}`,
      `bearer ${token}`,
      `BEARER ${token}`,
      `Bearer  ${token}`,
      `Bearer\t${token}`,
      `Bearer ${token} `,
      `Bearer ${token}\t `,
      `Bearer ${token} extra`,
      `Bearer ${token}\u00a0`,
      `Bearer \u00a0${token}`,
      `Bearer ${token.slice(0, 5)}\u00a0${token.slice(5)}`,
      `Bearer ${token}\u00e9`,
      `Bearer ${token}\u007f`,
      `Bearer ${token}\u0000`,
      'Bearer ',
      'Bearer',
      'Bearer x',
      `Basic ${token}`,
      `Bearer${token}`,
      ` Bearer ${token}`,
      '',
      `Bearer !#$%&'*+-.^_\`|~"(),/:;<=>?@[\\]{}`,
    ];
    // And random ones over the characters that matter: ASCII, whitespace and Latin-1.
    const alphabet = ['a', 'Z', '0', '-', '_', '.', '~', ' ', '\t', '\u000b', '\u000c', '\u00a0', '\u0085', '\u00ff', '\u007f', '"', '\u0001'];
    for (let i = 0; i < 2000; i++) {
      let tail = '';
      const n = 1 + (i % 12);
      for (let j = 0; j < n; j++) tail += alphabet[randomBytes(1)[0]! % alphabet.length];
      cases.push(`Bearer ${tail}`);
    }
    for (const h of cases) assert.equal(bearerOf(h), reference(h), JSON.stringify(h));
    assert.equal(bearerOf(undefined), undefined);
  });
});
