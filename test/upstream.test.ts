import { strict as assert } from 'node:assert';
import { after, before, beforeEach, describe, test } from 'node:test';
import { decodeJwt } from 'jose';
import { UpstreamError } from '../src/errors.js';
import { classifyFailure, createUpstreamClient, parseRetryAfter, parseRotation, upstreamErrorCode } from '../src/upstream.js';
import type { RefreshFn } from '../src/upstream.js';
import { DEFAULT_CLIENT_ID, FakeUpstream } from './helpers/fake-upstream.js';
import type { Fault } from './helpers/fake-upstream.js';

const REUSED = {
  error: {
    message: 'Your refresh token has already been used to generate a new access token. Please try signing in again.',
    type: 'invalid_request_error',
    code: 'refresh_token_reused',
  },
};

function oauthError(code: string, message = 'x'): unknown {
  return { error: { message, type: 'invalid_request_error', param: null, code } };
}

async function expectUpstreamError(p: Promise<unknown>, kind: 'permanent' | 'transient'): Promise<UpstreamError> {
  let caught: unknown;
  try {
    await p;
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof UpstreamError, `expected an UpstreamError, got ${String(caught)}`);
  assert.equal(caught.kind, kind, `expected ${kind}, got ${caught.kind}: ${caught.message}`);
  assert.equal(caught.code, kind === 'permanent' ? 'UPSTREAM_PERMANENT' : 'UPSTREAM_TRANSIENT');
  return caught;
}

