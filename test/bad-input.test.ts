import { strict as assert } from 'node:assert';
import { randomBytes } from 'node:crypto';
import * as net from 'node:net';
import * as path from 'node:path';
import { describe, test } from 'node:test';
import pg from 'pg';
import { ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import type { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { runProcess } from './helpers/process.js';
import { useSuite } from './helpers/suite.js';
import { cliArgs } from './helpers/cli.js';

const KEY = 'CODEX_AUTH_JSON';
const ROOT = path.resolve(import.meta.dirname, '..');
const TWO_MIB = 2 * 1024 * 1024;
const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };

const suite = useSuite();
const handJwt = (payload: Record<string, unknown>) => ['{"alg":"none"}', JSON.stringify(payload), 'sig'].map((p) => Buffer.from(p).toString('base64url')).join('.');
const tok = (doc: Record<string, unknown>, f: string) => (doc['tokens'] as Record<string, string>)[f]!;
const outputs: string[] = [];

interface Row {
  encrypted_value: Buffer;
  updated_at: string;
}

async function rawRow(url: string): Promise<Row | undefined> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    // updated_at as text: the full microsecond value, not a millisecond Date.
    const r = await c.query<Row>('SELECT encrypted_value, updated_at::text AS updated_at FROM global_secrets WHERE key = $1', [KEY]);
    return r.rows[0];
  } finally {
    await c.end();
  }
}

async function seededApp(): Promise<{ t: TestApp; upstream: FakeUpstream; url: string; good: { tokens: Record<string, string> } }> {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const t = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url });
  const good = upstream.seed() as { tokens: Record<string, string> };
  const res = await t.app.inject({ method: 'PUT', url: '/admin/credential', headers: admin, payload: good });
  assert.equal(res.statusCode, 200, res.body);
  return { t, upstream, url, good };
}

