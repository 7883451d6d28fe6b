/**
 * The fake issuer speaks the real client's protocol: the real codex CLI (0.169.0) runs its
 * device login against it, and its browser authorize request (which 0.169.0 always sends
 * to auth.openai.com) is replayed against it. Then a login the broker performed is checked
 * against what codex writes, and `codex login status` accepts what a workspace receives.
 */
import { strict as assert } from 'node:assert';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, test } from 'node:test';
import { authorizeUrl } from '../src/login/browser.js';
import { createPkce, createState } from '../src/login/pkce.js';
import { ADMIN_TOKEN } from './helpers/app.js';
import { CODEX_CLIENT_ID, codexBin, readAuthJson, runCodex, writeAuthJson } from './helpers/codex.js';
import { FakeIssuer, type FakeIssuerOptions } from './helpers/fake-issuer.js';
import { useSuite } from './helpers/suite.js';
import { tempDirs } from './helpers/tmp.js';
import { waitFor } from './helpers/wait.js';

const suite = useSuite();
const tmp = tempDirs('cab-login-codex-');
const issuers: FakeIssuer[] = [];
after(async () => {
  for (const f of issuers) await f.close();
});
async function issuer(o: FakeIssuerOptions = {}) {
  const f = await FakeIssuer.start({ accountId: 'acct-codex', planType: 'plus', ...o });
  issuers.push(f);
  return f;
}

let codexFile: Record<string, unknown> | undefined;

test('the real codex CLI completes its device login against the fake issuer and writes auth.json', { timeout: 120_000 }, async (t) => {
  const fake = await issuer({ autoApproveAfterPolls: 1 });
  const home = tmp();
  const r = await runCodex(['login', '--device-auth', '--experimental_issuer', fake.url], { codexHome: home, timeoutMs: 90_000 });
  t.diagnostic(`codex device login against the fake took ${r.durationMs} ms`);
  assert.equal(r.code, 0, `${r.stdout}\n${r.stderr}`);
  assert.match(r.stdout + r.stderr, /Successfully logged in/);
  assert.deepEqual(
    fake.requests.map((q) => `${q.method} ${q.path} ${q.contentType}`),
    [
      'POST /api/accounts/deviceauth/usercode application/json',
      'POST /api/accounts/deviceauth/token application/json',
      'POST /oauth/token application/x-www-form-urlencoded',
    ],
  );
  assert.equal(fake.requests[2]?.body?.['redirect_uri'], `${fake.url}/deviceauth/callback`);
  codexFile = readAuthJson(home);
  assert.deepEqual(Object.keys(codexFile), ['auth_mode', 'OPENAI_API_KEY', 'tokens', 'last_refresh']);
  assert.equal(codexFile['auth_mode'], 'chatgpt');
  assert.equal(codexFile['OPENAI_API_KEY'], null);
  // 0.169.0 also writes tokens.oauth_provenance {issuer, client_id} and tokens.login_owner_id
  // (base64url of 32 random bytes), which FACTS.md does not list; the broker writes neither.
  const tokenKeys = Object.keys(codexFile['tokens'] as object);
  for (const k of ['id_token', 'access_token', 'refresh_token', 'account_id']) assert.ok(tokenKeys.includes(k), `codex wrote no tokens.${k}`);
  assert.equal((codexFile['tokens'] as Record<string, string>)['account_id'], 'acct-codex');
});

