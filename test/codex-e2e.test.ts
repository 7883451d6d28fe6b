/**
 * Acceptance: the real codex CLI (@openai/codex 0.169.0) against a LISTENING broker.
 *
 * The workspace side is exactly what a fleet runs: scripts/codex_auth_sync.sh writes
 * ${CODEX_HOME}/auth.json from GET /codex-auth, and codex is started with
 * CODEX_REFRESH_TOKEN_URL_OVERRIDE=<broker>/oauth/token. The ChatGPT backend is the TLS
 * fake of test/helpers/fake-backend.ts (codex 0.169.0 needs an HTTPS chatgpt_base_url;
 * `codexEnv()` / `execArgs()` handle it); the upstream token endpoint is the strict
 * FakeUpstream. codex and the script run as async child processes, because the fakes and
 * the broker live in this process and must keep answering.
 */
import { strict as assert } from 'node:assert';
import { runProcess } from './helpers/process.js';
import * as fs from 'node:fs';
import type { AddressInfo } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Agent } from 'undici';
import { after, before, describe, test, type TestContext } from 'node:test';
import { generationOf } from '../src/clients/credentials.js';
import { ADMIN_TOKEN, createTestApp, type TestApp } from './helpers/app.js';
import { makeChatgptLogin, readAuthJson, runCodex, type CodexResult } from './helpers/codex.js';
import { FakeBackend, TEST_CA_PEM } from './helpers/fake-backend.js';
import { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { startTestPostgres, type TestPostgres } from './helpers/pg.js';

const SCRIPT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', 'scripts', 'codex_auth_sync.sh');
const CODEX_TIMEOUT_MS = 60_000;
const TEST_TIMEOUT_MS = 150_000;
const FLOOR_S = 600;
const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };

let pg: TestPostgres;
const secrets: string[] = [ADMIN_TOKEN];
const logLines: string[][] = [];

before(async () => {
  pg = await startTestPostgres();
});
after(async () => {
  await pg?.stop();
});

interface Broker {
  t: TestApp;
  url: string;
  upstream: FakeUpstream;
  backend: FakeBackend;
  client: { token: string; refreshCredential: string };
  codexHome: string;
  /** Milliseconds added to the broker's clock (the upstream and codex keep real time). */
  setClockOffset(ms: number): void;
}

/** A listening broker on a fresh database, seeded, with one client, plus the fakes; closed in t.after. */
async function broker(t: TestContext): Promise<Broker> {
  let offset = 0;
  const now = (): number => Date.now() + offset;
  const upstream = await FakeUpstream.start();
  t.after(() => upstream.close());
  const backend = await FakeBackend.start();
  t.after(() => backend.close());
  // The broker verifies a reported rejection against the same fake backend codex talks to
  // (HTTPS with the test CA), as it would against chatgpt.com.
  const dispatcher = new Agent({ connect: { ca: TEST_CA_PEM } });
  t.after(() => dispatcher.close());
  const app = await createTestApp({
    databaseUrl: await pg.newDatabase(),
    upstreamUrl: upstream.url,
    now,
    floorSeconds: FLOOR_S,
    dispatcher,
    config: { CHATGPT_BASE_URL: `${backend.url.replace(/\/+$/, '')}` },
  });
  t.after(() => app.close());
  logLines.push(app.logs.lines);
  await app.app.listen({ port: 0, host: '127.0.0.1' });
  const { port } = app.app.server.address() as AddressInfo;
  const url = `http://127.0.0.1:${port}`;

  const seed = await app.app.inject({ method: 'PUT', url: '/admin/credential', headers: admin, payload: upstream.seed() });
  assert.equal(seed.statusCode, 200, seed.body);
  const created = await app.app.inject({ method: 'POST', url: '/admin/clients', headers: admin, payload: { name: 'codex-e2e' } });
  assert.equal(created.statusCode, 201, created.body);
  const client = created.json() as { token: string; refreshCredential: string };
  secrets.push(client.token, client.refreshCredential);
  t.after(() => {
    secrets.push(...upstream.issuedTokens());
  });

  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'codex-e2e-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  return {
    t: app,
    url,
    upstream,
    backend,
    client,
    codexHome: path.join(root, 'codex-home'),
    setClockOffset(ms: number) {
      offset = ms;
    },
  };
}

interface ScriptResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** scripts/codex_auth_sync.sh as a workspace runs it, asynchronously, with a clean environment. */
function runSync(b: Broker, timeoutMs = 60_000): Promise<ScriptResult> {
  return runProcess('bash', [SCRIPT], {
    env: {
      PATH: process.env.PATH ?? '/usr/bin:/bin',
      HOME: path.dirname(b.codexHome),
      CODEX_HOME: b.codexHome,
      CODEX_AUTH_BROKER_URL: b.url,
      CODEX_AUTH_BROKER_TOKEN: b.client.token,
    },
    timeoutMs,
  });
}

