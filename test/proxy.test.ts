/**
 * Outbound proxies and network errors (issue "Operator experience"; DESIGN.md "Hardening"):
 * HTTPS_PROXY / HTTP_PROXY / NO_PROXY are honoured for every upstream call, and a network
 * error names the host and the cause.
 */
import { strict as assert } from 'node:assert';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, describe, test } from 'node:test';
import { UpstreamError } from '../src/errors.js';
import { createBackendTokenCheck } from '../src/token-check.js';
import { createUpstreamClient } from '../src/upstream.js';
import { ADMIN_TOKEN } from './helpers/app.js';
import { ConnectProxy } from './helpers/connect-proxy.js';
import { FakeIssuer } from './helpers/fake-issuer.js';
import { DEFAULT_CLIENT_ID, REVOKE_PATH } from './helpers/fake-upstream.js';
import { FakeUsageBackend } from './helpers/fake-usage.js';
import { useSuite } from './helpers/suite.js';

const suite = useSuite();
const closers: (() => Promise<void>)[] = [];
after(async () => {
  for (const c of closers) await c();
});

const PROXY_VARS = ['HTTP_PROXY', 'HTTPS_PROXY', 'NO_PROXY', 'http_proxy', 'https_proxy', 'no_proxy'] as const;

/** Run fn with exactly these proxy variables set (the broker reads them when its core is built). */
async function withProxyEnv<T>(env: Partial<Record<(typeof PROXY_VARS)[number], string>>, fn: () => Promise<T>): Promise<T> {
  const saved = Object.fromEntries(PROXY_VARS.map((k) => [k, process.env[k]]));
  for (const k of PROXY_VARS) delete process.env[k];
  Object.assign(process.env, env);
  try {
    return await fn();
  } finally {
    for (const k of PROXY_VARS) {
      if (saved[k] === undefined) delete process.env[k];
      else process.env[k] = saved[k];
    }
  }
}

