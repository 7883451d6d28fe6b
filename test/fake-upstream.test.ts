import { strict as assert } from 'node:assert';
import * as fs from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { decodeJwt, jwtVerify } from 'jose';
import pg from 'pg';
import { request } from 'undici';
import { DEFAULT_CLIENT_ID, FakeUpstream } from './helpers/fake-upstream.js';
import { startTestPostgres } from './helpers/pg.js';
import { waitFor } from './helpers/wait.js';

interface PostResult {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
  json: unknown;
  ms: number;
}

async function post(
  url: string,
  body: Record<string, unknown> | string,
  opts: { form?: boolean; signal?: AbortSignal } = {},
): Promise<PostResult> {
  const started = Date.now();
  let payload: string;
  let contentType: string;
  if (typeof body === 'string') {
    payload = body;
    contentType = 'application/json';
  } else if (opts.form) {
    payload = new URLSearchParams(body as Record<string, string>).toString();
    contentType = 'application/x-www-form-urlencoded';
  } else {
    payload = JSON.stringify(body);
    contentType = 'application/json';
  }
  const res = await request(url, {
    method: 'POST',
    headers: { 'content-type': contentType },
    body: payload,
    signal: opts.signal,
  });
  const text = await res.body.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: res.statusCode, headers: res.headers, text, json, ms: Date.now() - started };
}

function refreshBody(refreshToken: string | undefined, clientId = DEFAULT_CLIENT_ID): Record<string, unknown> {
  return {
    grant_type: 'refresh_token',
    client_id: clientId,
    refresh_token: refreshToken,
    refresh_reason: 'test',
  };
}

interface TokenAnswer {
  access_token: string;
  id_token: string;
  refresh_token: string;
  token_type: string;
  expires_in: number;
  scope: string;
}

