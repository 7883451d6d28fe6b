import { strict as assert } from 'node:assert';
import * as fs from 'node:fs';
import type { AddressInfo } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';
import { createRevokeClient, revokeUrlFor } from '../src/upstream.js';
import { UpstreamError } from '../src/errors.js';
import { ADMIN_TOKEN, createTestApp, type TestApp } from './helpers/app.js';
import { runCodex, writeAuthJson } from './helpers/codex.js';
import { DEFAULT_CLIENT_ID, REVOKE_PATH, type FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';

const KEY = 'CODEX_AUTH_JSON';
const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
const suite = useSuite();
const clientSecrets: string[] = [];
const responses: string[] = [];

interface Served {
  tokens: { access_token: string; refresh_token: string };
}

/** A seeded broker with one client, and what it serves that client. */
async function setup(opts: { start?: boolean } = {}) {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const t = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, start: opts.start ?? false });
  const doc = upstream.seed() as { tokens: { refresh_token: string } };
  assert.equal((await t.app.inject({ method: 'PUT', url: '/admin/credential', headers: admin, payload: doc })).statusCode, 200);
  const client = (await t.app.inject({ method: 'POST', url: '/admin/clients', headers: admin, payload: { name: 'ws-1' } })).json() as { token: string; refreshCredential: string };
  clientSecrets.push(client.token, client.refreshCredential);
  const served = (await t.app.inject({ url: '/codex-auth', headers: { authorization: `Bearer ${client.token}` } })).json() as Served;
  return { t, upstream, url, doc, client, served };
}

async function revocations(t: TestApp): Promise<Record<string, number>> {
  const m = await t.metrics.revocations.get();
  return Object.fromEntries(m.values.map((v) => [String(v.labels['source']), v.value]));
}

async function rowBytes(t: TestApp): Promise<Buffer | undefined> {
  return (await t.core.store.read(KEY))?.raw;
}

function revoke(t: TestApp, payload: string | object, contentType = 'application/json') {
  return t.app.inject({ method: 'POST', url: '/oauth/revoke', headers: { 'content-type': contentType }, payload: typeof payload === 'string' ? payload : JSON.stringify(payload) });
}

// ---- POST /oauth/revoke: a client's logout -------------------------------------------------

test('a client\'s logout is answered 200 {} and changes nothing: the client and the login keep working, nothing goes upstream', async () => {
  const { t, upstream, client, served } = await setup();
  const before = await rowBytes(t);
  const res = await revoke(t, { token: served.tokens.refresh_token, token_type_hint: 'refresh_token', client_id: DEFAULT_CLIENT_ID });
  responses.push(res.body);
  assert.equal(res.statusCode, 200);
  assert.deepEqual(res.json(), {});
  const again = await t.app.inject({ url: '/codex-auth', headers: { authorization: `Bearer ${client.token}` } });
  assert.equal(again.statusCode, 200);
  const shim = await t.app.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', client_id: DEFAULT_CLIENT_ID, refresh_token: served.tokens.refresh_token } });
  assert.equal(shim.statusCode, 200, shim.body);
  assert.equal(upstream.posts, 0, 'the upstream saw no POST at all');
  assert.deepEqual(await rowBytes(t), before, 'the stored credential is byte-identical');
  assert.deepEqual(await revocations(t), { client_logout: 1, admin: 0 });
  const line = t.logs.withEvent('client_logout');
  assert.equal(line.length, 1);
  assert.equal(line[0]?.['client'], 'ws-1');
  assert.equal(line[0]?.['tokenKind'], 'broker_credential');
  assert.equal(line[0]?.['tokenTypeHint'], 'refresh_token');
});

