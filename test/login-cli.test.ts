/** `codex-auth-broker login` as an operator runs it: a real process, a real Postgres, the fake issuer. */
import { strict as assert } from 'node:assert';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import * as path from 'node:path';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { open } from '../src/lib/secret-crypto.js';
import { makeChatgptLogin } from './helpers/codex.js';
import { ConnectProxy } from './helpers/connect-proxy.js';
import { FakeIssuer, type FakeIssuerOptions } from './helpers/fake-issuer.js';
import { findLeaks } from './helpers/logs.js';
import { startTestPostgres, type TestPostgres } from './helpers/pg.js';
import { runProcess } from './helpers/process.js';
import { waitFor } from './helpers/wait.js';
import { cliArgs } from './helpers/cli.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const KEY = randomBytes(32);
const outputs: string[] = [];
const issuers: FakeIssuer[] = [];
let pgServer: TestPostgres;

before(async () => {
  pgServer = await startTestPostgres();
});
after(async () => {
  for (const f of issuers) await f.close();
  await pgServer.stop();
});

async function setup(o: FakeIssuerOptions = {}) {
  const fake = await FakeIssuer.start({ accountId: 'acct-cli', planType: 'team', ...o });
  issuers.push(fake);
  const databaseUrl = await pgServer.newDatabase();
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (/^(PORT|HOST|DATABASE_URL|DATA_DIR|SECRETS_ENCRYPTION_KEY|ADMIN_TOKEN|LOG_LEVEL|BROKER_ENV|MOLECULE_ENV|NODE_TEST_CONTEXT|OAUTH_.*|CODEX_AUTH_SECRET_KEY)$/.test(k)) continue;
    env[k] = v;
  }
  Object.assign(env, { DATABASE_URL: databaseUrl, SECRETS_ENCRYPTION_KEY: KEY.toString('base64'), OAUTH_ISSUER: fake.url });
  return { fake, databaseUrl, env };
}

async function run(args: string[], env: NodeJS.ProcessEnv) {
  const r = await runProcess(process.execPath, cliArgs(args), { cwd: ROOT, env, timeoutMs: 120_000 });
  outputs.push(r.stdout, r.stderr);
  return r;
}