describe('PUT /admin/credential and seed refuse bad documents', () => {
  test('every malformed body gets a 4xx problem+json and leaves the stored row byte-identical', async () => {
    const { t, upstream, url, good } = await seededApp();
    const before = await rawRow(url);
    assert.ok(before);
    const gt = good.tokens;
    const json = { 'content-type': 'application/json' };
    const cases: Array<{ name: string; payload: string; headers?: Record<string, string>; status: number; field?: string; detail?: RegExp }> = [
      { name: 'non-JSON', payload: '{"tokens": ', headers: json, status: 400, detail: /JSON/ },
      { name: 'non-JSON as text', payload: 'tokens=1', headers: { 'content-type': 'text/plain' }, status: 415, detail: /content-type|media type/i },
      { name: 'a good document as text/plain', payload: JSON.stringify(upstream.seed()), headers: { 'content-type': 'text/plain' }, status: 415, detail: /content-type|media type/i },
      { name: 'exp past 2100 (1e13)', payload: JSON.stringify({ tokens: { ...gt, access_token: tok(upstream.seed({ expSec: 1e13 }), 'access_token') } }), headers: json, status: 400, field: 'tokens.access_token.exp' },
      { name: 'exp just past 2100', payload: JSON.stringify({ tokens: { ...gt, access_token: handJwt({ exp: 4_102_444_801 }) } }), headers: json, status: 400, field: 'tokens.access_token.exp' },
      { name: 'negative iat', payload: JSON.stringify({ tokens: { ...gt, access_token: handJwt({ iat: -1, exp: 1_900_000_000 }) } }), headers: json, status: 400, field: 'tokens.access_token.iat' },
      { name: 'exp a string', payload: JSON.stringify({ tokens: { ...gt, access_token: handJwt({ exp: '1900000000' }) } }), headers: json, status: 400, field: 'tokens.access_token.exp' },
      { name: 'exp null', payload: JSON.stringify({ tokens: { ...gt, access_token: handJwt({ exp: null }) } }), headers: json, status: 400, field: 'tokens.access_token.exp' },
      { name: 'id_token exp past 2100', payload: JSON.stringify({ tokens: { ...gt, id_token: handJwt({ exp: 1e13, email: 'a@b' }) } }), headers: json, status: 400, field: 'tokens.id_token.exp' },
      { name: 'last_refresh past 2100', payload: JSON.stringify({ tokens: gt, last_refresh: '2200-01-01T00:00:00Z' }), headers: json, status: 400, field: 'last_refresh' },
      { name: 'an array', payload: '[1, 2]', headers: json, status: 400, field: 'document' },
      { name: 'a string', payload: '"auth.json"', headers: json, status: 400, field: 'document' },
      { name: 'missing tokens', payload: JSON.stringify({ OPENAI_API_KEY: null }), headers: json, status: 400, field: 'tokens' },
      { name: 'tokens not an object', payload: JSON.stringify({ tokens: 'x' }), headers: json, status: 400, field: 'tokens' },
      { name: 'missing refresh_token', payload: JSON.stringify({ tokens: { ...gt, refresh_token: undefined } }), headers: json, status: 400, field: 'tokens.refresh_token' },
      { name: 'empty refresh_token', payload: JSON.stringify({ tokens: { ...gt, refresh_token: '' } }), headers: json, status: 400, field: 'tokens.refresh_token' },
      { name: 'blank refresh_token', payload: JSON.stringify({ tokens: { ...gt, refresh_token: '   ' } }), headers: json, status: 400, field: 'tokens.refresh_token' },
      { name: 'non-string refresh_token', payload: JSON.stringify({ tokens: { ...gt, refresh_token: 12345 } }), headers: json, status: 400, field: 'tokens.refresh_token' },
      { name: 'access token opaque', payload: JSON.stringify({ tokens: { ...gt, access_token: 'opaque-access-token' } }), headers: json, status: 400, field: 'tokens.access_token' },
      { name: 'access token two parts', payload: JSON.stringify({ tokens: { ...gt, access_token: gt['access_token']!.split('.').slice(0, 2).join('.') } }), headers: json, status: 400, field: 'tokens.access_token' },
      { name: 'access token four parts', payload: JSON.stringify({ tokens: { ...gt, access_token: `${gt['access_token']!}.x` } }), headers: json, status: 400, field: 'tokens.access_token' },
      { name: 'id_token with a non-JSON payload', payload: JSON.stringify({ tokens: { ...gt, id_token: 'a.b.c' } }), headers: json, status: 400, field: 'tokens.id_token' },
      { name: 'id_token missing', payload: JSON.stringify({ tokens: { ...gt, id_token: undefined } }), headers: json, status: 400, field: 'tokens.id_token' },
      { name: 'a 2 MiB document', payload: JSON.stringify({ tokens: gt, pad: 'a'.repeat(TWO_MIB) }), headers: json, status: 413, detail: /too large/i },
      { name: 'a 2 MiB document as text', payload: JSON.stringify({ tokens: gt, pad: 'a'.repeat(TWO_MIB) }), headers: { 'content-type': 'text/plain' }, status: 415, detail: /content-type|media type/i },
      { name: 'a __proto__ key', payload: `{"__proto__": {"admin": true}, "tokens": ${JSON.stringify(gt)}}`, headers: json, status: 400, field: 'document', detail: /__proto__/ },
      { name: 'a nested __proto__ key', payload: `{"tokens": ${JSON.stringify(gt).slice(0, -1)}, "__proto__": {"x": 1}}}`, headers: json, status: 400, field: 'document', detail: /__proto__/ },
      { name: 'a __proto__ key as text', payload: `{"__proto__": {"admin": true}, "tokens": ${JSON.stringify(gt)}}`, headers: { 'content-type': 'text/plain' }, status: 415 },
      { name: 'a constructor key', payload: JSON.stringify({ constructor: { prototype: 1 }, tokens: gt }), headers: json, status: 400, field: 'document', detail: /constructor/ },
      { name: 'wrong content type (xml)', payload: '<auth/>', headers: { 'content-type': 'application/xml' }, status: 415, detail: /content-type|media type/i },
      { name: 'wrong content type (form)', payload: `tokens=${encodeURIComponent(JSON.stringify(gt))}`, headers: { 'content-type': 'application/x-www-form-urlencoded' }, status: 415, detail: /content-type|media type/i },
      { name: 'no body', payload: '', headers: json, status: 400 },
    ];
    for (const c of cases) {
      const res = await t.app.inject({ method: 'PUT', url: '/admin/credential', headers: { ...admin, ...c.headers }, payload: c.payload });
      outputs.push(res.body);
      assert.equal(res.statusCode, c.status, `${c.name}: ${res.body}`);
      assert.match(String(res.headers['content-type']), /^application\/problem\+json/, c.name);
      const body = res.json<{ status: number; detail: string; field?: string; type: string }>();
      assert.equal(body.status, c.status, c.name);
      assert.ok(body.type.startsWith('https://'), c.name);
      if (c.field) {
        assert.equal(body.field, c.field, `${c.name}: ${res.body}`);
        assert.ok(body.detail.startsWith(c.field), `${c.name}: the detail names the field: ${body.detail}`);
      }
      if (c.detail) assert.match(body.detail, c.detail, `${c.name}: ${body.detail}`);
      const now = await rawRow(url);
      assert.ok(now && now.encrypted_value.equals(before.encrypted_value), `${c.name}: the stored bytes changed`);
      assert.equal(now.updated_at, before.updated_at, `${c.name}: updated_at moved`);
    }
    // The in-memory login is still the seeded one.
    assert.equal(t.core.refresher.state(), 'fresh');
    assert.deepEqual(findLeaks([...outputs, ...t.logs.lines], [gt['access_token']!, gt['refresh_token']!, gt['id_token']!, ...upstream.issuedTokens(), ADMIN_TOKEN]), []);
  });

  test('the seed CLI refuses the same documents and leaves the stored row byte-identical', async () => {
    const upstream = await suite.upstream();
    const url = await suite.pg.newDatabase();
    const env: NodeJS.ProcessEnv = {};
    for (const [k, v] of Object.entries(process.env)) {
      if (/^(PORT|HOST|DATABASE_URL|DATA_DIR|SECRETS_ENCRYPTION_KEY|ADMIN_TOKEN|LOG_LEVEL|BROKER_ENV|MOLECULE_ENV|NODE_TEST_CONTEXT)$/.test(k)) continue;
      env[k] = v;
    }
    Object.assign(env, { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: randomBytes(32).toString('base64') });
    const seed = async (input: string) => {
      const r = await runProcess(process.execPath, cliArgs(['seed', '-']), { cwd: ROOT, env, input, timeoutMs: 120_000 });
      outputs.push(r.stdout, r.stderr);
      return r;
    };
    const good = upstream.seed() as { tokens: Record<string, string> };
    const ok = await seed(JSON.stringify(good));
    assert.equal(ok.code, 0, ok.stderr);
    const before = await rawRow(url);
    assert.ok(before);
    const gt = good.tokens;
    const cases: Array<[string, string, RegExp]> = [
      ['a 2 MiB document', JSON.stringify({ tokens: gt, pad: 'a'.repeat(TWO_MIB) }), /document: is larger than/],
      ['a nested __proto__ key', `{"tokens": ${JSON.stringify(gt).slice(0, -1)}, "__proto__": {"x": 1}}}`, /document: must not contain __proto__/],
      ['a non-string refresh_token', JSON.stringify({ tokens: { ...gt, refresh_token: ['rt'] } }), /tokens\.refresh_token: must be a non-empty string/],
    ];
    for (const [name, input, expected] of cases) {
      const r = await seed(input);
      assert.equal(r.code, 2, `${name}: ${r.stderr}`);
      assert.match(r.stderr, expected, name);
      assert.match(r.stderr, /Nothing was stored/, name);
      const now = await rawRow(url);
      assert.ok(now && now.encrypted_value.equals(before.encrypted_value), `${name}: the stored bytes changed`);
      assert.equal(now.updated_at, before.updated_at, `${name}: updated_at moved`);
    }
    assert.deepEqual(findLeaks(outputs, [gt['access_token']!, gt['refresh_token']!, gt['id_token']!]), []);
  });
});