describe('upstream: createUpstreamClient against the fake upstream', () => {
  let fake: FakeUpstream;
  let refresh: RefreshFn;
  /** The refresh token of the current family, and every token the fake ever issued. */
  let rt: string;

  before(async () => {
    fake = await FakeUpstream.start();
    refresh = createUpstreamClient({ url: fake.url, clientId: DEFAULT_CLIENT_ID, timeoutMs: 5_000 });
  });

  after(async () => {
    await fake.close();
  });

  beforeEach(() => {
    const seeded = fake.seed() as { tokens: { refresh_token: string } };
    rt = seeded.tokens.refresh_token;
  });

  /** Asserts no token the fake ever issued (nor the one sent) appears in the error's message or code. */
  function assertNoTokenIn(err: UpstreamError, extra: string[] = []): void {
    const text = `${err.message} ${err.upstreamCode ?? ''} ${String(err.stack)}`;
    for (const token of [...fake.issuedTokens(), rt, ...extra]) {
      assert.ok(!text.includes(token), `error text leaks a token: ${err.message}`);
    }
  }

  async function failWith(fault: Fault, kind: 'permanent' | 'transient'): Promise<UpstreamError> {
    fake.fault(fault);
    const err = await expectUpstreamError(refresh(rt), kind);
    assertNoTokenIn(err);
    return err;
  }

  test('the POST carries exactly grant_type, client_id, refresh_token to the configured URL', async () => {
    const before = fake.requests.length;
    await refresh(rt);
    const recorded = fake.requests.slice(before);
    assert.equal(recorded.length, 1, 'exactly one request');
    const req = recorded[0]!;
    assert.equal(req.method, 'POST');
    assert.equal(req.path, '/oauth/token');
    assert.equal(new URL(fake.url).pathname, req.path);
    assert.deepEqual(Object.keys(req.body as object).sort(), ['client_id', 'grant_type', 'refresh_token']);
    assert.deepEqual(req.body, { grant_type: 'refresh_token', client_id: DEFAULT_CLIENT_ID, refresh_token: rt });
    assert.equal(String(req.headers['content-type']).split(';')[0], 'application/json');
    assert.equal(req.headers['accept'], 'application/json');
    assert.equal(JSON.parse(req.rawBody).refresh_token, rt);
  });

  test('the configured client id is the one sent', async () => {
    const other = createUpstreamClient({ url: fake.url, clientId: 'app_other', timeoutMs: 5_000 });
    const before = fake.requests.length;
    // The fake expects the default client id and refuses another with 400 invalid_client: transient.
    await expectUpstreamError(other(rt), 'transient');
    assert.equal((fake.requests[before]!.body as Record<string, unknown>)['client_id'], 'app_other');
  });

  test('a rotation returns the new access, refresh and id tokens', async () => {
    const answer = await refresh(rt);
    assert.notEqual(answer.refresh_token, rt);
    assert.equal(answer.refresh_token, fake.currentRefreshToken());
    assert.equal(answer.access_token, fake.lastAccessToken());
    assert.equal(typeof decodeJwt(answer.access_token).exp, 'number');
    assert.equal(typeof decodeJwt(answer.id_token!)['email'], 'string');
    assert.deepEqual(Object.keys(answer).sort(), ['access_token', 'id_token', 'refresh_token']);
  });

  test('presenting a used refresh token is permanent refresh_token_reused (real fake semantics)', async () => {
    await refresh(rt);
    const err = await expectUpstreamError(refresh(rt), 'permanent');
    assert.equal(err.status, 401);
    assert.equal(err.upstreamCode, 'refresh_token_reused');
    assertNoTokenIn(err);
  });

  test('an unknown refresh token is permanent refresh_token_invalidated and the message has no token', async () => {
    const bogus = 'rt_never_issued_by_the_fake_0123456789';
    const err = await expectUpstreamError(refresh(bogus), 'permanent');
    assert.equal(err.upstreamCode, 'refresh_token_invalidated');
    assertNoTokenIn(err, [bogus]);
  });

  describe('permanent failures', () => {
    test('401 refresh_token_reused (the real upstream answer)', async () => {
      const err = await failWith({ kind: 'status', status: 401, body: REUSED }, 'permanent');
      assert.equal(err.status, 401);
      assert.equal(err.upstreamCode, 'refresh_token_reused');
    });

    test('401 with refresh_token_expired', async () => {
      const err = await failWith({ kind: 'status', status: 401, body: oauthError('refresh_token_expired') }, 'permanent');
      assert.equal(err.upstreamCode, 'refresh_token_expired');
    });

    for (const code of ['refresh_token_expired', 'refresh_token_reused', 'refresh_token_invalidated', 'token_expired', 'account_deactivated']) {
      test(`400 with error code ${code}`, async () => {
        const err = await failWith({ kind: 'status', status: 400, body: oauthError(code) }, 'permanent');
        assert.equal(err.status, 400);
        assert.equal(err.upstreamCode, code);
      });
    }

    test('400 with the code as a string "error" or a top-level "code"', async () => {
      assert.equal((await failWith({ kind: 'status', status: 400, body: { error: 'refresh_token_reused' } }, 'permanent')).upstreamCode, 'refresh_token_reused');
      assert.equal((await failWith({ kind: 'status', status: 400, body: { code: 'token_expired' } }, 'permanent')).upstreamCode, 'token_expired');
    });

    for (const phrase of ['invalid_grant', 'refresh token already used', 'already been used', 'token has been revoked']) {
      test(`400 whose body names "${phrase}"`, async () => {
        await failWith({ kind: 'status', status: 400, body: { error: 'bad_request', error_description: `Sorry: ${phrase}.` } }, 'permanent');
        await failWith({ kind: 'status', status: 400, body: `plain text: ${phrase.toUpperCase()}` }, 'permanent');
      });
    }

    test('400 invalid_grant (the standard OAuth answer)', async () => {
      const err = await failWith({ kind: 'status', status: 400, body: { error: 'invalid_grant', error_description: 'Invalid refresh token' } }, 'permanent');
      assert.equal(err.upstreamCode, 'invalid_grant');
    });

    test('403', async () => {
      const err = await failWith({ kind: 'status', status: 403, body: { error: 'forbidden' } }, 'permanent');
      assert.equal(err.status, 403);
    });

    test('401 with any other body', async () => {
      await failWith({ kind: 'status', status: 401, body: 'nope' }, 'permanent');
    });
  });

  describe('transient failures', () => {
    for (const status of [500, 502, 503]) {
      test(`${status}`, async () => {
        const err = await failWith({ kind: 'status', status }, 'transient');
        assert.equal(err.status, status);
      });
    }

    test('5xx carrying a permanent-looking code is still transient (the server failed, not the grant)', async () => {
      await failWith({ kind: 'status', status: 503, body: oauthError('refresh_token_reused') }, 'transient');
    });

    test('429 with Retry-After: 7 gives retryAfterMs 7000', async () => {
      const err = await failWith({ kind: 'status', status: 429, body: { error: 'rate_limited' }, headers: { 'retry-after': '7' } }, 'transient');
      assert.equal(err.status, 429);
      assert.equal(err.retryAfterMs, 7000);
    });

    test('503 with an HTTP-date Retry-After gives the time until then', async () => {
      const when = new Date(Date.now() + 60_000);
      when.setMilliseconds(0);
      const err = await failWith({ kind: 'status', status: 503, headers: { 'retry-after': when.toUTCString() } }, 'transient');
      assert.ok(err.retryAfterMs !== undefined && err.retryAfterMs > 50_000 && err.retryAfterMs <= 60_000, String(err.retryAfterMs));
    });

    test('no Retry-After gives no retryAfterMs', async () => {
      assert.equal((await failWith({ kind: 'status', status: 500 }, 'transient')).retryAfterMs, undefined);
    });

    test('404', async () => {
      assert.equal((await failWith({ kind: 'status', status: 404, body: { error: 'not_found' } }, 'transient')).status, 404);
    });

    test('400 with another body', async () => {
      await failWith({ kind: 'status', status: 400, body: { error: 'invalid_request', error_description: 'missing parameter' } }, 'transient');
      await failWith({ kind: 'status', status: 400, body: 'Bad Request' }, 'transient');
    });

    test('a timeout (the upstream never answers) is transient and reported promptly', async () => {
      const quick = createUpstreamClient({ url: fake.url, clientId: DEFAULT_CLIENT_ID, timeoutMs: 300 });
      fake.fault({ kind: 'hang' });
      const started = Date.now();
      const err = await expectUpstreamError(quick(rt), 'transient');
      const took = Date.now() - started;
      assert.ok(took >= 250 && took < 3_000, `took ${took} ms`);
      assert.equal(err.status, undefined);
      assertNoTokenIn(err);
    });

    test('an unreachable upstream is transient', async () => {
      const dead = createUpstreamClient({ url: 'http://127.0.0.1:1/oauth/token', clientId: DEFAULT_CLIENT_ID, timeoutMs: 2_000 });
      const err = await expectUpstreamError(dead(rt), 'transient');
      assert.equal(err.status, undefined);
      assertNoTokenIn(err);
    });

    test('a malformed 200 body', async () => {
      assert.equal((await failWith({ kind: 'malformed' }, 'transient')).status, 200);
    });

    test('a 200 without access_token', async () => {
      await failWith({ kind: 'no-access-token' }, 'transient');
    });

    test('a 200 with a non-JWT access token', async () => {
      await failWith({ kind: 'non-jwt-access-token' }, 'transient');
    });

    test('a 200 carrying an error object', async () => {
      const err = await failWith({ kind: 'error-200' }, 'transient');
      assert.equal(err.upstreamCode, 'server_error');
    });

    test('an oversized body (> 1 MiB, streamed without content-length)', async () => {
      const err = await failWith({ kind: 'oversized' }, 'transient');
      assert.match(err.message, /over 1048576 bytes/);
    });

    test('an oversized error body is transient too, whatever its status', async () => {
      await failWith({ kind: 'status', status: 401, body: `${'x'.repeat(1024 * 1024 + 10)} refresh_token_reused` }, 'transient');
    });

    test('the client recovers after a fault: the next POST rotates', async () => {
      fake.fault({ kind: 'status', status: 502 });
      await expectUpstreamError(refresh(rt), 'transient');
      const answer = await refresh(rt);
      assert.equal(answer.refresh_token, fake.currentRefreshToken());
    });
  });

  describe('error messages never carry a token', () => {
    test('a 400 body echoing the refresh token does not leak it into the message or code', async () => {
      fake.fault({ kind: 'status', status: 400, body: { error: `This refresh token has been revoked: ${rt}` } });
      const err = await expectUpstreamError(refresh(rt), 'permanent');
      assertNoTokenIn(err);
    });

    test('a 500 body echoing the refresh token as its error code does not leak it', async () => {
      fake.fault({ kind: 'status', status: 500, body: { error: { code: rt } } });
      const err = await expectUpstreamError(refresh(rt), 'transient');
      assertNoTokenIn(err);
    });

    test('a 200 error object echoing the refresh token does not leak it', async () => {
      fake.fault({ kind: 'status', status: 200, body: { error: `unknown token ${rt}` } });
      const err = await expectUpstreamError(refresh(rt), 'transient');
      assertNoTokenIn(err);
    });
  });
});