/** A CLI process to talk to: its output so far, its standard input, signals, its exit. */
function start(args: string[], env: NodeJS.ProcessEnv) {
  const child = spawn(process.execPath, cliArgs(args), { cwd: ROOT, env, stdio: ['pipe', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const killer = setTimeout(() => child.kill('SIGKILL'), 120_000);
  const exited = new Promise<number | null>((resolve) =>
    child.on('close', (code) => {
      clearTimeout(killer);
      outputs.push(stdout, stderr);
      resolve(code);
    }),
  );
  return { child, out: () => stdout, err: () => stderr, exited };
}

async function sql<T extends pg.QueryResultRow>(url: string, text: string, params: unknown[] = []): Promise<T[]> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return (await c.query<T>(text, params)).rows;
  } finally {
    await c.end();
  }
}

async function storedDoc(url: string, key = 'CODEX_AUTH_JSON'): Promise<Record<string, unknown> | undefined> {
  const [row] = await sql<{ encrypted_value: Buffer; encryption_version: number }>(url, 'SELECT encrypted_value, encryption_version FROM global_secrets WHERE key = $1', [key]);
  return row ? (JSON.parse(open(row.encrypted_value, row.encryption_version, KEY).toString('utf8')) as Record<string, unknown>) : undefined;
}

const credentialRows = (url: string) => sql<{ name: string; secret_key: string; pool: string }>(url, 'SELECT name, secret_key, pool FROM broker_credentials ORDER BY name');

async function loginEvents(url: string): Promise<Array<{ outcome: string }>> {
  return sql<{ outcome: string }>(url, "SELECT outcome FROM broker_refresh_events WHERE reason = 'login'");
}

const AUTHORIZE_URL = /http:\/\/127\.0\.0\.1:\d+\/oauth\/authorize\?\S+/;

test('login prints the verification URL and the code, waits for it, stores the login and prints account and plan', async () => {
  const { fake, databaseUrl, env } = await setup({ autoApproveAfterPolls: 1 });
  const r = await run(['login', '--credential', 'default'], env);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(r.stdout.includes(`${fake.url}/codex/device`), r.stdout);
  assert.ok(r.stdout.includes(fake.userCodes()[0]!), r.stdout);
  assert.match(r.stdout, /expires in 15 minutes/);
  assert.match(r.stdout, /Logged in: account acct-cli, plan team/);
  const doc = await storedDoc(databaseUrl);
  assert.equal(doc?.['auth_mode'], 'chatgpt');
  assert.equal((doc?.['tokens'] as Record<string, string>)['account_id'], 'acct-cli');
  assert.deepEqual(await loginEvents(databaseUrl), [{ outcome: 'stored' }]);
});

test('login goes to the issuer through HTTPS_PROXY / HTTP_PROXY, like serve', async () => {
  const proxy = await ConnectProxy.start();
  try {
    const { fake, databaseUrl, env } = await setup({ autoApproveAfterPolls: 1 });
    const r = await run(['login', '--credential', 'default'], { ...env, HTTPS_PROXY: proxy.url, HTTP_PROXY: proxy.url, NO_PROXY: '' });
    assert.equal(r.code, 0, r.stderr);
    assert.ok(proxy.targets.includes(new URL(fake.url).host), `the issuer was reached through the proxy: ${proxy.targets.join(', ') || 'nothing was'}`);
    assert.deepEqual(await loginEvents(databaseUrl), [{ outcome: 'stored' }]);
  } finally {
    await proxy.close();
  }
});

test('login --credential team-a --pool batch stores the login as a named credential in that pool', async () => {
  const { fake, databaseUrl, env } = await setup({ autoApproveAfterPolls: 1 });
  const r = await run(['login', '--credential', 'team-a', '--pool', 'batch'], env);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(r.stdout.includes(fake.userCodes()[0]!), r.stdout);
  assert.match(r.stdout, /Logged in: account acct-cli, plan team\. Stored under CODEX_AUTH_JSON__TEAM_A/);
  assert.equal(((await storedDoc(databaseUrl, 'CODEX_AUTH_JSON__TEAM_A'))?.['tokens'] as Record<string, string>)['account_id'], 'acct-cli');
  assert.equal(await storedDoc(databaseUrl), undefined, 'default is untouched');
  assert.deepEqual(await credentialRows(databaseUrl), [{ name: 'team-a', secret_key: 'CODEX_AUTH_JSON__TEAM_A', pool: 'batch' }]);
});

test('login --browser --credential team-b stores into team-b, in pool default', async () => {
  const { databaseUrl, env } = await setup();
  const p = start(['login', '--browser', '--credential', 'team-b'], env);
  await waitFor('the authorize URL', () => AUTHORIZE_URL.test(p.out()) && /paste it here/.test(p.out()), 60_000, () => p.out() + p.err());
  const res = await fetch(AUTHORIZE_URL.exec(p.out())![0], { redirect: 'manual' });
  p.child.stdin.end(`${res.headers.get('location')}\n`);
  assert.equal(await p.exited, 0, p.err());
  assert.equal((await storedDoc(databaseUrl, 'CODEX_AUTH_JSON__TEAM_B'))?.['auth_mode'], 'chatgpt');
  assert.deepEqual(await credentialRows(databaseUrl), [{ name: 'team-b', secret_key: 'CODEX_AUTH_JSON__TEAM_B', pool: 'default' }]);
});

test('login with an invalid --credential or --pool name is refused before asking the issuer', async () => {
  const { fake, env } = await setup();
  const bad = await run(['login', '--credential', 'Team_2'], env);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /login: --credential "Team_2" is not a valid name.*Nothing was stored/);
  const badPool = await run(['login', '--credential', 'ok', '--pool', 'Bad Pool'], env);
  assert.equal(badPool.code, 2);
  assert.match(badPool.stderr, /login: --pool "Bad Pool" is not a valid name/);
  assert.equal(fake.requests.length, 0);
});