/** Sync, and check what the script wrote is exactly what the broker serves this client. */
async function syncedDoc(b: Broker): Promise<{ access_token: string; refresh_token: string; id_token: string; account_id: string }> {
  const r = await runSync(b);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /wrote auth\.json/);
  const file = path.join(b.codexHome, 'auth.json');
  assert.equal(fs.statSync(file).mode & 0o777, 0o600, 'auth.json is 0600');
  const served = await b.t.app.inject({ method: 'GET', url: '/codex-auth', headers: { authorization: `Bearer ${b.client.token}` } });
  assert.equal(fs.readFileSync(file, 'utf8'), served.body, 'byte for byte what the broker serves');
  return (readAuthJson(b.codexHome) as { tokens: { access_token: string; refresh_token: string; id_token: string; account_id: string } }).tokens;
}

/** `codex exec` through the broker's shim, 60 s at most. */
function codexExec(b: Broker): Promise<CodexResult> {
  return runCodex(b.backend.execArgs('say hi'), {
    codexHome: b.codexHome,
    env: { ...b.backend.codexEnv(), CODEX_REFRESH_TOKEN_URL_OVERRIDE: `${b.url}/oauth/token` },
    timeoutMs: CODEX_TIMEOUT_MS,
  });
}

/** Answers of the shim by result, from this broker's metrics. */
async function shimAnswers(b: Broker): Promise<Record<string, number>> {
  const m = await b.t.metrics.tokenServed.get();
  return Object.fromEntries(m.values.filter((v) => v.labels['route'] === '/oauth/token').map((v) => [String(v.labels['result']), v.value]));
}

function summary(r: CodexResult): string {
  return `exit=${r.code} signal=${r.signal} timedOut=${r.timedOut} ${r.durationMs} ms\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr.slice(-4000)}`;
}

/** Who-sent-what at the backend, with tokens replaced by names. */
function endpointList(backend: FakeBackend, names: Record<string, string>): string {
  return backend.requests
    .filter((r) => r.bearer !== undefined)
    .map((r) => `${r.upgrade ? 'WS ' : ''}${r.method} ${r.path} [${names[r.bearer!] ?? 'other'}] -> ${r.status}`)
    .join(' | ');
}

