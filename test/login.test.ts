import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { authorizeUrl, BROWSER_REDIRECT_URI, codeFromCallback, SCOPES } from '../src/login/browser.js';
import { deviceRedirectUri, parseInterval, requestDeviceCode, verificationUri, waitForDeviceApproval } from '../src/login/device.js';
import { LoginError } from '../src/login/errors.js';
import { exchangeCode, loginDocument } from '../src/login/exchange.js';
import { createPkce, createState } from '../src/login/pkce.js';
import { CODEX_CLIENT_ID } from './helpers/codex.js';
import { FakeIssuer } from './helpers/fake-issuer.js';

const fakes: FakeIssuer[] = [];
async function issuer(o: Parameters<typeof FakeIssuer.start>[0] = {}) {
  const f = await FakeIssuer.start(o);
  fakes.push(f);
  return { fake: f, opts: { issuer: f.url, clientId: CODEX_CLIENT_ID, timeoutMs: 5_000 } };
}
after(async () => {
  for (const f of fakes) await f.close();
});

async function rejectsWith(p: Promise<unknown>, reason: string, message?: RegExp): Promise<LoginError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof LoginError, `expected a LoginError, got ${String(err)}`);
    assert.equal(err.reason, reason, err.message);
    if (message) assert.match(err.message, message);
    return err;
  }
  assert.fail(`expected a LoginError ${reason}`);
}

describe('PKCE and state', () => {
  test('the verifier is base64url of 64 random bytes and the challenge its S256', () => {
    const p = createPkce();
    assert.equal(Buffer.from(p.verifier, 'base64url').length, 64);
    assert.match(p.verifier, /^[A-Za-z0-9_-]{86}$/);
    assert.equal(p.challenge, createHash('sha256').update(p.verifier).digest('base64url'));
    assert.notEqual(createPkce().verifier, p.verifier);
  });
  test('the state is base64url of 32 random bytes', () => {
    const s = createState();
    assert.match(s, /^[A-Za-z0-9_-]{43}$/);
    assert.equal(Buffer.from(s, 'base64url').length, 32);
  });
});

describe('browser login', () => {
  test("the authorize URL carries exactly codex's parameters", () => {
    const url = new URL(authorizeUrl({ issuer: 'https://auth.example.com/', clientId: CODEX_CLIENT_ID }, 'CHALLENGE', 'STATE'));
    assert.equal(`${url.origin}${url.pathname}`, 'https://auth.example.com/oauth/authorize');
    assert.deepEqual(Object.fromEntries(url.searchParams), {
      response_type: 'code',
      client_id: CODEX_CLIENT_ID,
      redirect_uri: 'http://localhost:1455/auth/callback',
      scope: 'openid profile email offline_access api.connectors.read api.connectors.invoke',
      code_challenge: 'CHALLENGE',
      code_challenge_method: 'S256',
      id_token_add_organizations: 'true',
      codex_cli_simplified_flow: 'true',
      state: 'STATE',
      originator: 'codex_cli_rs',
    });
    assert.equal(url.searchParams.get('scope'), SCOPES);
  });

  test('a callback with the right state gives its code; a bare query string works too', () => {
    assert.equal(codeFromCallback(`${BROWSER_REDIRECT_URI}?code=the-code&scope=x&state=S1`, 'S1'), 'the-code');
    assert.equal(codeFromCallback('  code=c2&state=S1\n', 'S1'), 'c2');
  });

  test('a wrong or missing state, an error callback and a missing code are refused', () => {
    assert.throws(() => codeFromCallback(`${BROWSER_REDIRECT_URI}?code=c&state=other`, 'S1'), (e: LoginError) => e.reason === 'state_mismatch');
    assert.throws(() => codeFromCallback(`${BROWSER_REDIRECT_URI}?code=c`, 'S1'), (e: LoginError) => e.reason === 'state_mismatch');
    assert.throws(() => codeFromCallback(`${BROWSER_REDIRECT_URI}?state=S1`, 'S1'), (e: LoginError) => e.reason === 'bad_callback');
    assert.throws(
      () => codeFromCallback(`${BROWSER_REDIRECT_URI}?error=access_denied&error_description=The%20user%20said%20no&state=S1`, 'S1'),
      (e: LoginError) => e.reason === 'authorization_denied' && /access_denied \(The user said no\)/.test(e.message),
    );
  });
});