test('a login for a new name refused by the stale-seed guard exits 4 and creates no credential', async () => {
  const spent = makeChatgptLogin({ accountId: 'acct-spent' });
  const { databaseUrl, env } = await setup({ autoApproveAfterPolls: 1, mint: () => ({ id_token: spent.idToken, access_token: spent.accessToken, refresh_token: spent.refreshToken }) });
  assert.equal((await run(['migrate'], env)).code, 0);
  // The broker already sent this refresh token upstream (a rotation with no outcome yet counts as spent).
  const sha = createHash('sha256').update(spent.refreshToken).digest('hex');
  await sql(databaseUrl, `INSERT INTO broker_refresh_events (secret_key, replica_id, reason, refresh_token_sha8, refresh_token_sha256, kind) VALUES ('CODEX_AUTH_JSON', 'r', 'due', $1, $2, 'refresh')`, [sha.slice(0, 8), sha]);
  const r = await run(['login', '--credential', 'team-c', '--pool', 'batch'], env);
  assert.equal(r.code, 4, r.stderr);
  assert.match(r.stderr, /not stored/);
  assert.deepEqual(await credentialRows(databaseUrl), []);
  assert.equal(await storedDoc(databaseUrl, 'CODEX_AUTH_JSON__TEAM_C'), undefined);
  const list = await run(['credentials', 'list', '--json'], env);
  assert.deepEqual((JSON.parse(list.stdout) as { credentials: Array<{ name: string }> }).credentials.map((c) => c.name), ['default']);
});

test('login against an issuer without device login says to allow it in the security settings or use --browser', async () => {
  const { databaseUrl, env } = await setup({ deviceDisabled: true });
  const r = await run(['login'], env);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /security settings.*--browser.*Nothing was stored/s);
  assert.equal(await storedDoc(databaseUrl), undefined);
});

test('Ctrl-C while waiting for the code cancels: exit 130, a message, nothing stored', async () => {
  const { fake, databaseUrl, env } = await setup();
  const p = start(['login'], env);
  await waitFor('the code to be printed', () => fake.userCodes().length === 1 && p.out().includes(fake.userCodes()[0]!), 60_000, () => p.out() + p.err());
  p.child.kill('SIGINT');
  assert.equal(await p.exited, 130, p.err());
  assert.match(p.err(), /cancelled; nothing was stored/);
  fake.approveDevice();
  assert.equal(await storedDoc(databaseUrl), undefined);
  assert.equal(fake.exchanges, 0);
});

test('login --browser prints the authorize URL, reads the pasted callback URL and stores the login', async () => {
  const { databaseUrl, env } = await setup();
  const p = start(['login', '--browser'], env);
  await waitFor('the authorize URL', () => AUTHORIZE_URL.test(p.out()) && /paste it here/.test(p.out()), 60_000, () => p.out() + p.err());
  const res = await fetch(AUTHORIZE_URL.exec(p.out())![0], { redirect: 'manual' });
  assert.equal(res.status, 302);
  p.child.stdin.end(`${res.headers.get('location')}\n`);
  assert.equal(await p.exited, 0, p.err());
  assert.match(p.out(), /Logged in: account acct-cli, plan team/);
  assert.equal((await storedDoc(databaseUrl))?.['auth_mode'], 'chatgpt');
});

test('login --browser refuses a callback whose state is not its own, and stores nothing', async () => {
  const { fake, databaseUrl, env } = await setup();
  const p = start(['login', '--browser'], env);
  await waitFor('the authorize URL', () => AUTHORIZE_URL.test(p.out()) && /paste it here/.test(p.out()), 60_000, () => p.out() + p.err());
  const res = await fetch(AUTHORIZE_URL.exec(p.out())![0], { redirect: 'manual' });
  const forged = new URL(String(res.headers.get('location')));
  forged.searchParams.set('state', 'someone-elses-state');
  p.child.stdin.end(`${forged.toString()}\n`);
  assert.equal(await p.exited, 1);
  assert.match(p.err(), /state is not this login's/);
  assert.equal(await storedDoc(databaseUrl), undefined);
  assert.equal(fake.exchanges, 0);
});

test('login --browser with an error= callback says so and stores nothing', async () => {
  const { databaseUrl, env } = await setup({ browser: 'deny' });
  const p = start(['login', '--browser'], env);
  await waitFor('the authorize URL', () => AUTHORIZE_URL.test(p.out()) && /paste it here/.test(p.out()), 60_000, () => p.out() + p.err());
  const res = await fetch(AUTHORIZE_URL.exec(p.out())![0], { redirect: 'manual' });
  p.child.stdin.end(`${res.headers.get('location')}\n`);
  assert.equal(await p.exited, 1);
  assert.match(p.err(), /access_denied/);
  assert.equal(await storedDoc(databaseUrl), undefined);
});

test('no secret reached the CLI output', () => {
  const secrets = issuers.flatMap((f) => f.secrets());
  assert.ok(secrets.length > 5);
  assert.deepEqual(findLeaks(outputs, secrets), []);
});