describe('outbound proxies', () => {
  test('HTTPS_PROXY and HTTP_PROXY carry the refresh POST and the backend check through the proxy', async () => {
    const proxy = await ConnectProxy.start();
    closers.push(() => proxy.close());
    const upstream = await suite.upstream();
    const backend = await FakeUsageBackend.start();
    closers.push(() => backend.close());
    const databaseUrl = await suite.pg.newDatabase();
    const t = await withProxyEnv({ HTTPS_PROXY: proxy.url, HTTP_PROXY: proxy.url }, () =>
      suite.app({ databaseUrl, upstreamUrl: upstream.url, config: { CHATGPT_BASE_URL: backend.url } }),
    );
    const put = await t.app.inject({ method: 'PUT', url: '/admin/credential', headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, payload: upstream.seed() });
    assert.equal(put.statusCode, 200, put.body);
    const refreshed = await t.app.inject({ method: 'POST', url: '/admin/refresh', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
    assert.equal(refreshed.statusCode, 200, refreshed.body);
    assert.equal(upstream.posts, 1);
    assert.equal(upstream.rotations, 1);
    const upstreamHost = new URL(upstream.url).host;
    assert.ok(proxy.targets.includes(upstreamHost), `the refresh POST went through the proxy: ${proxy.targets.join(', ')}`);

    const verdict = await t.core.tokenVerifier.verify(t.core.refresher.current()!.parsed.tokens.access_token!, undefined);
    assert.equal(verdict.verdict, 'accepted');
    assert.ok(proxy.targets.includes(new URL(backend.url).host), 'the backend check went through the proxy');
  });

  test('HTTPS_PROXY and HTTP_PROXY carry the upstream revocation and the logins the broker performs through the proxy', async () => {
    const proxy = await ConnectProxy.start();
    closers.push(() => proxy.close());
    const upstream = await suite.upstream();
    const issuer = await FakeIssuer.start({ mint: () => (upstream.seed() as { tokens: { id_token: string; access_token: string; refresh_token: string } }).tokens });
    closers.push(() => issuer.close());
    const databaseUrl = await suite.pg.newDatabase();
    const t = await withProxyEnv({ HTTPS_PROXY: proxy.url, HTTP_PROXY: proxy.url }, () =>
      suite.app({ databaseUrl, upstreamUrl: upstream.url, start: false, config: { OAUTH_ISSUER: issuer.url } }),
    );
    const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
    const put = await t.app.inject({ method: 'PUT', url: '/admin/credential', headers: admin, payload: upstream.seed() });
    assert.equal(put.statusCode, 200, put.body);
    const revoked = await t.app.inject({ method: 'POST', url: '/admin/credentials/default/revoke', headers: admin });
    assert.equal(revoked.statusCode, 200, revoked.body);
    assert.equal(upstream.revocations, 1);
    assert.deepEqual(upstream.requests.map((r) => r.path), [REVOKE_PATH], 'the only call to the upstream host was the revocation');
    assert.ok(proxy.targets.includes(new URL(upstream.url).host), `the revocation went through the proxy: ${proxy.targets.join(', ') || 'nothing did'}`);

    const login = await t.app.inject({ method: 'POST', url: '/admin/credentials/default/login', headers: admin, payload: { method: 'device' } });
    assert.equal(login.statusCode, 202, login.body);
    assert.ok(proxy.targets.includes(new URL(issuer.url).host), `the device-code request went through the proxy: ${proxy.targets.join(', ')}`);
  });

  test('NO_PROXY sends a listed host direct', async () => {
    const proxy = await ConnectProxy.start();
    closers.push(() => proxy.close());
    const upstream = await suite.upstream();
    const databaseUrl = await suite.pg.newDatabase();
    // undici re-reads NO_PROXY on every request, as a process whose environment is fixed would see it.
    await withProxyEnv({ HTTPS_PROXY: proxy.url, HTTP_PROXY: proxy.url, NO_PROXY: '127.0.0.1' }, async () => {
      const t = await suite.app({ databaseUrl, upstreamUrl: upstream.url });
      const put = await t.app.inject({ method: 'PUT', url: '/admin/credential', headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, payload: upstream.seed() });
      assert.equal(put.statusCode, 200, put.body);
      await t.app.inject({ method: 'POST', url: '/admin/refresh', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
    });
    assert.equal(upstream.rotations, 1);
    assert.deepEqual(proxy.targets, [], 'nothing went through the proxy');
  });
});

async function transientMessage(url: string, timeoutMs = 2_000): Promise<string> {
  const refresh = createUpstreamClient({ url, clientId: DEFAULT_CLIENT_ID, timeoutMs });
  try {
    await refresh('rt-secret-value-never-shown');
  } catch (err) {
    assert.ok(err instanceof UpstreamError, String(err));
    assert.equal(err.kind, 'transient');
    assert.ok(!err.message.includes('rt-secret-value-never-shown'));
    return err.message;
  }
  throw new Error('expected a failure');
}

describe('network errors name the host and the cause', () => {
  test('ECONNREFUSED names host:port and the cause', async () => {
    const msg = await transientMessage('http://127.0.0.1:1/oauth/token');
    assert.match(msg, /127\.0\.0\.1:1: ECONNREFUSED \(nothing accepted the connection/, msg);
  });

  test('a TLS failure names the host and says TLS', async () => {
    const plain = createServer((_req, res) => res.end('plain http'));
    await new Promise<void>((resolve) => plain.listen(0, '127.0.0.1', resolve));
    closers.push(() => new Promise((resolve) => plain.close(() => resolve())));
    const port = (plain.address() as AddressInfo).port;
    const msg = await transientMessage(`https://127.0.0.1:${port}/oauth/token`);
    assert.match(msg, new RegExp(`127\\.0\\.0\\.1:${port}: \\S+ \\(TLS failed`), msg);
  });

  test('a timeout names the host and says timeout', async () => {
    const silent = createServer(() => undefined);
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    closers.push(() => {
      silent.closeAllConnections();
      return new Promise((resolve) => silent.close(() => resolve()));
    });
    const port = (silent.address() as AddressInfo).port;
    const msg = await transientMessage(`http://127.0.0.1:${port}/oauth/token`, 300);
    assert.match(msg, new RegExp(`127\\.0\\.0\\.1:${port}: timeout`), msg);
  });

  test('an unresolvable host names the host and the DNS failure', async () => {
    const msg = await transientMessage('https://no-such-host.invalid/oauth/token');
    assert.match(msg, /no-such-host\.invalid: (ENOTFOUND|EAI_AGAIN) \(DNS lookup failed/, msg);
  });

  test('the backend check names the host and the cause too', async () => {
    const check = createBackendTokenCheck({ baseUrl: 'http://127.0.0.1:1/backend-api', timeoutMs: 2_000 });
    const r = await check('at-secret', undefined);
    assert.equal(r.verdict, 'unknown');
    assert.match(r.detail, /^127\.0\.0\.1:1: ECONNREFUSED/);
  });
});