describe('device login', () => {
  test('the interval arrives as a string of seconds; junk falls back to 5 s; it is kept within 1-60 s', () => {
    assert.equal(parseInterval('5'), 5000);
    assert.equal(parseInterval(' 2 '), 2000);
    assert.equal(parseInterval(3), 3000);
    assert.equal(parseInterval('soon'), 5000);
    assert.equal(parseInterval(undefined), 5000);
    assert.equal(parseInterval('0'), 1000);
    assert.equal(parseInterval('3600'), 60_000);
  });

  test('the verification URL and the exchange redirect are on the issuer', () => {
    assert.equal(verificationUri({ issuer: 'https://auth.openai.com/' }), 'https://auth.openai.com/codex/device');
    assert.equal(deviceRedirectUri({ issuer: 'https://auth.openai.com' }), 'https://auth.openai.com/deviceauth/callback');
  });

  test('a 404 from the usercode endpoint says device login is off, where to allow it, and to use --browser', async () => {
    const { opts } = await issuer({ deviceDisabled: true });
    await rejectsWith(requestDeviceCode(opts), 'device_login_unavailable', /security settings.*--browser/s);
  });

  test('polls at the interval until the code is entered, then the exchange gives tokens', async () => {
    const { fake, opts } = await issuer({ autoApproveAfterPolls: 3 });
    const code = await requestDeviceCode(opts);
    assert.equal(code.intervalMs, 1000);
    let clock = 0;
    const sleeps: number[] = [];
    const approved = await waitForDeviceApproval(opts, code, {
      deadline: 15 * 60_000,
      now: () => clock,
      sleep: async (ms) => {
        sleeps.push(ms);
        clock += ms;
      },
    });
    assert.deepEqual(sleeps, [1000, 1000, 1000]);
    assert.equal(fake.polls, 3);
    const tokens = await exchangeCode(opts, { code: approved.authorizationCode, redirectUri: deviceRedirectUri(opts), codeVerifier: approved.codeVerifier });
    assert.equal(tokens.access_token.split('.').length, 3);
  });

  test('gives up when the 15 minutes run out, without polling past the deadline', async () => {
    const { fake, opts } = await issuer();
    const code = await requestDeviceCode(opts);
    let clock = 0;
    await rejectsWith(
      waitForDeviceApproval(opts, code, {
        deadline: 5_500,
        now: () => clock,
        sleep: async (ms) => {
          clock += ms;
        },
      }),
      'expired',
      /15 minutes/,
    );
    assert.equal(fake.polls, 5);
  });

  test('keeps polling through a transient failure (issuer unreachable) and reports it', async () => {
    const { opts } = await issuer();
    const code = await requestDeviceCode(opts);
    const dead = { ...opts, issuer: 'http://127.0.0.1:1' };
    let clock = 0;
    const transient: string[] = [];
    await rejectsWith(
      waitForDeviceApproval(dead, code, { deadline: 2_500, now: () => clock, sleep: async (ms) => void (clock += ms), onTransient: (e) => transient.push(e.reason) }),
      'expired',
    );
    assert.deepEqual(transient, ['issuer_unreachable', 'issuer_unreachable']);
  });

  test('an abort while waiting cancels the login', async () => {
    const { opts } = await issuer();
    const code = await requestDeviceCode(opts);
    const ctl = new AbortController();
    const waiting = waitForDeviceApproval(opts, code, { deadline: Date.now() + 60_000, signal: ctl.signal });
    ctl.abort();
    await rejectsWith(waiting, 'cancelled');
  });
});

describe('the code exchange', () => {
  let fake: FakeIssuer;
  let opts: { issuer: string; clientId: string; timeoutMs: number };
  before(async () => {
    ({ fake, opts } = await issuer({ accountId: 'acct-xyz', planType: 'team' }));
  });

  test('a refused code fails with the status and code, never the body', async () => {
    fake.failNextExchange(400, { error: 'invalid_grant', error_description: 'secret-ish words here' });
    const err = await rejectsWith(exchangeCode(opts, { code: 'c', redirectUri: 'r', codeVerifier: 'v' }), 'exchange_failed', /400 invalid_grant/);
    assert.doesNotMatch(err.message, /secret-ish/);
  });

  test('the stored document is what codex writes after a login', async () => {
    const pkce = createPkce();
    const loc = await fetch(authorizeUrl(opts, pkce.challenge, 'st'), { redirect: 'manual' });
    const code = codeFromCallback(String(loc.headers.get('location')), 'st');
    const tokens = await exchangeCode(opts, { code, redirectUri: BROWSER_REDIRECT_URI, codeVerifier: pkce.verifier });
    const now = new Date('2030-01-02T03:04:05.000Z');
    assert.deepEqual(loginDocument(tokens, now), {
      auth_mode: 'chatgpt',
      OPENAI_API_KEY: null,
      tokens: { id_token: tokens.id_token, access_token: tokens.access_token, refresh_token: tokens.refresh_token, account_id: 'acct-xyz' },
      last_refresh: '2030-01-02T03:04:05.000Z',
    });
  });

  test('a wrong verifier is refused by the fake (it checks PKCE as the issuer does)', async () => {
    const pkce = createPkce();
    const loc = await fetch(authorizeUrl(opts, pkce.challenge, 'st'), { redirect: 'manual' });
    const code = codeFromCallback(String(loc.headers.get('location')), 'st');
    await rejectsWith(exchangeCode(opts, { code, redirectUri: BROWSER_REDIRECT_URI, codeVerifier: createPkce().verifier }), 'exchange_failed', /400 invalid_grant/);
  });
});