describe('the real codex CLI against the broker', () => {
  test('the real codex CLI accepts what the broker serves', { timeout: TEST_TIMEOUT_MS }, async (t) => {
    const b = await broker(t);
    const tokens = await syncedDoc(b);
    assert.equal(tokens.refresh_token, `${b.client.refreshCredential}.${generationOf(tokens.access_token)}`, 'proxy exposure: the broker credential, tagged');
    assert.equal(fs.statSync(b.codexHome).mode & 0o777, 0o700, 'CODEX_HOME created 0700');

    const r = await runCodex(['login', 'status'], { codexHome: b.codexHome, timeoutMs: CODEX_TIMEOUT_MS });
    t.diagnostic(`codex login status: exit ${r.code}, ${r.durationMs} ms: ${(r.stdout + r.stderr).trim().split('\n').join(' / ')}`);
    assert.equal(r.code, 0, summary(r));
    assert.match(r.stdout + r.stderr, /Logged in using ChatGPT/, summary(r));
    assert.equal(b.upstream.posts, 0);

    // A second sync is a no-op (304 through the saved ETag).
    const again = await runSync(b);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stderr, /unchanged \(304\)/);
  });

  test('the real codex CLI refreshes through the shim', { timeout: TEST_TIMEOUT_MS }, async (t) => {
    const b = await broker(t);
    const held = await syncedDoc(b);
    const A = held.access_token;

    // The broker rotates (an operator's refresh): the workspace now holds a stale token.
    const refresh = await b.t.app.inject({ method: 'POST', url: '/admin/refresh', headers: admin });
    assert.equal(refresh.statusCode, 200, refresh.body);
    assert.equal((refresh.json() as { outcome: string }).outcome, 'rotated');
    assert.equal(b.upstream.posts, 1);
    const B = b.upstream.lastAccessToken()!;
    assert.notEqual(B, A);
    b.backend.setCurrentAccessToken(B); // the backend now answers 401 to A

    const r = await codexExec(b);
    const shim = await shimAnswers(b);
    const names = { [A]: 'A', [B]: 'B' };
    t.diagnostic(`codex exec (stale A, broker at B): exit ${r.code}, ${r.durationMs} ms; shim answers ${JSON.stringify(shim)}; upstream POSTs ${b.upstream.posts}`);
    t.diagnostic(`backend: ${endpointList(b.backend, names)}`);
    assert.equal(r.code, 0, summary(r));
    assert.match(r.stdout, /hi from the fake backend/, summary(r));

    assert.ok((shim['ok'] ?? 0) >= 1, `codex refreshed through the shim: ${JSON.stringify(shim)}`);
    assert.equal(b.upstream.posts, 1, 'codex caused no upstream POST: the broker handed it the current token');
    assert.equal(b.upstream.reuseAnswers, 0);

    const authed = b.backend.authenticated();
    assert.ok(authed.some((x) => x.bearer === A && x.status === 401), 'codex first tried A and got 401');
    const responses = authed.filter((x) => x.method === 'POST' && x.path === '/backend-api/codex/responses');
    assert.equal(responses.at(-1)?.bearer, B, 'the model call used B');
    assert.equal(responses.at(-1)?.status, 200);
    for (const x of authed) assert.ok(x.bearer === A || x.bearer === B, `unknown bearer on ${x.path}`);

    // What codex wrote back: B, and the broker credential tagged with B's generation.
    const after = readAuthJson(b.codexHome) as { tokens: Record<string, string>; last_refresh: string };
    t.diagnostic(`auth.json after: keys=${Object.keys(after).join(',')} refresh_token=<credential>.${after.tokens['refresh_token']?.split('.').at(-1)} last_refresh=${after.last_refresh}`);
    assert.equal(after.tokens['access_token'], B);
    assert.equal(after.tokens['refresh_token'], `${b.client.refreshCredential}.${generationOf(B)}`);
    assert.equal(after.tokens['account_id'], held.account_id);
    assert.equal(fs.statSync(path.join(b.codexHome, 'auth.json')).mode & 0o777, 0o600);

    // The next sync brings the same login (now identical tokens) without fuss.
    const resync = await runSync(b);
    assert.equal(resync.code, 0, resync.stderr);
    assert.equal((readAuthJson(b.codexHome) as { tokens: Record<string, string> }).tokens['access_token'], B);
  });

  test(
    'the real codex CLI holding the current token that the backend rejects forces exactly one upstream POST',
    { timeout: TEST_TIMEOUT_MS },
    async (t) => {
      const b = await broker(t);
      const held = await syncedDoc(b);
      const A = held.access_token;
      // A revoked access token: the backend accepts only some other token C, never issued by the broker.
      const C = makeChatgptLogin({ tag: 'revoked-elsewhere' }).accessToken;
      b.backend.setCurrentAccessToken(C);
      // The broker's clock is past the floor since the seed (codex and the upstream keep real time).
      b.setClockOffset((FLOOR_S + 60) * 1000);

      const r = await codexExec(b);
      const shim = await shimAnswers(b);
      const B = b.upstream.lastAccessToken()!;
      const names = { [A]: 'A', [B]: 'B', [C]: 'C' };
      const errLines = (r.stdout + r.stderr).split('\n').filter((l) => /ERROR/.test(l) && !/codex_models_manager|rmcp::/.test(l));
      t.diagnostic(
        `codex exec (current A rejected by the backend): exit ${r.code}, timedOut ${r.timedOut}, ${r.durationMs} ms; shim answers ${JSON.stringify(shim)}; ` +
          `upstream POSTs ${b.upstream.posts}, rotations ${b.upstream.rotations}, reuse ${b.upstream.reuseAnswers}; errors: ${errLines.slice(-3).join(' / ')}`,
      );
      t.diagnostic(`backend: ${endpointList(b.backend, names)}`);
      const rotation = b.t.logs.withEvent('rotation');
      t.diagnostic(`broker rotations: ${rotation.map((e) => String(e['reason'])).join(', ')}`);

      assert.equal(r.timedOut, false, summary(r));
      assert.ok((shim['ok'] ?? 0) >= 1, `codex called the shim: ${JSON.stringify(shim)}`);
      assert.equal(b.upstream.posts, 1, 'exactly one upstream POST, whatever codex did');
      assert.equal(b.upstream.rotations, 1);
      assert.equal(b.upstream.reuseAnswers, 0);
      assert.deepEqual(rotation.map((e) => e['reason']), ['shim_unauthorized_recovery']);
      const checks = (await b.t.metrics.tokenChecks.get()).values;
      assert.equal(checks.find((v) => v.labels['verdict'] === 'rejected')?.value, 1, 'the broker verified A with the backend before forcing');
      assert.ok(b.backend.requests.some((x) => x.path === '/backend-api/wham/usage' && x.bearer === A && x.status === 401));
      assert.notEqual(B, A);
      const authed = b.backend.authenticated();
      assert.ok(authed.some((x) => x.bearer === A && x.status === 401), 'codex first tried A');
      assert.ok(authed.some((x) => x.bearer === B), 'codex retried with the force-refreshed B');
      for (const x of authed) assert.ok(x.bearer === A || x.bearer === B, `unknown bearer on ${x.path}`);
      const after = readAuthJson(b.codexHome) as { tokens: Record<string, string> };
      assert.equal(after.tokens['access_token'], B, 'codex adopted B');
      assert.equal(after.tokens['refresh_token'], `${b.client.refreshCredential}.${generationOf(B)}`);
      // The backend never accepts B, so the run cannot succeed.
      assert.notEqual(r.code, 0, summary(r));
    },
  );
});

test('no token or client secret reaches the broker logs', () => {
  const lines = logLines.flat();
  assert.ok(lines.length > 0);
  assert.deepEqual(findLeaks(lines, secrets), []);
});