test('POST /oauth/revoke answers 200 {} to a form body, an unknown token, malformed JSON, no body and any media type', async () => {
  const { t, upstream, served } = await setup();
  const cases: Array<[string, string, string]> = [
    ['form', new URLSearchParams({ token: served.tokens.refresh_token, token_type_hint: 'refresh_token', client_id: DEFAULT_CLIENT_ID }).toString(), 'application/x-www-form-urlencoded'],
    ['unknown token', JSON.stringify({ token: 'cabrt_nobody.0' }), 'application/json'],
    ['malformed JSON', '{"token":', 'application/json'],
    ['empty JSON', '', 'application/json'],
    ['an array', '[1]', 'application/json'],
    ['text', 'logout please', 'text/plain'],
    ['xml', '<revoke/>', 'application/xml'],
  ];
  for (const [name, payload, type] of cases) {
    const res = await revoke(t, payload, type);
    assert.equal(res.statusCode, 200, `${name}: ${res.body}`);
    assert.deepEqual(res.json(), {}, name);
  }
  const bare = await t.app.inject({ method: 'POST', url: '/oauth/revoke' });
  assert.equal(bare.statusCode, 200, bare.body);
  const kinds = t.logs.withEvent('client_logout').map((l) => [l['client'], l['tokenKind']]);
  assert.deepEqual(kinds, [
    ['ws-1', 'broker_credential'],
    ['unknown', 'unknown'],
    ['unknown', 'none'],
    ['unknown', 'none'],
    ['unknown', 'none'],
    ['unknown', 'none'],
    ['unknown', 'none'],
    ['unknown', 'none'],
  ]);
  assert.equal((await revocations(t))['client_logout'], cases.length + 1);
  assert.equal(upstream.posts, 0);
});

test('POST /oauth/revoke keeps a body size limit: 413 for a body over 64 KiB', async () => {
  const { t, upstream } = await setup();
  const res = await revoke(t, { token: 'a'.repeat(128 * 1024) });
  assert.equal(res.statusCode, 413);
  assert.match(String(res.headers['content-type']), /application\/problem\+json/);
  assert.equal(upstream.posts, 0);
});

test('the shared login\'s own refresh token presented for revocation is not forwarded either, and the log says where to look', async () => {
  const { t, upstream, doc } = await setup();
  const before = await rowBytes(t);
  const res = await revoke(t, { token: doc.tokens.refresh_token, token_type_hint: 'refresh_token', client_id: DEFAULT_CLIENT_ID });
  assert.equal(res.statusCode, 200);
  assert.equal(upstream.posts, 0);
  assert.deepEqual(await rowBytes(t), before);
  const line = t.logs.withEvent('client_logout')[0];
  assert.equal(line?.['tokenKind'], 'shared_login');
  assert.equal(line?.['level'], 40);
});

// ---- POST /admin/credentials/default/revoke: the operator's revocation ---------------------

