/**
 * The real codex CLI (@openai/codex 0.169.0) against local fakes: what it does with an
 * auth.json, which backend endpoints `codex exec` calls, and exactly how it refreshes
 * after a 401 (the request the broker's /oauth/token shim must accept).
 *
 * Observed with 0.169.0 (and where it differs from shared/FACTS.md):
 * - `chatgpt_base_url` must be HTTPS: before any model call codex resolves "workspace
 *   routing" (GET /wham/accounts/check) and rejects an http:// origin ("workspace backend
 *   must use an HTTPS origin without credentials"). FACTS.md's plain-http recipe no longer
 *   reaches /codex/responses. The fake backend serves TLS; CODEX_CA_CERTIFICATE trusts it.
 * - The model catalog (GET https://chatgpt.com/backend-api/codex/models) and OTLP metrics
 *   (ab.chatgpt.com) ignore chatgpt_base_url; HTTPS_PROXY routes them to the fake too.
 * - The first 401 usually comes from /wham/accounts/check (routing discovery), which runs
 *   the unauthorized_recovery refresh itself; /codex/responses then uses the new token.
 * - `codex login status` prints "Logged in using ChatGPT" on stderr, not stdout.
 * - An expired access token is refreshed before any backend call, with
 *   refresh_reason "proactive_expiry"; the expired token is never sent.
 * - On rewrite codex keeps OPENAI_API_KEY, tokens.{id_token,access_token,refresh_token,
 *   account_id}, last_refresh and auth_mode, and drops unknown fields.
 */
import { strict as assert } from 'node:assert';
import * as fs from 'node:fs';
import { createServer } from 'node:http';
import type { IncomingMessage, Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { CODEX_CLIENT_ID, makeChatgptLogin, readAuthJson, runCodex, writeAuthJson } from './helpers/codex.js';
import type { CodexResult } from './helpers/codex.js';
import { FakeBackend } from './helpers/fake-backend.js';

const CODEX_TIMEOUT_MS = 60_000;
const TEST_TIMEOUT_MS = 120_000;

interface TokenPost {
  at: number;
  method: string;
  path: string;
  contentType: string | undefined;
  rawBody: string;
  body: unknown;
}

/** A tiny fake of the upstream token endpoint (`POST /oauth/token`). */
class FakeTokenEndpoint {
  readonly posts: TokenPost[] = [];
  private server!: Server;
  private port = 0;

  constructor(private readonly answer: (post: TokenPost) => { status: number; body: unknown }) {}

  get url(): string {
    return `http://127.0.0.1:${this.port}/oauth/token`;
  }

  async start(): Promise<this> {
    this.server = createServer((req: IncomingMessage, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        const rawBody = Buffer.concat(chunks).toString('utf8');
        let body: unknown;
        try {
          body = JSON.parse(rawBody);
        } catch {
          body = undefined;
        }
        const post: TokenPost = {
          at: performance.now(),
          method: req.method ?? '',
          path: req.url ?? '',
          contentType: req.headers['content-type'],
          rawBody,
          body,
        };
        this.posts.push(post);
        const { status, body: out } = this.answer(post);
        res.writeHead(status, { 'content-type': 'application/json' });
        res.end(JSON.stringify(out));
      });
    });
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.port = (this.server.address() as AddressInfo).port;
    return this;
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

function tmpCodexHome(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'codex-cli-test-'));
}

function summary(r: CodexResult): string {
  return `exit=${r.code} signal=${r.signal} timedOut=${r.timedOut} ${r.durationMs} ms\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr.slice(-4000)}`;
}

function endpointList(backend: FakeBackend): string {
  return backend.requests
    .map((r) => `${r.upgrade ? 'WS ' : ''}${r.method} ${r.host.startsWith('127.0.0.1') ? '' : r.host}${r.path}${r.query} -> ${r.status}`)
    .join(' | ');
}