describe('upstream: classifyFailure', () => {
  test('by code first: 401 and 400 with a permanent code are both permanent', () => {
    for (const status of [400, 401]) {
      const err = classifyFailure(status, JSON.stringify(REUSED), undefined);
      assert.equal(err.kind, 'permanent');
      assert.equal(err.upstreamCode, 'refresh_token_reused');
      assert.equal(err.status, status);
    }
  });

  test('any 4xx with a permanent code is permanent (e.g. 409 account_deactivated)', () => {
    assert.equal(classifyFailure(409, JSON.stringify(oauthError('account_deactivated')), undefined).kind, 'permanent');
  });

  test('then by status: 401 and 403 are permanent whatever the body', () => {
    for (const status of [401, 403]) {
      for (const text of ['', 'not json', '{}', JSON.stringify(oauthError('something_else'))]) {
        assert.equal(classifyFailure(status, text, undefined).kind, 'permanent', `${status} ${text}`);
      }
    }
  });

  test('400 is permanent only when the body names a revoked/used grant', () => {
    assert.equal(classifyFailure(400, '{"error":"invalid_grant"}', undefined).kind, 'permanent');
    assert.equal(classifyFailure(400, 'The refresh token already used', undefined).kind, 'permanent');
    assert.equal(classifyFailure(400, 'It has ALREADY BEEN USED', undefined).kind, 'permanent');
    assert.equal(classifyFailure(400, 'this token has been revoked', undefined).kind, 'permanent');
    assert.equal(classifyFailure(400, '{"error":"invalid_request"}', undefined).kind, 'transient');
    assert.equal(classifyFailure(400, '', undefined).kind, 'transient');
  });

  test('phrases only count on 400: a 404 or 429 naming invalid_grant in prose stays transient', () => {
    assert.equal(classifyFailure(404, 'route for invalid_grant docs not found', undefined).kind, 'transient');
    assert.equal(classifyFailure(429, 'slow down, token has been revoked? no', undefined).kind, 'transient');
  });

  test('5xx, 429, 404 and other statuses are transient', () => {
    for (const status of [500, 502, 503, 504, 429, 404, 408, 302, 0]) {
      assert.equal(classifyFailure(status, '{}', undefined).kind, 'transient', String(status));
    }
  });

  test('5xx with a permanent code is transient', () => {
    assert.equal(classifyFailure(500, JSON.stringify(REUSED), undefined).kind, 'transient');
  });

  test('retryAfterMs and status are carried through', () => {
    const err = classifyFailure(429, '{"error":"rate_limited"}', 7000);
    assert.equal(err.retryAfterMs, 7000);
    assert.equal(err.status, 429);
    assert.equal(err.upstreamCode, 'rate_limited');
  });

  test('the message never includes the body verbatim', () => {
    const body = JSON.stringify({ error: { code: 'refresh_token_reused', message: 'secret-ish detail rt_abcdef' } });
    const err = classifyFailure(401, body, undefined);
    assert.ok(!err.message.includes('rt_abcdef'), err.message);
    assert.ok(!err.message.includes('secret-ish'), err.message);
  });
});

