import { strict as assert } from 'node:assert';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { startTestPostgres, type TestPostgres } from './helpers/pg.js';
import { runProcess } from './helpers/process.js';
import { tempDirs } from './helpers/tmp.js';
import { cliArgs } from './helpers/cli.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const KEY_B64 = randomBytes(32).toString('base64');
const outputs: string[] = [];
let pgServer: TestPostgres;
let upstream: FakeUpstream;
const tmpDir = tempDirs('cab-credcli-');

before(async () => {
  pgServer = await startTestPostgres();
  upstream = await FakeUpstream.start();
});
after(async () => {
  await upstream.close();
  await pgServer.stop();
});

async function run(args: string[], env: Record<string, string>) {
  const clean: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!/^(PORT|HOST|DATABASE_URL|DATA_DIR|SECRETS_ENCRYPTION_KEY|ADMIN_TOKEN|LOG_LEVEL|BROKER_ENV|MOLECULE_ENV|NODE_TEST_CONTEXT)$/.test(k)) clean[k] = v;
  }
  const r = await runProcess(process.execPath, cliArgs(args), { cwd: ROOT, env: { ...clean, ...env }, input: '', timeoutMs: 120_000 });
  outputs.push(r.stdout, r.stderr);
  return r;
}

function writeJson(name: string, value: unknown): string {
  const f = path.join(tmpDir(), name);
  fs.writeFileSync(f, JSON.stringify(value));
  return f;
}

async function sql<T extends pg.QueryResultRow>(url: string, text: string): Promise<T[]> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return (await c.query<T>(text)).rows;
  } finally {
    await c.end();
  }
}

test('seed --credential --pool stores a named login; credentials list shows it with headers and as JSON; clients add --pool binds a client', async () => {
  const url = await pgServer.newDatabase();
  const env = { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: KEY_B64 };
  const seeded = await run(['seed', '--credential', 'team-2', '--pool', 'batch', writeJson('a.json', upstream.seed({ accountId: 'acct-t2', planType: 'team' }))], env);
  assert.equal(seeded.code, 0, seeded.stderr);
  assert.match(seeded.stdout, /as credential team-2 \(pool batch\) under CODEX_AUTH_JSON__TEAM_2/);
  assert.equal((await run(['seed', writeJson('d.json', upstream.seed({ accountId: 'acct-d' }))], env)).code, 0, 'plain seed is still default');
  const keys = await sql<{ key: string }>(url, 'SELECT key FROM global_secrets ORDER BY key');
  assert.deepEqual(keys.map((k) => k.key), ['CODEX_AUTH_JSON', 'CODEX_AUTH_JSON__TEAM_2']);
  const client = await run(['clients', 'add', 'ws-batch', '--pool', 'batch'], env);
  assert.equal(client.code, 0, client.stderr);
  assert.match(client.stdout, /in pool batch/);
  const pools = await sql<{ pool: string }>(url, "SELECT pool FROM broker_clients WHERE name = 'ws-batch'");
  assert.equal(pools[0]?.pool, 'batch');

  const list = await run(['credentials', 'list'], env);
  assert.equal(list.code, 0, list.stderr);
  const [header, ...lines] = list.stdout.trim().split('\n');
  assert.match(header!, /^NAME\s+POOL\s+STATE\s+ACCOUNT\s+PLAN\s+EXPIRES\s+CLIENTS$/);
  assert.match(lines[0]!, /^default\s+default\s+fresh\s+acct-d\s/);
  assert.match(lines[1]!, /^team-2\s+batch\s+fresh\s+acct-t2\s+team\s/);
  const json = await run(['credentials', 'list', '--json'], env);
  const parsed = JSON.parse(json.stdout) as { credentials: Array<{ name: string; pool: string; state: string; secretKey: string }> };
  assert.deepEqual(
    parsed.credentials.map((c) => [c.name, c.pool, c.state, c.secretKey]),
    [
      ['default', 'default', 'fresh', 'CODEX_AUTH_JSON'],
      ['team-2', 'batch', 'fresh', 'CODEX_AUTH_JSON__TEAM_2'],
    ],
  );
  const bad = await run(['seed', '--credential', 'Team_2', writeJson('b.json', upstream.seed())], env);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /not a valid name/);
});

test('credentials remove refuses default and a credential with assigned clients unless --reassign', async () => {
  const url = await pgServer.newDatabase();
  const env = { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: KEY_B64 };
  assert.equal((await run(['seed', '--credential', 'old', writeJson('o.json', upstream.seed({ accountId: 'acct-o' }))], env)).code, 0);
  assert.equal((await run(['clients', 'add', 'ws'], env)).code, 0);
  // As a running broker would have stored it.
  await sql(url, "UPDATE broker_clients SET assigned_credential = 'old'");
  const dflt = await run(['credentials', 'remove', 'default'], env);
  assert.equal(dflt.code, 2);
  assert.match(dflt.stderr, /default credential cannot be removed/);
  const refused = await run(['credentials', 'remove', 'old'], env);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /1 client\(s\) are assigned to old; repeat with --reassign/);
  assert.equal((await sql(url, "SELECT 1 FROM global_secrets WHERE key = 'CODEX_AUTH_JSON__OLD'")).length, 1, 'nothing removed');
  const removed = await run(['credentials', 'remove', 'old', '--reassign'], env);
  assert.equal(removed.code, 0, removed.stderr);
  assert.equal((await sql(url, "SELECT 1 FROM global_secrets WHERE key = 'CODEX_AUTH_JSON__OLD'")).length, 0);
  assert.equal((await sql(url, "SELECT 1 FROM broker_credentials WHERE name = 'old'")).length, 0);
  assert.equal((await run(['credentials', 'remove', 'old'], env)).code, 1, 'unknown now');
  assert.match((await run(['credentials', '--help'], env)).stdout, /credentials remove <name> \[--reassign\]/);
});

test('no token value appears in any output of the credentials CLI', () => {
  assert.deepEqual(findLeaks(outputs, upstream.issuedTokens()), []);
});