describe('codex CLI 0.169.0 against local fakes', () => {
  const homes: string[] = [];
  const home = (): string => {
    const h = tmpCodexHome();
    homes.push(h);
    return h;
  };
  after(() => {
    for (const h of homes) fs.rmSync(h, { recursive: true, force: true });
  });

  test('codex login status reports a ChatGPT login for a valid auth.json', { timeout: TEST_TIMEOUT_MS }, async (t) => {
    const codexHome = home();
    writeAuthJson(codexHome, makeChatgptLogin().doc);
    const r = await runCodex(['login', 'status'], { codexHome, timeoutMs: CODEX_TIMEOUT_MS });
    t.diagnostic(`codex login status: ${r.durationMs} ms, exit ${r.code}`);
    assert.equal(r.code, 0, summary(r));
    // 0.169.0 prints it on stderr.
    assert.match(r.stdout + r.stderr, /Logged in using ChatGPT/, summary(r));
  });

  test('codex login status says "Not logged in" (exit 1) without auth.json', { timeout: TEST_TIMEOUT_MS }, async () => {
    const r = await runCodex(['login', 'status'], { codexHome: home(), timeoutMs: CODEX_TIMEOUT_MS });
    assert.equal(r.code, 1, summary(r));
    assert.match(r.stdout + r.stderr, /Not logged in/, summary(r));
  });

  describe('codex exec', () => {
    let backend: FakeBackend;
    before(async () => {
      backend = await FakeBackend.start();
    });
    after(async () => {
      await backend.close();
    });

    test('finishes against the fake backend with a current token, no refresh', { timeout: TEST_TIMEOUT_MS }, async (t) => {
      backend.requests.length = 0;
      backend.connects.length = 0;
      const login = makeChatgptLogin();
      backend.setCurrentAccessToken(login.accessToken);
      const tokenEndpoint = await new FakeTokenEndpoint(() => ({ status: 500, body: {} })).start();
      try {
        const codexHome = home();
        writeAuthJson(codexHome, login.doc);
        const before = fs.readFileSync(path.join(codexHome, 'auth.json'));
        const r = await runCodex(backend.execArgs('say hi'), {
          codexHome,
          env: { ...backend.codexEnv(), CODEX_REFRESH_TOKEN_URL_OVERRIDE: tokenEndpoint.url },
          timeoutMs: CODEX_TIMEOUT_MS,
        });
        t.diagnostic(`codex exec (no refresh): ${r.durationMs} ms, exit ${r.code}`);
        t.diagnostic(`endpoints: ${endpointList(backend)}`);
        t.diagnostic(`CONNECT: ${backend.connects.join(', ')}`);
        assert.equal(r.code, 0, summary(r));
        assert.match(r.stdout, /hi from the fake backend/, summary(r));
        assert.equal(tokenEndpoint.posts.length, 0, 'no refresh with a current token');
        assert.deepEqual(fs.readFileSync(path.join(codexHome, 'auth.json')), before, 'auth.json untouched');

        const seen = new Set(backend.requests.map((x) => `${x.method} ${x.path}`));
        assert.ok(seen.has('GET /backend-api/wham/accounts/check'), endpointList(backend));
        assert.ok(seen.has('POST /backend-api/codex/responses'), endpointList(backend));
        for (const x of backend.authenticated()) {
          assert.equal(x.bearer, login.accessToken, `${x.method} ${x.path}`);
          assert.equal(x.accountId, login.accountId, `${x.method} ${x.path} chatgpt-account-id`);
        }
      } finally {
        await tokenEndpoint.close();
      }
    });

    test(
      'after a 401 it refreshes once (unauthorized_recovery) and retries with the new token',
      { timeout: TEST_TIMEOUT_MS },
      async (t) => {
        backend.requests.length = 0;
        backend.connects.length = 0;
        const oldLogin = makeChatgptLogin({ tag: 'old', lastRefresh: new Date(Date.now() - 3600_000) });
        const newLogin = makeChatgptLogin({ tag: 'new', refreshToken: 'rt_rotated_by_fake_endpoint' });
        backend.setCurrentAccessToken(newLogin.accessToken); // the old token now gets 401
        const tokenEndpoint = await new FakeTokenEndpoint(() => ({
          status: 200,
          body: {
            access_token: newLogin.accessToken,
            id_token: newLogin.idToken,
            refresh_token: newLogin.refreshToken,
          },
        })).start();
        try {
          const codexHome = home();
          writeAuthJson(codexHome, { auth_mode: 'chatgpt', ...oldLogin.doc, x_unknown_field: { kept: '?' } });
          const started = Date.now();
          const r = await runCodex(backend.execArgs('say hi'), {
            codexHome,
            env: { ...backend.codexEnv(), CODEX_REFRESH_TOKEN_URL_OVERRIDE: tokenEndpoint.url },
            timeoutMs: CODEX_TIMEOUT_MS,
          });
          t.diagnostic(`codex exec (401 -> refresh -> retry): ${r.durationMs} ms, exit ${r.code}`);
          t.diagnostic(`endpoints: ${endpointList(backend)}`);
          t.diagnostic(`refresh request: ${tokenEndpoint.posts.map((p) => p.rawBody).join(' | ')}`);
          assert.equal(r.code, 0, summary(r));
          assert.match(r.stdout, /hi from the fake backend/, summary(r));

          // Exactly one refresh, with the documented body.
          assert.equal(tokenEndpoint.posts.length, 1, `token endpoint posts: ${tokenEndpoint.posts.length}`);
          const post = tokenEndpoint.posts[0]!;
          assert.equal(post.method, 'POST');
          assert.equal(post.path, '/oauth/token');
          assert.match(post.contentType ?? '', /^application\/json/);
          assert.deepEqual(post.body, {
            client_id: CODEX_CLIENT_ID,
            grant_type: 'refresh_token',
            refresh_reason: 'unauthorized_recovery',
            refresh_token: oldLogin.refreshToken,
          });

          // Old token first (401), then the new one, only after the refresh.
          const authed = backend.authenticated();
          const firstOld = authed.find((x) => x.bearer === oldLogin.accessToken);
          assert.ok(firstOld, 'codex sent the old token');
          assert.equal(firstOld.status, 401);
          const withNew = authed.filter((x) => x.bearer === newLogin.accessToken);
          assert.ok(withNew.length > 0, 'the backend saw the new token');
          for (const x of withNew) assert.ok(x.at >= post.at, `${x.path} used the new token before the refresh`);
          const responses = authed.filter((x) => x.method === 'POST' && x.path === '/backend-api/codex/responses');
          assert.ok(responses.length > 0, endpointList(backend));
          assert.equal(responses.at(-1)!.bearer, newLogin.accessToken);
          assert.equal(responses.at(-1)!.status, 200);
          for (const x of authed) {
            assert.ok(x.bearer === oldLogin.accessToken || x.bearer === newLogin.accessToken, `unknown bearer on ${x.path}`);
          }

          // What codex wrote back.
          const after = readAuthJson(codexHome);
          t.diagnostic(`auth.json after: keys=${Object.keys(after).join(',')} last_refresh=${String(after.last_refresh)}`);
          const tokens = after.tokens as Record<string, unknown>;
          assert.equal(tokens.access_token, newLogin.accessToken);
          assert.equal(tokens.id_token, newLogin.idToken);
          assert.equal(tokens.refresh_token, newLogin.refreshToken);
          assert.equal(tokens.account_id, oldLogin.accountId);
          assert.equal(after.OPENAI_API_KEY, null);
          assert.equal(after.auth_mode, 'chatgpt', 'auth_mode is kept');
          assert.equal(after.x_unknown_field, undefined, 'codex 0.169.0 drops unknown top-level fields when it rewrites');
          const lastRefresh = Date.parse(String(after.last_refresh));
          assert.ok(lastRefresh >= started - 1000, `last_refresh updated to now: ${String(after.last_refresh)}`);
          assert.equal(fs.statSync(path.join(codexHome, 'auth.json')).mode & 0o777, 0o600);
        } finally {
          await tokenEndpoint.close();
        }
      },
    );

    test(
      'after a 401 it first re-reads auth.json: a newer file on disk is adopted without any refresh POST',
      { timeout: TEST_TIMEOUT_MS },
      async (t) => {
        backend.requests.length = 0;
        const oldLogin = makeChatgptLogin({ tag: 'disk-old' });
        const newLogin = makeChatgptLogin({ tag: 'disk-new', accountId: oldLogin.accountId });
        backend.setCurrentAccessToken(newLogin.accessToken);
        const tokenEndpoint = await new FakeTokenEndpoint(() => ({ status: 500, body: {} })).start();
        const codexHome = home();
        // What a sync script does: the file on disk changes while codex holds the old token.
        backend.onUnauthorized = () => {
          const onDisk = readAuthJson(codexHome).tokens as Record<string, unknown> | undefined;
          if (onDisk?.access_token !== newLogin.accessToken) writeAuthJson(codexHome, newLogin.doc);
        };
        try {
          writeAuthJson(codexHome, oldLogin.doc);
          const r = await runCodex(backend.execArgs('say hi'), {
            codexHome,
            env: { ...backend.codexEnv(), CODEX_REFRESH_TOKEN_URL_OVERRIDE: tokenEndpoint.url },
            timeoutMs: CODEX_TIMEOUT_MS,
          });
          t.diagnostic(`codex exec (401 -> re-read auth.json): ${r.durationMs} ms, exit ${r.code}, token POSTs ${tokenEndpoint.posts.length}`);
          t.diagnostic(`endpoints: ${endpointList(backend)}`);
          assert.equal(r.code, 0, summary(r));
          assert.equal(tokenEndpoint.posts.length, 0, 'adopted the file instead of refreshing');
          const responses = backend.requests.filter((x) => x.method === 'POST' && x.path === '/backend-api/codex/responses');
          assert.equal(responses.at(-1)?.bearer, newLogin.accessToken, endpointList(backend));
          assert.equal(responses.at(-1)?.status, 200);
        } finally {
          backend.onUnauthorized = undefined;
          await tokenEndpoint.close();
        }
      },
    );

    test('an expired access token is refreshed before the first backend call', { timeout: TEST_TIMEOUT_MS }, async (t) => {
      backend.requests.length = 0;
      const oldLogin = makeChatgptLogin({ tag: 'expired', accessTtlSec: -3600 });
      const newLogin = makeChatgptLogin({ tag: 'expired-new', refreshToken: 'rt_after_expiry' });
      backend.setCurrentAccessToken(newLogin.accessToken);
      const tokenEndpoint = await new FakeTokenEndpoint(() => ({
        status: 200,
        body: { access_token: newLogin.accessToken, id_token: newLogin.idToken, refresh_token: newLogin.refreshToken },
      })).start();
      try {
        const codexHome = home();
        writeAuthJson(codexHome, oldLogin.doc);
        const r = await runCodex(backend.execArgs('say hi'), {
          codexHome,
          env: { ...backend.codexEnv(), CODEX_REFRESH_TOKEN_URL_OVERRIDE: tokenEndpoint.url },
          timeoutMs: CODEX_TIMEOUT_MS,
        });
        t.diagnostic(`codex exec (expired access token): ${r.durationMs} ms, exit ${r.code}`);
        t.diagnostic(`refresh request(s): ${tokenEndpoint.posts.map((p) => p.rawBody).join(' | ')}`);
        t.diagnostic(`endpoints: ${endpointList(backend)}`);
        assert.equal(r.code, 0, summary(r));
        assert.equal(tokenEndpoint.posts.length, 1);
        const body = tokenEndpoint.posts[0]!.body as Record<string, unknown>;
        assert.equal(body.grant_type, 'refresh_token');
        assert.equal(body.client_id, CODEX_CLIENT_ID);
        assert.equal(body.refresh_token, oldLogin.refreshToken);
        assert.equal(body.refresh_reason, 'proactive_expiry');
        const oldUses = backend.requests.filter((x) => x.bearer === oldLogin.accessToken);
        assert.equal(oldUses.length, 0, 'the expired token is never sent');
        assert.equal(
          backend.requests.filter((x) => x.method === 'POST' && x.path === '/backend-api/codex/responses').at(-1)?.bearer,
          newLogin.accessToken,
        );
      } finally {
        await tokenEndpoint.close();
      }
    });

    for (const code of ['refresh_token_reused', 'refresh_token_invalidated'] as const) {
      test(`a 401 ${code} from the token endpoint fails the run, once, and leaves auth.json alone`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
        backend.requests.length = 0;
        const oldLogin = makeChatgptLogin({ tag: `old-${code}` });
        backend.setCurrentAccessToken(makeChatgptLogin({ tag: 'someone-elses' }).accessToken);
        const tokenEndpoint = await new FakeTokenEndpoint(() => ({
          status: 401,
          body: { error: { message: 'refresh failed (fake)', type: 'invalid_request_error', code } },
        })).start();
        try {
          const codexHome = home();
          writeAuthJson(codexHome, oldLogin.doc);
          const before = fs.readFileSync(path.join(codexHome, 'auth.json'));
          const r = await runCodex(backend.execArgs('say hi'), {
            codexHome,
            env: { ...backend.codexEnv(), CODEX_REFRESH_TOKEN_URL_OVERRIDE: tokenEndpoint.url },
            timeoutMs: CODEX_TIMEOUT_MS,
          });
          const errLines = (r.stdout + r.stderr).split('\n').filter((l) => /^ERROR: /.test(l));
          t.diagnostic(`codex exec (token endpoint 401 ${code}): ${r.durationMs} ms, exit ${r.code}; ${errLines.join(' / ')}`);
          assert.equal(r.timedOut, false, summary(r));
          assert.notEqual(r.code, 0, summary(r));
          assert.equal(tokenEndpoint.posts.length, 1, 'a permanent failure is not retried');
          assert.deepEqual(fs.readFileSync(path.join(codexHome, 'auth.json')), before, 'auth.json untouched');
          assert.ok(
            !backend.requests.some((x) => x.method === 'POST' && x.path === '/backend-api/codex/responses' && x.status === 200),
            'no model call succeeded',
          );
          if (code === 'refresh_token_reused') assert.match(r.stderr, /refresh token was already used/, summary(r));
        } finally {
          await tokenEndpoint.close();
        }
      });
    }
  });
});