describe('names, headers and bodies at the edge', () => {
  test('client names are validated: length, charset', async () => {
    const { t } = await seededApp();
    const bad = ['a'.repeat(65), 'has space', 'a/b', '../etc', 'ünïcode', 'emoji-🙂', '', '-leading-dash', 'tab\there', 'new\nline', 'nul\u0000x'];
    for (const name of [...bad, 42, null, ['a']]) {
      const res = await t.app.inject({ method: 'POST', url: '/admin/clients', headers: admin, payload: { name } });
      outputs.push(res.body);
      assert.equal(res.statusCode, 400, `${JSON.stringify(name)}: ${res.body}`);
      assert.match(String(res.headers['content-type']), /^application\/problem\+json/);
      assert.equal(res.json<{ field: string }>().field, 'name', JSON.stringify(name));
    }
    const longest = await t.app.inject({ method: 'POST', url: '/admin/clients', headers: admin, payload: { name: 'a'.repeat(64) } });
    assert.equal(longest.statusCode, 201, '64 characters is the limit, not past it');
    const listed = await t.app.inject({ method: 'GET', url: '/admin/clients', headers: admin });
    assert.deepEqual(
      listed.json<{ clients: Array<{ name: string }> }>().clients.map((c) => c.name),
      ['a'.repeat(64)],
      'no rejected name was stored',
    );
  });

  test('DELETE /admin/clients with a NUL, invalid UTF-8 or an over-long name is a 4xx problem, never a database error', async () => {
    const { t } = await seededApp();
    const names = ['a%00b', '%00', 'a%ffb', '%c3%28', '%ed%a0%80', 'a'.repeat(65), 'a'.repeat(300), '%E2%80%A8', '..', 'a b'.replace(' ', '%20')];
    for (const name of names) {
      const res = await t.app.inject({ method: 'DELETE', url: `/admin/clients/${name}`, headers: admin });
      outputs.push(res.body);
      assert.ok(res.statusCode === 404 || res.statusCode === 400, `${name.slice(0, 20)}: ${res.statusCode} ${res.body}`);
      assert.match(String(res.headers['content-type']), /^application\/problem\+json/, name.slice(0, 20));
      assert.doesNotMatch(res.body, /22021|22P05|sqlstate|invalid byte sequence|internal_error/i, name.slice(0, 20));
    }
    assert.deepEqual(t.logs.withEvent('request_failed'), [], 'no request failed inside a route');
  });

  test('a 500 answers code internal_error, never the error\'s own code (a SQLSTATE, an errno)', async () => {
    const { t } = await seededApp();
    // The pool itself failing mid-request: what a database error looks like to a route.
    const query = t.core.pool.query.bind(t.core.pool);
    t.core.pool.query = (() => Promise.reject(Object.assign(new Error('invalid byte sequence for encoding "UTF8": 0x00'), { code: '22021' }))) as unknown as typeof t.core.pool.query;
    try {
      const res = await t.app.inject({ method: 'GET', url: '/admin/events', headers: admin });
      assert.equal(res.statusCode, 500);
      const body = res.json<{ code: string; type: string; detail: string }>();
      assert.equal(body.code, 'internal_error');
      assert.match(body.type, /\/internal_error$/);
      assert.doesNotMatch(res.body, /22021|UTF8|0x00/);
    } finally {
      t.core.pool.query = query;
    }
    // The log line keeps the code for the operator.
    assert.ok(t.logs.withEvent('request_failed').some((l) => JSON.stringify(l).includes('22021')));
  });

  test('headers with absurd sizes get 431, not a crash', async () => {
    const { t } = await seededApp();
    await t.app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = t.app.server.address() as net.AddressInfo;
    const raw = (request: string) =>
      new Promise<string>((resolve, reject) => {
        const s = net.connect(port, '127.0.0.1');
        let got = '';
        s.setEncoding('latin1');
        s.on('data', (d: string) => (got += d));
        s.on('error', (err: NodeJS.ErrnoException) => (err.code === 'ECONNRESET' || err.code === 'EPIPE' ? resolve(got) : reject(err)));
        s.on('close', () => resolve(got));
        s.setTimeout(10_000, () => s.destroy(new Error('no answer within 10 s')));
        s.write(request);
      });
    const huge = `GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ${'a'.repeat(100 * 1024)}\r\n\r\n`;
    const first = await raw(huge);
    assert.match(first.split('\r\n')[0] ?? '', /^HTTP\/1\.1 431 /, first.slice(0, 200));
    // Many medium headers adding up past the limit, too.
    const many = `GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n${Array.from({ length: 400 }, (_, i) => `X-H${i}: ${'b'.repeat(200)}\r\n`).join('')}\r\n`;
    assert.match((await raw(many)).split('\r\n')[0] ?? '', /^HTTP\/1\.1 431 /);
    // Still serving.
    const ok = await raw('GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n');
    assert.match(ok.split('\r\n')[0] ?? '', /^HTTP\/1\.1 200 /, ok.slice(0, 200));
    const res = await fetch(`http://127.0.0.1:${port}/healthz`);
    assert.equal(res.status, 200);
    assert.equal((await res.json() as { status: string }).status, 'ok');
  });

  test('request bodies are bounded: a 2 MiB POST /oauth/token is refused in the upstream error shape', async () => {
    const { t } = await seededApp();
    const big = 'x'.repeat(TWO_MIB);
    for (const [type, payload] of [
      ['application/json', JSON.stringify({ grant_type: 'refresh_token', refresh_token: big })],
      ['application/x-www-form-urlencoded', `grant_type=refresh_token&refresh_token=${big}`],
    ] as const) {
      const res = await t.app.inject({ method: 'POST', url: '/oauth/token', headers: { 'content-type': type }, payload });
      outputs.push(res.body.slice(0, 2000));
      assert.ok(res.statusCode >= 400 && res.statusCode < 500, `${type}: ${res.statusCode}`);
      assert.equal(res.statusCode, 400, `${type}: the shim answers body errors as the upstream would (400 invalid_request)`);
      assert.match(String(res.headers['content-type']), /^application\/json/);
      const body = res.json<{ error: { code: string; message: string } }>();
      assert.equal(body.error.code, 'invalid_request');
      assert.match(body.error.message, /too large/i);
      assert.ok(res.body.length < 1000, 'the answer does not echo the body');
    }
    // And an admin route with a 2 MiB body is 413 problem+json.
    const res = await t.app.inject({ method: 'POST', url: '/admin/clients', headers: { ...admin, 'content-type': 'application/json' }, payload: JSON.stringify({ name: big }) });
    assert.equal(res.statusCode, 413);
    assert.match(String(res.headers['content-type']), /^application\/problem\+json/);
    assert.equal((await t.app.inject({ method: 'GET', url: '/healthz' })).statusCode, 200);
  });
});