test("a broker login stores codex's shape, and codex login status accepts the file a workspace receives", { timeout: 120_000 }, async () => {
  const fake = await issuer({ autoApproveAfterPolls: 1 });
  const upstream = await suite.upstream();
  const t = await suite.app({ databaseUrl: await suite.pg.newDatabase(), upstreamUrl: upstream.url, config: { OAUTH_ISSUER: fake.url }, login: { pollIntervalMs: 50 } });
  const auth = { authorization: `Bearer ${ADMIN_TOKEN}` };
  const started = (await t.app.inject({ method: 'POST', url: '/admin/credentials/default/login', headers: auth, payload: { method: 'device' } })).json() as { id: string };
  await waitFor('the broker login to succeed', async () => ((await t.app.inject({ method: 'GET', url: `/admin/logins/${started.id}`, headers: auth })).json() as { state: string }).state === 'succeeded');
  const row = await t.core.store.read('CODEX_AUTH_JSON');
  const storedDoc = JSON.parse(t.core.store.decrypt(row!)) as Record<string, unknown>;
  if (codexFile) {
    assert.deepEqual(Object.keys(storedDoc), Object.keys(codexFile));
    const codexTokenKeys = Object.keys(codexFile['tokens'] as object);
    assert.deepEqual(Object.keys(storedDoc['tokens'] as object), ['id_token', 'access_token', 'refresh_token', 'account_id']);
    assert.ok(Object.keys(storedDoc['tokens'] as object).every((k) => codexTokenKeys.includes(k)));
  }
  const client = (await t.app.inject({ method: 'POST', url: '/admin/clients', headers: auth, payload: { name: 'ws' } })).json() as { token: string };
  const served = await t.app.inject({ method: 'GET', url: '/codex-auth', headers: { authorization: `Bearer ${client.token}` } });
  assert.equal(served.statusCode, 200);
  const home = tmp();
  writeAuthJson(home, served.json());
  const r = await runCodex(['login', 'status'], { codexHome: home, timeoutMs: 60_000 });
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout + r.stderr, /Logged in using ChatGPT/);
});

test("codex's browser authorize request, replayed against the fake issuer, is accepted; the broker's carries the same parameters", { timeout: 120_000 }, async () => {
  const fake = await issuer();
  const home = tmp();
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'codex-home-'));
  const env: Record<string, string> = { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: scratch, CODEX_HOME: home, NO_COLOR: '1', BROWSER: 'true', DISPLAY: '' };
  const child = spawn(codexBin(), ['login'], { env, cwd: scratch, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (out += d));
  const exited = new Promise<void>((resolve) => child.on('close', () => resolve()));
  const URL_RE = /https:\/\/auth\.openai\.com\/oauth\/authorize\?\S+/;
  try {
    await waitFor('codex to print its authorize URL', () => URL_RE.test(out), 60_000, () => out);
  } finally {
    try {
      process.kill(-(child.pid ?? 0), 'SIGKILL');
    } catch {
      child.kill('SIGKILL');
    }
    await exited;
    fs.rmSync(scratch, { recursive: true, force: true });
  }
  // Cut terminal styling (ESC[…m) that may trail the URL.
  const printed = new URL(URL_RE.exec(out)![0].split(String.fromCharCode(27))[0]!);
  const replay = new URL(`${printed.pathname}${printed.search}`, fake.url);
  const res = await fetch(replay, { redirect: 'manual' });
  assert.equal(res.status, 302, await res.text());
  const landed = new URL(String(res.headers.get('location')));
  assert.equal(landed.searchParams.get('state'), printed.searchParams.get('state'));
  assert.ok(landed.searchParams.get('code'));

  const ours = new URL(authorizeUrl({ issuer: fake.url, clientId: CODEX_CLIENT_ID }, createPkce().challenge, createState()));
  assert.deepEqual([...ours.searchParams.keys()].sort(), [...printed.searchParams.keys()].sort());
  for (const k of ['response_type', 'client_id', 'scope', 'code_challenge_method', 'id_token_add_organizations', 'codex_cli_simplified_flow', 'originator']) {
    assert.equal(ours.searchParams.get(k), printed.searchParams.get(k), k);
  }
  // Same path and port; codex 0.169.0 names 127.0.0.1 where its source reads localhost (the issuer takes both).
  assert.match(String(printed.searchParams.get('redirect_uri')), /^http:\/\/(localhost|127\.0\.0\.1):1455\/auth\/callback$/);
  assert.equal(printed.searchParams.get('code_challenge')?.length, ours.searchParams.get('code_challenge')?.length);
  assert.equal(printed.searchParams.get('state')?.length, ours.searchParams.get('state')?.length);
});