describe('upstream: parseRotation', () => {
  const jwtish = 'aGVhZGVy.cGF5bG9hZA.c2ln';

  test('a 200 with an access token is a rotation; empty refresh/id tokens become undefined', () => {
    assert.deepEqual(parseRotation(JSON.stringify({ access_token: jwtish, refresh_token: '', id_token: 5 })), {
      access_token: jwtish,
      refresh_token: undefined,
      id_token: undefined,
    });
  });

  test('non-object JSON bodies are transient', () => {
    for (const text of ['[]', 'null', '"x"', '1']) {
      assert.throws(() => parseRotation(text), (e: unknown) => e instanceof UpstreamError && e.kind === 'transient');
    }
  });

  test('an empty access token is transient', () => {
    assert.throws(() => parseRotation('{"access_token":""}'), (e: unknown) => e instanceof UpstreamError && e.kind === 'transient');
  });
});

describe('upstream: parseRetryAfter', () => {
  const NOW = Date.parse('2025-01-01T00:00:00Z');

  test('delay-seconds become milliseconds', () => {
    assert.equal(parseRetryAfter('7', NOW), 7000);
    assert.equal(parseRetryAfter('0', NOW), 0);
    assert.equal(parseRetryAfter(' 120 ', NOW), 120_000);
  });

  test('an HTTP-date becomes the milliseconds until then', () => {
    assert.equal(parseRetryAfter('Wed, 01 Jan 2025 00:00:30 GMT', NOW), 30_000);
  });

  test('an HTTP-date in the past is 0, never negative', () => {
    assert.equal(parseRetryAfter('Tue, 31 Dec 2024 23:59:00 GMT', NOW), 0);
  });

  test('the first of several header values is used', () => {
    assert.equal(parseRetryAfter(['5', '9'], NOW), 5000);
  });

  test('absent, empty or garbage values give undefined', () => {
    assert.equal(parseRetryAfter(undefined, NOW), undefined);
    assert.equal(parseRetryAfter('', NOW), undefined);
    assert.equal(parseRetryAfter([], NOW), undefined);
    assert.equal(parseRetryAfter('soon', NOW), undefined);
  });

  test('non-integer or negative delays are invalid, not a date (V8 would read "1.5" as January 5th)', () => {
    assert.equal(parseRetryAfter('1.5', NOW), undefined);
    assert.equal(parseRetryAfter('-1', NOW), undefined);
    assert.equal(parseRetryAfter('7.5', NOW), undefined);
  });
});