describe('FakeUpstream', () => {
  test('rotates a valid refresh token and issues JWTs with the chosen lifetime', async () => {
    let clock = Date.UTC(2030, 0, 1, 12, 0, 0);
    const up = await FakeUpstream.start({ now: () => clock, accessLifetimeSec: 3600 });
    try {
      const doc = up.seed({ accountId: 'acct-1', planType: 'plus', email: 'a@example.com' });
      const tokens = doc.tokens as Record<string, string>;
      assert.equal(doc.OPENAI_API_KEY, null);
      assert.equal(doc.last_refresh, '2030-01-01T12:00:00.000Z');
      assert.equal(tokens.account_id, 'acct-1');
      const seeded = decodeJwt(tokens.access_token!);
      assert.equal(seeded.iat, clock / 1000);
      assert.equal(seeded.exp! - seeded.iat!, 3600);
      assert.equal(up.currentRefreshToken(), tokens.refresh_token);

      clock += 60_000;
      up.setAccessLifetime(7200);
      const r = await post(up.url, refreshBody(tokens.refresh_token));
      assert.equal(r.status, 200);
      const a = r.json as TokenAnswer;
      assert.equal(a.token_type, 'Bearer');
      assert.equal(a.expires_in, 7200);
      assert.equal(a.scope, 'openid profile email offline_access');
      assert.notEqual(a.refresh_token, tokens.refresh_token);
      assert.match(a.refresh_token, /^rt_[A-Za-z0-9_-]{43}$/);

      const access = decodeJwt(a.access_token);
      assert.equal(access.iat, clock / 1000);
      assert.equal(access.exp! - access.iat!, 7200);
      assert.deepEqual(access['https://api.openai.com/auth'], { chatgpt_account_id: 'acct-1' });
      assert.equal(typeof access.sub, 'string');

      const id = decodeJwt(a.id_token);
      assert.equal(id.email, 'a@example.com');
      const auth = id['https://api.openai.com/auth'] as Record<string, unknown>;
      assert.equal(auth.chatgpt_account_id, 'acct-1');
      assert.equal(auth.chatgpt_plan_type, 'plus');
      assert.equal(auth.chatgpt_user_id, access.sub);

      assert.equal(up.rotations, 1);
      assert.equal(up.currentRefreshToken('acct-1'), a.refresh_token);
      assert.equal(up.lastAccessToken(), a.access_token);
      const issued = up.issuedTokens();
      for (const t of [tokens.access_token, tokens.refresh_token, tokens.id_token, a.access_token, a.refresh_token, a.id_token]) {
        assert.ok(issued.includes(t!), 'issuedTokens() lists every issued token');
      }
      // A second rotation with the new token works too; every access token is unique.
      const r2 = await post(up.url, refreshBody(a.refresh_token));
      assert.equal(r2.status, 200);
      assert.notEqual((r2.json as TokenAnswer).access_token, a.access_token);
      assert.equal(up.rotations, 2);
    } finally {
      await up.close();
    }
  });

  test('seed honours iatSec/expSec, flat shape and extra fields', async () => {
    const up = await FakeUpstream.start();
    try {
      const doc = up.seed({ iatSec: 1_000, expSec: 2_000, flat: true, extra: { note: 'x' } });
      assert.deepEqual(Object.keys(doc).sort(), ['access_token', 'account_id', 'id_token', 'note', 'refresh_token']);
      const access = decodeJwt(doc.access_token as string);
      assert.equal(access.iat, 1_000);
      assert.equal(access.exp, 2_000);
      const nested = up.seed({ extra: { OPENAI_API_KEY: 'sk-x' } });
      assert.equal(nested.OPENAI_API_KEY, 'sk-x');
      assert.equal(decodeJwt((nested.tokens as Record<string, string>).id_token!).email, 'fleet@example.com');
      assert.equal(
        (decodeJwt((nested.tokens as Record<string, string>).id_token!)['https://api.openai.com/auth'] as Record<string, unknown>)
          .chatgpt_plan_type,
        'pro',
      );
      // Two families are independent; currentRefreshToken() without argument is the latest.
      assert.equal(up.currentRefreshToken(), (nested.tokens as Record<string, string>).refresh_token);
      assert.equal(up.currentRefreshToken(doc.account_id as string), doc.refresh_token);
    } finally {
      await up.close();
    }
  });

  test('answers a reused refresh token with 401 refresh_token_reused and invalidates the family', async () => {
    const up = await FakeUpstream.start();
    try {
      const other = up.seed({ accountId: 'other' });
      const doc = up.seed({ accountId: 'victim' });
      const rt0 = (doc.tokens as Record<string, string>).refresh_token;
      const r1 = await post(up.url, refreshBody(rt0));
      assert.equal(r1.status, 200);
      const rt1 = (r1.json as TokenAnswer).refresh_token;

      const reuse = await post(up.url, refreshBody(rt0));
      assert.equal(reuse.status, 401);
      assert.deepEqual(reuse.json, {
        error: {
          message:
            'Your refresh token has already been used to generate a new access token. Please try signing in again.',
          type: 'invalid_request_error',
          param: null,
          code: 'refresh_token_reused',
        },
      });
      assert.equal(up.reuseAnswers, 1);
      assert.equal(up.currentRefreshToken('victim'), undefined);

      // The family's current token is dead too.
      const dead = await post(up.url, refreshBody(rt1));
      assert.equal(dead.status, 401);
      assert.equal((dead.json as { error: { code: string } }).error.code, 'refresh_token_invalidated');

      // Reusing the old token again still says "reused".
      const again = await post(up.url, refreshBody(rt0));
      assert.equal((again.json as { error: { code: string } }).error.code, 'refresh_token_reused');
      assert.equal(up.reuseAnswers, 2);

      // Unknown token.
      const unknown = await post(up.url, refreshBody('rt_nope'));
      assert.equal(unknown.status, 401);
      assert.equal((unknown.json as { error: { code: string } }).error.code, 'refresh_token_invalidated');

      // Other family unaffected.
      const ok = await post(up.url, refreshBody((other.tokens as Record<string, string>).refresh_token));
      assert.equal(ok.status, 200);
      assert.equal(up.rotations, 2);
    } finally {
      await up.close();
    }
  });

  test('rejects a wrong client_id with 400', async () => {
    const up = await FakeUpstream.start();
    try {
      const doc = up.seed();
      const rt = (doc.tokens as Record<string, string>).refresh_token;
      const r = await post(up.url, refreshBody(rt, 'app_wrong'));
      assert.equal(r.status, 400);
      assert.deepEqual(r.json, { error: 'invalid_client' });
      // Malformed requests: invalid_request.
      for (const bad of [
        { grant_type: 'authorization_code', client_id: DEFAULT_CLIENT_ID, refresh_token: rt },
        { grant_type: 'refresh_token', client_id: DEFAULT_CLIENT_ID },
        { grant_type: 'refresh_token', refresh_token: rt },
      ]) {
        const b = await post(up.url, bad);
        assert.equal(b.status, 400);
        assert.deepEqual(b.json, { error: 'invalid_request' });
      }
      const notJson = await post(up.url, '{nope');
      assert.equal(notJson.status, 400);
      assert.deepEqual(notJson.json, { error: 'invalid_request' });
      assert.equal(up.rotations, 0);
      // The token was not consumed.
      assert.equal(up.currentRefreshToken(), rt);
    } finally {
      await up.close();
    }
  });

  test('accepts a form-encoded body', async () => {
    const up = await FakeUpstream.start();
    try {
      const doc = up.seed();
      const rt = (doc.tokens as Record<string, string>).refresh_token!;
      const r = await post(up.url, { grant_type: 'refresh_token', client_id: DEFAULT_CLIENT_ID, refresh_token: rt }, { form: true });
      assert.equal(r.status, 200);
      assert.equal(up.rotations, 1);
      const rec = up.requests.at(-1)!;
      assert.equal(rec.path, '/oauth/token');
      assert.equal(rec.headers['content-type'], 'application/x-www-form-urlencoded');
      assert.deepEqual(rec.body, { grant_type: 'refresh_token', client_id: DEFAULT_CLIENT_ID, refresh_token: rt });
      assert.match(rec.rawBody, /^grant_type=refresh_token&/);
    } finally {
      await up.close();
    }
  });

  test('revokes like RFC 7009: 200 {} for any token; a revoked refresh token then answers 401 refresh_token_invalidated', async () => {
    const up = await FakeUpstream.start();
    try {
      const doc = up.seed();
      const rt = (doc.tokens as Record<string, string>).refresh_token!;
      const revokeUrl = up.url.replace('/oauth/token', '/oauth/revoke');
      const unknown = await post(revokeUrl, { token: 'rt_nobody', token_type_hint: 'refresh_token', client_id: DEFAULT_CLIENT_ID });
      assert.equal(unknown.status, 200);
      assert.deepEqual(unknown.json, {});
      assert.equal(up.currentRefreshToken(), rt, 'an unknown token revokes nothing');
      assert.equal((await post(revokeUrl, { token: rt, client_id: 'app_wrong' })).status, 401);
      assert.equal((await post(revokeUrl, { client_id: DEFAULT_CLIENT_ID })).status, 400);
      const r = await post(revokeUrl, { token: rt, token_type_hint: 'refresh_token', client_id: DEFAULT_CLIENT_ID }, { form: true });
      assert.equal(r.status, 200);
      assert.equal(up.revocations, 2);
      const after = await post(up.url, refreshBody(rt));
      assert.equal(after.status, 401);
      assert.equal((after.json as { error: { code: string } }).error.code, 'refresh_token_invalidated');
      assert.equal(up.rotations, 0);
      assert.equal(up.tokenPosts, 1, 'revocations are not counted as refresh POSTs');
      up.revokeFault({ kind: 'status', status: 503 });
      assert.equal((await post(revokeUrl, { token: rt, client_id: DEFAULT_CLIENT_ID })).status, 503);
    } finally {
      await up.close();
    }
  });

  test('applies queued faults in order', async () => {
    const up = await FakeUpstream.start();
    try {
      up.seed();
      up.fault({ kind: 'status', status: 503 });
      up.fault({ kind: 'status', status: 429, body: { error: 'slow_down' }, headers: { 'Retry-After': '7' } });
      up.fault({ kind: 'malformed' });
      up.fault({ kind: 'delay', ms: 300 });

      const r503 = await post(up.url, refreshBody(up.currentRefreshToken()));
      assert.equal(r503.status, 503);
      const r429 = await post(up.url, refreshBody(up.currentRefreshToken()));
      assert.equal(r429.status, 429);
      assert.equal(r429.headers['retry-after'], '7');
      assert.deepEqual(r429.json, { error: 'slow_down' });
      const bad = await post(up.url, refreshBody(up.currentRefreshToken()));
      assert.equal(bad.status, 200);
      assert.equal(bad.json, undefined, 'malformed body is not JSON');
      assert.equal(up.rotations, 0);

      const before = up.currentRefreshToken();
      const delayed = await post(up.url, refreshBody(before));
      assert.equal(delayed.status, 200);
      assert.ok(delayed.ms >= 280, `delay honoured (${delayed.ms} ms)`);
      assert.equal(up.rotations, 1);
      assert.equal((delayed.json as TokenAnswer).refresh_token, up.currentRefreshToken());

      // Queue drained: normal behaviour again.
      const normal = await post(up.url, refreshBody(up.currentRefreshToken()));
      assert.equal(normal.status, 200);
      assert.equal(up.queuedFaults, 0, 'the delay was applied once, not again (no upper time bound asserted: the machine is noisy)');
      assert.equal(up.rotations, 2);

      // Raw string body.
      up.fault({ kind: 'status', status: 502, body: 'bad gateway' });
      const raw = await post(up.url, refreshBody(up.currentRefreshToken()));
      assert.equal(raw.status, 502);
      assert.equal(raw.text, 'bad gateway');
    } finally {
      await up.close();
    }
  });

  test('serves the remaining fault kinds', async () => {
    const up = await FakeUpstream.start();
    try {
      up.seed();
      const body = (): Record<string, unknown> => refreshBody(up.currentRefreshToken());

      up.fault({ kind: 'oversized' });
      const big = await post(up.url, body());
      assert.equal(big.status, 200);
      assert.ok(Buffer.byteLength(big.text) > 1.5 * 1024 * 1024);
      assert.equal(typeof (big.json as Record<string, unknown>).access_token, 'string');

      up.fault({ kind: 'no-access-token' });
      assert.deepEqual((await post(up.url, body())).json, { token_type: 'Bearer' });

      up.fault({ kind: 'non-jwt-access-token' });
      const nonJwt = await post(up.url, body());
      assert.equal(nonJwt.status, 200);
      assert.equal((nonJwt.json as TokenAnswer).access_token, 'not-a-jwt');

      up.fault({ kind: 'error-200' });
      const e200 = await post(up.url, body());
      assert.equal(e200.status, 200);
      assert.deepEqual(e200.json, { error: { code: 'server_error', message: 'x' } });
      assert.equal(up.rotations, 0);

      up.fault({ kind: 'hang' });
      await assert.rejects(post(up.url, body(), { signal: AbortSignal.timeout(200) }));
      assert.equal(up.rotations, 0);

      // Delay: the rotation happens after the delay even when the client gave up.
      const rt = up.currentRefreshToken();
      // The client gives up well before the delay ends, late enough that on a loaded machine
      // its request (on a new connection: the hang's abort closed the last one) has arrived.
      up.fault({ kind: 'delay', ms: 1_000 });
      await assert.rejects(post(up.url, refreshBody(rt), { signal: AbortSignal.timeout(300) }));
      await waitFor('the delayed rotation', () => up.rotations === 1, 5_000);
      assert.equal(up.rotations, 1);
      assert.notEqual(up.currentRefreshToken(), rt);

      // Tokens are well-formed HS256 JWS: jose parses them and only the signature check fails.
      const doc = up.seed();
      const access = (doc.tokens as Record<string, string>).access_token!;
      await assert.rejects(jwtVerify(access, new Uint8Array(32)), { code: 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED' });

      // A hanging request is still pending when close() is called: close must not wait for it.
      up.fault({ kind: 'hang' });
      const pending = post(up.url, body()).catch((e: unknown) => e);
      await new Promise((r) => setTimeout(r, 50));
      const t0 = Date.now();
      await up.close();
      assert.ok(Date.now() - t0 < 1000);
      assert.ok((await pending) instanceof Error);
    } finally {
      await up.close();
    }
  });

  test('counts every POST', async () => {
    const up = await FakeUpstream.start();
    try {
      up.seed();
      await post(up.url, refreshBody(up.currentRefreshToken()));
      await post(up.url, refreshBody(up.currentRefreshToken(), 'nope'));
      const other = await post(new URL('/elsewhere', up.url).toString(), {});
      assert.equal(other.status, 404);
      up.fault({ kind: 'status', status: 500 });
      await post(up.url, refreshBody(up.currentRefreshToken()));
      const get = await request(up.url);
      await get.body.dump();
      assert.equal(get.statusCode, 404);

      assert.equal(up.posts, 4);
      assert.equal(up.rotations, 1);
      assert.equal(up.requests.length, 5);
      assert.deepEqual(
        up.requests.map((r) => `${r.method} ${r.path}`),
        ['POST /oauth/token', 'POST /oauth/token', 'POST /elsewhere', 'POST /oauth/token', 'GET /oauth/token'],
      );
    } finally {
      await up.close();
    }
  });
});

describe('startTestPostgres', () => {
  let tp: Awaited<ReturnType<typeof startTestPostgres>>;

  before(async () => {
    const t0 = Date.now();
    tp = await startTestPostgres();
    console.log(`embedded postgres started in ${Date.now() - t0} ms on port ${tp.port}`);
  });
  after(async () => {
    await tp?.stop();
  });

  test('starts a real Postgres and hands out fresh databases', async () => {
    const url1 = await tp.newDatabase();
    const url2 = await tp.newDatabase();
    assert.notEqual(url1, url2);
    assert.match(url1, new RegExp(`^postgres://postgres:postgres@127\\.0\\.0\\.1:${tp.port}/t_\\d+_[0-9a-f]+$`));

    const c = new pg.Client({ connectionString: url1 });
    await c.connect();
    try {
      const one = await c.query<{ one: number }>('select 1 as one');
      assert.equal(one.rows[0]!.one, 1);
      const u = await c.query<{ id: string }>('select gen_random_uuid()::text as id');
      assert.match(u.rows[0]!.id, /^[0-9a-f-]{36}$/);
      await c.query('create table kept (v text)');
      await c.query(`insert into kept values ('survives restart')`);
    } finally {
      await c.end();
    }

    // The second database is independent.
    const c2 = new pg.Client({ connectionString: url2 });
    await c2.connect();
    try {
      const r = await c2.query(`select to_regclass('kept') as t`);
      assert.equal(r.rows[0].t, null);
    } finally {
      await c2.end();
    }
  });

  test('stopServer/startServer keeps data', async () => {
    const url = await tp.newDatabase();
    const c = new pg.Client({ connectionString: url });
    await c.connect();
    await c.query('create table kept (v text)');
    await c.query(`insert into kept values ('survives restart')`);
    await c.end();

    const t0 = Date.now();
    await tp.stopServer();
    const down = new pg.Client({ connectionString: url, connectionTimeoutMillis: 2000 });
    down.on('error', () => {});
    await assert.rejects(down.connect());
    await tp.startServer();
    console.log(`embedded postgres stop+start in ${Date.now() - t0} ms`);

    const c2 = new pg.Client({ connectionString: url });
    await c2.connect();
    try {
      const r = await c2.query<{ v: string }>('select v from kept');
      assert.deepEqual(r.rows, [{ v: 'survives restart' }]);
    } finally {
      await c2.end();
    }
  });

  test('stop() removes the data and is idempotent', async () => {
    const other = await startTestPostgres();
    assert.ok(fs.existsSync(other.dir));
    await other.stop();
    await other.stop();
    assert.ok(!fs.existsSync(other.dir));
    const c = new pg.Client({ connectionString: other.baseUrl, connectionTimeoutMillis: 2000 });
    c.on('error', () => {});
    await assert.rejects(c.connect());
    await assert.rejects(other.startServer());
  });
});