test('the operator\'s revoke revokes the stored token upstream once, latches it, and no refresh POST follows on any replica', async () => {
  const { t, upstream, url, doc } = await setup();
  const res = await t.app.inject({ method: 'POST', url: '/admin/credentials/default/revoke', headers: admin });
  responses.push(res.body);
  assert.equal(res.statusCode, 200, res.body);
  const body = res.json();
  assert.equal(body.outcome, 'revoked');
  assert.equal(body.status.state, 'latched');
  assert.equal(body.status.latch.upstreamCode, 'refresh_token_invalidated');
  assert.equal(upstream.revocations, 1);
  const sent = upstream.requests.filter((r) => r.path === REVOKE_PATH);
  assert.deepEqual(sent.map((r) => r.body), [{ token: doc.tokens.refresh_token, token_type_hint: 'refresh_token', client_id: DEFAULT_CLIENT_ID }]);
  assert.match(String(sent[0]?.headers['content-type']), /application\/json/);
  assert.equal(t.core.refresher.latched, true);
  const status = (await t.app.inject({ url: '/status', headers: admin })).json();
  assert.equal(status.state, 'latched');
  assert.equal(status.lastError.code, 'revoked');
  // Neither this replica nor another one POSTs the revoked token again.
  const forced = await t.app.inject({ method: 'POST', url: '/admin/refresh', headers: admin });
  assert.equal(forced.json().outcome, 'latched');
  const other = await createTestApp({ databaseUrl: url, upstreamUrl: upstream.url, start: false });
  try {
    await other.core.refresher.reload();
    assert.equal((await other.core.refresher.runCycle({ force: true, waitForLock: true, ignoreBackoff: true })).check, 'latched');
  } finally {
    await other.close();
  }
  assert.equal(upstream.tokenPosts, 0, 'no refresh POST after the revocation');
  assert.deepEqual(await revocations(t), { client_logout: 0, admin: 1 });
  const events = (await t.app.inject({ url: '/admin/events', headers: admin })).json().events as Array<Record<string, unknown>>;
  const rev = events.find((e) => e['kind'] === 'revoke');
  assert.equal(rev?.['outcome'], 'revoked');
  assert.equal(rev?.['source'], 'admin');
  assert.equal(rev?.['reason'], 'revoke');
  assert.equal(t.logs.withEvent('revoked').length, 1);
  // The revoked login is spent: seeding it again is refused.
  const reseed = await t.app.inject({ method: 'PUT', url: '/admin/credential', headers: admin, payload: doc });
  assert.equal(reseed.statusCode, 409, reseed.body);
  assert.match(reseed.json().detail, /revoked upstream by the broker/);
});

test('a refresh of a token the fake upstream revoked answers 401 refresh_token_invalidated, as the real one does', async () => {
  const { t, upstream } = await setup();
  assert.equal((await t.app.inject({ method: 'POST', url: '/admin/credentials/default/revoke', headers: admin })).statusCode, 200);
  // Bypass the latch: ask the upstream directly with the revoked token.
  const token = t.core.refresher.current()?.parsed.tokens.refresh_token ?? '';
  const r = await fetch(upstream.url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ grant_type: 'refresh_token', client_id: DEFAULT_CLIENT_ID, refresh_token: token }) });
  assert.equal(r.status, 401);
  assert.equal(((await r.json()) as { error: { code: string } }).error.code, 'refresh_token_invalidated');
});

test('a failed upstream revocation answers 502, latches nothing, and can be retried', async () => {
  const { t, upstream } = await setup();
  upstream.revokeFault({ kind: 'status', status: 503 });
  const failed = await t.app.inject({ method: 'POST', url: '/admin/credentials/default/revoke', headers: admin });
  assert.equal(failed.statusCode, 502, failed.body);
  assert.equal(failed.json().code, 'revoke_failed');
  assert.equal(failed.json().upstreamStatus, 503);
  assert.equal(t.core.refresher.latched, false);
  assert.equal(t.core.refresher.state(), 'fresh');
  assert.equal((await revocations(t))['admin'], 0);
  const retried = await t.app.inject({ method: 'POST', url: '/admin/credentials/default/revoke', headers: admin });
  assert.equal(retried.statusCode, 200, retried.body);
  const outcomes = ((await t.app.inject({ url: '/admin/events', headers: admin })).json().events as Array<Record<string, unknown>>)
    .filter((e) => e['kind'] === 'revoke')
    .map((e) => e['outcome']);
  assert.deepEqual(outcomes, ['revoked', 'revoke_failed']);
});

test('the admin revoke: 404 for another credential name or when nothing is stored, 401 without the admin token', async () => {
  const { t, upstream } = await setup();
  const other = await t.app.inject({ method: 'POST', url: '/admin/credentials/team-b/revoke', headers: admin });
  assert.equal(other.statusCode, 404);
  assert.equal(other.json().code, 'not_found');
  assert.equal((await t.app.inject({ method: 'POST', url: '/admin/credentials/default/revoke' })).statusCode, 401);
  const empty = await suite.app({ databaseUrl: await suite.pg.newDatabase(), upstreamUrl: upstream.url, start: false });
  const absent = await empty.app.inject({ method: 'POST', url: '/admin/credentials/default/revoke', headers: admin });
  assert.equal(absent.statusCode, 404);
  assert.equal(absent.json().code, 'credential_absent');
  assert.equal(upstream.revocations, 0);
  assert.equal(upstream.posts, 0);
});