describe('upstream: upstreamErrorCode', () => {
  test('reads error.code (the OpenAI shape)', () => {
    assert.equal(upstreamErrorCode(REUSED), 'refresh_token_reused');
  });

  test('reads a string error (the OAuth shape)', () => {
    assert.equal(upstreamErrorCode({ error: 'invalid_grant', error_description: 'x' }), 'invalid_grant');
  });

  test('reads a top-level code', () => {
    assert.equal(upstreamErrorCode({ code: 'token_expired' }), 'token_expired');
  });

  test('error.code wins over a top-level code', () => {
    assert.equal(upstreamErrorCode({ error: { code: 'a' }, code: 'b' }), 'a');
  });

  test('an error object without a string code falls back to a top-level code', () => {
    assert.equal(upstreamErrorCode({ error: { code: null, message: 'x' }, code: 'c' }), 'c');
    assert.equal(upstreamErrorCode({ error: { code: null } }), undefined);
  });

  test('a "code" that is prose or too long to be an identifier is not repeated (it may echo a token)', () => {
    assert.equal(upstreamErrorCode({ error: 'Refresh token rt_abc has been revoked' }), undefined);
    assert.equal(upstreamErrorCode({ error: { code: 'x'.repeat(65) } }), undefined);
    assert.equal(upstreamErrorCode({ error: { code: 'a.b.c'.repeat(40) } }), undefined);
    assert.equal(upstreamErrorCode({ error: '' }), undefined);
  });

  test('the classification of such a body still uses its text', () => {
    const err = classifyFailure(400, JSON.stringify({ error: 'Refresh token already used: rt_abc' }), undefined);
    assert.equal(err.kind, 'permanent');
    assert.equal(err.upstreamCode, undefined);
    assert.ok(!err.message.includes('rt_abc'), err.message);
  });

  test('anything else has no code', () => {
    for (const body of [undefined, null, 'str', 5, [], {}, { error: 5 }, { code: 7 }]) {
      assert.equal(upstreamErrorCode(body), undefined, JSON.stringify(body));
    }
  });
});