test('the revoke client sends RFC 7009 JSON to /oauth/revoke beside the token URL and never repeats the token in an error', async () => {
  const upstream: FakeUpstream = await suite.upstream();
  assert.equal(revokeUrlFor('https://auth.example.com/oauth/token'), 'https://auth.example.com/oauth/revoke');
  const revokeFn = createRevokeClient({ url: revokeUrlFor(upstream.url), clientId: DEFAULT_CLIENT_ID, timeoutMs: 5_000 });
  const token = (upstream.seed() as { tokens: { refresh_token: string } }).tokens.refresh_token;
  upstream.revokeFault({ kind: 'status', status: 400, body: { error: { code: token, message: `bad token ${token}` } } });
  const err = await revokeFn(token).then(
    () => undefined,
    (e: unknown) => e,
  );
  assert.ok(err instanceof UpstreamError);
  assert.equal(err.status, 400);
  assert.ok(!err.message.includes(token) && !String(err.upstreamCode).includes(token));
  await revokeFn(token);
  assert.equal(upstream.revocations, 1);
});

// ---- the real codex CLI ---------------------------------------------------------------------

test('the real codex 0.169.0 `codex logout` through the shim override succeeds, is logged and counted, and the stored login is byte-identical', { timeout: 120_000 }, async (t) => {
  const { t: broker, upstream, client } = await setup();
  await broker.app.listen({ port: 0, host: '127.0.0.1' });
  const base = `http://127.0.0.1:${(broker.app.server.address() as AddressInfo).port}`;
  const served = await fetch(`${base}/codex-auth`, { headers: { authorization: `Bearer ${client.token}` } });
  assert.equal(served.status, 200);
  const codexHome = fs.mkdtempSync(path.join(os.tmpdir(), 'codex-logout-'));
  t.after(() => fs.rmSync(codexHome, { recursive: true, force: true }));
  writeAuthJson(codexHome, JSON.parse(await served.text()));
  const before = await rowBytes(broker);
  const r = await runCodex(['logout'], { codexHome, env: { CODEX_REFRESH_TOKEN_URL_OVERRIDE: `${base}/oauth/token` }, timeoutMs: 60_000 });
  responses.push(r.stdout, r.stderr);
  assert.equal(r.code, 0, `${r.stdout}\n${r.stderr}`);
  assert.match(r.stdout + r.stderr, /Successfully logged out/);
  assert.equal(fs.existsSync(path.join(codexHome, 'auth.json')), false, 'codex removed its auth.json');
  const line = broker.logs.withEvent('client_logout');
  assert.equal(line.length, 1, 'codex posted its revocation to the broker');
  assert.equal(line[0]?.['client'], 'ws-1');
  assert.equal(line[0]?.['tokenTypeHint'], 'refresh_token');
  assert.equal(line[0]?.['clientId'], DEFAULT_CLIENT_ID);
  assert.deepEqual(await revocations(broker), { client_logout: 1, admin: 0 });
  assert.deepEqual(await rowBytes(broker), before, 'the stored credential is byte-identical');
  assert.equal(upstream.posts, 0, 'nothing reached the upstream');
  const still = await fetch(`${base}/codex-auth`, { headers: { authorization: `Bearer ${client.token}` } });
  assert.equal(still.status, 200, 'the client keeps working');
});

test('no token value appears in any log line or response of the revocation tests', () => {
  assert.deepEqual(findLeaks([...suite.logLines(), ...responses], [...suite.issuedTokens(), ...clientSecrets]), []);
});
