import { strict as assert } from 'node:assert';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import type { Socket } from 'node:net';
import { runProcess } from './helpers/process.js';
import { tempDirs } from './helpers/tmp.js';
import { createCipheriv, createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { openForPostgresUser } from '../src/embedded.js';
import { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks, findSlices } from './helpers/logs.js';
import { freePort, startTestPostgres, type TestPostgres } from './helpers/pg.js';
import { cliArgs } from './helpers/cli.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const KEY_B64 = randomBytes(32).toString('base64');
const outputs: string[] = [];
let pgServer: TestPostgres;
let upstream: FakeUpstream;

before(async () => {
  pgServer = await startTestPostgres();
  upstream = await FakeUpstream.start();
});
after(async () => {
  await upstream.close();
  await pgServer.stop();
});
const tmpDir = tempDirs('cab-cli-');

/** The environment a user would have: none of the broker's variables unless given. */
function cleanEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (/^(PORT|HOST|DATABASE_URL|DATA_DIR|SECRETS_ENCRYPTION_KEY|ADMIN_TOKEN|LOG_LEVEL|BROKER_ENV|MOLECULE_ENV|NODE_TEST_CONTEXT)$/.test(k)) continue;
    env[k] = v;
  }
  return { ...env, ...extra };
}

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

async function run(args: string[], env: Record<string, string>, input?: string): Promise<Run> {
  const r = await runProcess(process.execPath, cliArgs(args), { cwd: ROOT, env: cleanEnv(env), input: input ?? '', timeoutMs: 120_000 });
  outputs.push(r.stdout, r.stderr);
  return r;
}

function writeJson(dir: string, name: string, value: unknown): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, typeof value === 'string' ? value : JSON.stringify(value, null, 2));
  return f;
}

async function rowBytes(url: string): Promise<Buffer | undefined> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    const r = await c.query<{ encrypted_value: Buffer }>("SELECT encrypted_value FROM global_secrets WHERE key = 'CODEX_AUTH_JSON'");
    return r.rows[0]?.encrypted_value;
  } finally {
    await c.end();
  }
}

describe('configuration', () => {
  for (const [name, value, expects] of [
    ['REFRESH_CHECK_INTERVAL_SECONDS', 'five', /REFRESH_CHECK_INTERVAL_SECONDS: expected/],
    ['SECRETS_ENCRYPTION_KEY', randomBytes(31).toString('base64'), /SECRETS_ENCRYPTION_KEY: .*31 bytes/],
    ['DATABASE_URL', 'not a url', /DATABASE_URL: expected a postgres/],
    ['PORT', '70000', /PORT: expected a TCP port/],
    ['REFRESH_TOKEN_EXPOSURE', 'leak', /REFRESH_TOKEN_EXPOSURE: expected one of proxy, omit, raw/],
  ] as const) {
    test(`bad configuration exits non-zero naming the variable: ${name}`, async () => {
      const r = await run(['serve'], { [name]: value, DATA_DIR: tmpDir() });
      assert.notEqual(r.code, 0);
      assert.equal(r.code, 78);
      assert.match(r.stderr, expects);
      assert.match(r.stderr, new RegExp(name));
    });
  }

  test('production refuses to start without SECRETS_ENCRYPTION_KEY', async () => {
    const r = await run(['serve'], { BROKER_ENV: 'production', DATABASE_URL: pgServer.baseUrl });
    assert.equal(r.code, 78);
    assert.match(r.stderr, /SECRETS_ENCRYPTION_KEY: required when BROKER_ENV=production/);
  });
});

describe('serve', () => {
  test('a port another process holds fails at start, naming the address and what to do', async () => {
    const net = await import('node:net');
    const holder = net.createServer();
    await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
    const port = (holder.address() as { port: number }).port;
    try {
      const url = await pgServer.newDatabase();
      const r = await run(['serve'], { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: KEY_B64, HOST: '127.0.0.1', PORT: String(port) });
      assert.equal(r.code, 1);
      assert.match(r.stderr, new RegExp(`EADDRINUSE.*127\\.0\\.0\\.1:${port}.*set PORT or HOST`));
    } finally {
      holder.close();
    }
  });
});

describe('seed and status', () => {
  test('seed validates and stores a login; status prints its state without secrets', async () => {
    const url = await pgServer.newDatabase();
    const dir = tmpDir();
    const doc = upstream.seed({ accountId: 'acct-seed', planType: 'plus' });
    const env = { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: KEY_B64 };
    const seeded = await run(['seed', writeJson(dir, 'auth.json', doc)], env);
    assert.equal(seeded.code, 0, seeded.stderr);
    assert.match(seeded.stdout, /stored the login under CODEX_AUTH_JSON: account acct-seed, plan plus/);
    const stored = await rowBytes(url);
    assert.ok(stored);
    // Encrypted (version 1): the token is not in the stored bytes.
    assert.ok(!stored.toString('latin1').includes((doc as { tokens: { refresh_token: string } }).tokens.refresh_token));
    const st = await run(['status', '--json'], env);
    assert.equal(st.code, 0, st.stderr);
    const report = JSON.parse(st.stdout);
    assert.equal(report.state, 'fresh');
    assert.equal(report.accountId, 'acct-seed');
    assert.equal(report.encryptionVersion, 1);
    const human = await run(['status'], env);
    assert.match(human.stdout, /^state\s+fresh$/m);
  });

  test('status shows the stored usage: plan, each window with its reset, the age and whether it is stale', async () => {
    const url = await pgServer.newDatabase();
    const env = { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: KEY_B64 };
    assert.equal((await run(['seed', writeJson(tmpDir(), 'auth.json', upstream.seed())], env)).code, 0);
    const c = new pg.Client({ connectionString: url });
    await c.connect();
    try {
      const snapshot = { planType: 'pro', allowed: true, limitReached: false, primary: { usedPercent: 93, windowSeconds: 18_000, resetAt: 1_900_000_000 }, secondary: { usedPercent: 41, windowSeconds: 604_800, resetAt: 1_900_500_000 } };
      await c.query(
        `INSERT INTO broker_usage (secret_key, snapshot, fetched_at, ok, last_error, polled_by) VALUES ('CODEX_AUTH_JSON', $1, now() - interval '2 minutes', false, 'timeout', 'replica-a')`,
        [JSON.stringify(snapshot)],
      );
    } finally {
      await c.end();
    }
    const st = await run(['status', '--json'], env);
    // Its only login at 93 % (over POOL_SWITCH_PERCENT): pool `default` is exhausted, exit 5.
    assert.equal(st.code, 5, st.stderr);
    const usage = JSON.parse(st.stdout).usage;
    assert.equal(usage.planType, 'pro');
    assert.deepEqual(usage.primary, { usedPercent: 93, windowSeconds: 18_000, resetAt: '2030-03-17T17:46:40.000Z' });
    assert.equal(usage.secondary.usedPercent, 41);
    assert.ok(usage.ageSeconds >= 120, String(usage.ageSeconds));
    assert.equal(usage.stale, true);
    assert.equal(usage.lastError, 'timeout');
    const human = await run(['status'], env);
    assert.match(human.stdout, /^usage\s+pro; 5h 93% \(resets 2030-03-17T17:46:40\.000Z\), weekly 41% \(resets [^)]+\); fetched \d+ s ago; STALE \(last poll: timeout\)$/m);
    assert.equal(JSON.parse((await run(['status', '--json'], { ...env, USAGE_POLL_INTERVAL_SECONDS: '0' })).stdout).usage, null, 'polling off: no usage');
  });

  test('status shows every credential with its usage, and exits 5 when every login of a pool is over POOL_SWITCH_PERCENT', async () => {
    const url = await pgServer.newDatabase();
    const env = { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: KEY_B64 };
    for (const name of ['team-a', 'team-b']) {
      const r = await run(['seed', '--credential', name, '--pool', 'team', writeJson(tmpDir(), `${name}.json`, upstream.seed({ accountId: `acct-${name}` }))], env);
      assert.equal(r.code, 0, r.stderr);
    }
    const usage = async (key: string, primary: number, secondary: number) => {
      const c = new pg.Client({ connectionString: url });
      await c.connect();
      try {
        const snapshot = { planType: 'team', primary: { usedPercent: primary, windowSeconds: 18_000, resetAt: 1_900_000_000 }, secondary: { usedPercent: secondary, windowSeconds: 604_800, resetAt: 1_900_500_000 } };
        await c.query(
          `INSERT INTO broker_usage (secret_key, snapshot, fetched_at, ok) VALUES ($1, $2, now(), true)
           ON CONFLICT (secret_key) DO UPDATE SET snapshot = EXCLUDED.snapshot`,
          [key, JSON.stringify(snapshot)],
        );
      } finally {
        await c.end();
      }
    };
    await usage('CODEX_AUTH_JSON__TEAM_A', 95, 10);
    await usage('CODEX_AUTH_JSON__TEAM_B', 20, 30);
    const one = await run(['status', '--json'], env);
    assert.equal(one.code, 0, `one login of the pool has headroom (and an absent default beside named logins is no fault): ${one.stdout}${one.stderr}`);
    const report = JSON.parse(one.stdout);
    assert.deepEqual(
      report.credentials.map((c: { name: string; pool: string; state: string; usage: { primary: { usedPercent: number } | null } | null }) => [c.name, c.pool, c.state, c.usage?.primary?.usedPercent ?? null]),
      [['default', 'default', 'absent', null], ['team-a', 'team', 'fresh', 95], ['team-b', 'team', 'fresh', 20]],
    );
    assert.deepEqual(report.exhaustedPools, []);
    await usage('CODEX_AUTH_JSON__TEAM_B', 20, 91);
    const full = await run(['status'], env);
    assert.equal(full.code, 5, full.stdout + full.stderr);
    assert.match(full.stdout, /^ {2}team-b \(pool team\): fresh, 0 client\(s\); team; 5h 20% \(resets [^)]+\), weekly 91% /m);
    assert.match(full.stdout, /^POOL EXHAUSTED: every login of pool team is at or over POOL_SWITCH_PERCENT/m);
    // The threshold is POOL_SWITCH_PERCENT: at 96 the pool has headroom again.
    assert.equal((await run(['status'], { ...env, POOL_SWITCH_PERCENT: '96' })).code, 0);
  });

  test('seed rejects a bad file with a clear error and leaves the store untouched', async () => {
    const url = await pgServer.newDatabase();
    const dir = tmpDir();
    const env = { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: KEY_B64 };
    assert.equal((await run(['seed', writeJson(dir, 'good.json', upstream.seed())], env)).code, 0);
    const before = await rowBytes(url);
    const good = upstream.seed() as { tokens: Record<string, string> };
    const cases: Array<[string, unknown, RegExp]> = [
      ['not-json', '{"tokens": ', /document: is not valid JSON/],
      ['array', [1, 2], /document: must be a JSON object/],
      ['no-tokens', { OPENAI_API_KEY: null }, /tokens: is missing/],
      ['empty-refresh', { tokens: { ...good.tokens, refresh_token: '' } }, /tokens.refresh_token: must be a non-empty string/],
      ['bad-access', { tokens: { ...good.tokens, access_token: 'opaque' } }, /tokens.access_token: must be a three-part JWT/],
      ['bad-id', { tokens: { ...good.tokens, id_token: 'a.b.c' } }, /tokens.id_token/],
      ['proto', `{"__proto__": {"x": 1}, "tokens": ${JSON.stringify(good.tokens)}}`, /__proto__/],
    ];
    for (const [name, body, expected] of cases) {
      const r = await run(['seed', writeJson(dir, `${name}.json`, body)], env);
      assert.equal(r.code, 2, `${name}: ${r.stderr}`);
      assert.match(r.stderr, expected, name);
      assert.match(r.stderr, /Nothing was stored/);
    }
    const missing = await run(['seed', path.join(dir, 'absent.json')], env);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /cannot read .*ENOENT/);
    assert.deepEqual(await rowBytes(url), before);
  });

  test('seed refuses a stale copy with exit code 4, saying why, how to force, and that nothing was stored; --force stores it', async () => {
    const url = await pgServer.newDatabase();
    const dir = tmpDir();
    const env = { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: KEY_B64 };
    const day = 86_400;
    const nowSec = Math.floor(Date.now() / 1000);
    const newer = upstream.seed({ accountId: 'acct-stale', iatSec: nowSec - day });
    const older = upstream.seed({ accountId: 'acct-stale', iatSec: nowSec - 2 * day });
    assert.equal((await run(['seed', writeJson(dir, 'newer.json', newer)], env)).code, 0);
    const before = await rowBytes(url);
    const refusedOlder = await run(['seed', writeJson(dir, 'older.json', older)], env);
    assert.equal(refusedOlder.code, 4, refusedOlder.stderr);
    assert.match(refusedOlder.stderr, /older than the stored login of the same account acct-stale/);
    assert.match(refusedOlder.stderr, /Nothing was stored/);
    assert.match(refusedOlder.stderr, /--force/);
    // A token the broker already sent upstream (as its refresh intent records it).
    const spent = upstream.seed({ accountId: 'acct-other' }) as { tokens: { refresh_token: string } };
    const hash = createHash('sha256').update(spent.tokens.refresh_token).digest('hex');
    const c = new pg.Client({ connectionString: url });
    await c.connect();
    await c.query(
      `INSERT INTO broker_refresh_events (secret_key, replica_id, reason, refresh_token_sha8, refresh_token_sha256, finished_at, outcome)
       VALUES ('CODEX_AUTH_JSON', 'r1', 'due', $1, $2, now(), 'rotated')`,
      [hash.slice(0, 8), hash],
    );
    const refusedSpent = await run(['seed', writeJson(dir, 'spent.json', spent)], env);
    assert.equal(refusedSpent.code, 4, refusedSpent.stderr);
    assert.match(refusedSpent.stderr, /already spent by the broker .* on \d{4}-\d\d-\d\dT/);
    assert.deepEqual(await rowBytes(url), before, 'nothing stored by a refused seed');
    const forced = await run(['seed', '--force', path.join(dir, 'older.json')], env);
    assert.equal(forced.code, 0, forced.stderr);
    assert.match(forced.stdout, /forced past the stale-seed guard/);
    assert.notDeepEqual(await rowBytes(url), before);
    const audited = await c.query("SELECT source, outcome FROM broker_refresh_events WHERE kind = 'seed' ORDER BY id");
    await c.end();
    assert.deepEqual(
      audited.rows.map((r) => [r.source, r.outcome]),
      [
        ['cli', 'stored'],
        ['cli', 'refused_older'],
        ['cli', 'refused_spent'],
        ['cli', 'stored_forced'],
      ],
    );
    assert.match((await run(['--help'], {})).stdout, /seed \[--force\][\s\S]*exit code 4/);
  });

  test('seed reads standard input with -', async () => {
    const url = await pgServer.newDatabase();
    const r = await run(['seed', '-'], { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: KEY_B64 }, JSON.stringify(upstream.seed()));
    assert.equal(r.code, 0, r.stderr);
  });

  test('a row written with v1 by an independent implementation of the platform format is read', async () => {
    const url = await pgServer.newDatabase();
    const env = { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: KEY_B64 };
    assert.equal((await run(['migrate'], env)).code, 0);
    // The platform's Go code: AES-256-GCM, nonce(12) || ciphertext || tag(16), no AAD.
    const plaintext = Buffer.from(JSON.stringify(upstream.seed({ accountId: 'acct-platform' })));
    const nonce = randomBytes(12);
    const c = createCipheriv('aes-256-gcm', Buffer.from(KEY_B64, 'base64'), nonce);
    const sealed = Buffer.concat([nonce, c.update(plaintext), c.final(), c.getAuthTag()]);
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    await client.query("INSERT INTO global_secrets (key, encrypted_value, encryption_version) VALUES ('CODEX_AUTH_JSON', $1, 1)", [sealed]);
    await client.end();
    const st = await run(['status', '--json'], env);
    const report = JSON.parse(st.stdout);
    assert.equal(report.state, 'fresh');
    assert.equal(report.accountId, 'acct-platform');
  });

  test('status names a v1 row with no key and a version-7 row clearly', async () => {
    const url = await pgServer.newDatabase();
    const env = { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: KEY_B64 };
    assert.equal((await run(['seed', '-'], env, JSON.stringify(upstream.seed()))).code, 0);
    const noKey = JSON.parse((await run(['status', '--json'], { DATABASE_URL: url })).stdout);
    assert.equal(noKey.state, 'invalid');
    assert.match(noKey.detail, /SECRETS_ENCRYPTION_KEY is not set/);
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    await client.query('UPDATE global_secrets SET encryption_version = 7');
    await client.end();
    const v7 = await run(['status', '--json'], env);
    assert.equal(v7.code, 3);
    assert.match(JSON.parse(v7.stdout).detail, /encryption_version 7/);
  });
});

describe('values in range', () => {
  /** A row as the platform's Go code writes it (AES-256-GCM, v1): what no seed validation saw. */
  async function putV1(url: string, doc: unknown) {
    const nonce = randomBytes(12);
    const c = createCipheriv('aes-256-gcm', Buffer.from(KEY_B64, 'base64'), nonce);
    const sealed = Buffer.concat([nonce, c.update(Buffer.from(JSON.stringify(doc))), c.final(), c.getAuthTag()]);
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    await client.query("INSERT INTO global_secrets (key, encrypted_value, encryption_version) VALUES ('CODEX_AUTH_JSON', $1, 1)", [sealed]);
    await client.end();
  }

  test('seed refuses an exp or iat outside 1970..2100, naming the field, and stores nothing', async () => {
    const url = await pgServer.newDatabase();
    const dir = tmpDir();
    const env = { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: KEY_B64 };
    assert.equal((await run(['migrate'], env)).code, 0);
    const cases: Array<[string, unknown, RegExp]> = [
      ['exp-1e13', upstream.seed({ expSec: 1e13 }), /tokens\.access_token\.exp: must be a number of seconds/],
      ['iat-negative', upstream.seed({ iatSec: -5, expSec: 1_900_000_000 }), /tokens\.access_token\.iat/],
    ];
    for (const [name, body, expected] of cases) {
      const r = await run(['seed', writeJson(dir, `${name}.json`, body)], env);
      assert.equal(r.code, 2, `${name}: ${r.stderr}`);
      assert.match(r.stderr, expected, name);
      assert.match(r.stderr, /Nothing was stored/);
      assert.doesNotMatch(r.stderr, /seed failed/);
    }
    assert.equal(await rowBytes(url), undefined);
  });

  test('status of a stored row with an exp past 2100 prints the state, never a date error', async () => {
    const url = await pgServer.newDatabase();
    const env = { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: KEY_B64 };
    assert.equal((await run(['migrate'], env)).code, 0);
    await putV1(url, upstream.seed({ expSec: 1e13 }));
    const st = await run(['status', '--json'], env);
    assert.doesNotMatch(st.stderr, /Invalid time value|failed/);
    const report = JSON.parse(st.stdout);
    // An unreadable exp: due (the broker rotates it at once), no expiry shown.
    assert.equal(report.state, 'due');
    assert.equal(report.accessTokenExpiresAt, null);
  });

  test('clients list shows no part of any client token', async () => {
    const url = await pgServer.newDatabase();
    const env = { DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: KEY_B64 };
    const secrets: string[] = [];
    for (const name of ['list-a', 'list-b']) {
      const r = await run(['clients', 'add', name], env);
      assert.equal(r.code, 0, r.stderr);
      for (const m of r.stdout.matchAll(/^(?:token|refresh credential)\s+(\S+)$/gm)) secrets.push(m[1]!);
    }
    assert.equal(secrets.length, 4);
    const list = await run(['clients', 'list'], env);
    assert.equal(list.code, 0, list.stderr);
    assert.match(list.stdout, /list-a/);
    assert.deepEqual(findSlices(list.stdout + list.stderr, secrets), []);
    // Column headers, and the same facts as JSON.
    assert.match(list.stdout.split('\n')[0]!, /^NAME\s+WORKSPACE\s+STATE\s+LAST SEEN$/);
    assert.match(list.stdout, /^list-a\s+-\s+never_seen\s+never$/m);
    const json = await run(['clients', 'list', '--json'], env);
    assert.equal(json.code, 0, json.stderr);
    const parsed = JSON.parse(json.stdout) as { clients: Array<{ name: string; state: string; lastSeenAt: string | null }> };
    assert.deepEqual(parsed.clients.map((c) => [c.name, c.state, c.lastSeenAt]), [['list-a', 'never_seen', null], ['list-b', 'never_seen', null]]);
    assert.deepEqual(findSlices(json.stdout, secrets), []);
  });
});

describe('the command line (Operator experience)', () => {
  /** Every command and subcommand, as an operator types them. */
  const every = [['serve'], ['login'], ['seed'], ['status'], ['migrate'], ['clients'], ['clients', 'add'], ['clients', 'list'], ['clients', 'revoke']];

  test('--help on every command and subcommand prints its usage, exits 0 and never acts (parsed before any configuration)', async () => {
    const { parseCommand } = await import('../src/cli/args.js');
    for (const argv of every) {
      for (const help of ['--help', '-h']) {
        const [command, ...rest] = argv;
        const parsed = parseCommand(command!, [...rest, help]);
        assert.equal(parsed.kind, 'help', `${argv.join(' ')} ${help}`);
        assert.match(parsed.kind === 'help' ? parsed.text : '', new RegExp(`^usage: npx codex-auth-broker ${argv.join(' ')}`), argv.join(' '));
      }
    }
    // In a real process: a configuration that could not even connect, and a seed file that
    // does not exist: --help still answers 0 with the usage, and nothing else happens.
    for (const argv of [['seed', '/nonexistent/auth.json', '--help'], ['status', '--help'], ['clients', '--help'], ['clients', 'revoke', 'x', '--help']]) {
      const r = await run(argv, { DATABASE_URL: 'postgres://nobody@127.0.0.1:1/none', PORT: 'not-a-port' });
      assert.equal(r.code, 0, `${argv.join(' ')}: ${r.stderr}`);
      assert.match(r.stdout, /^usage: npx codex-auth-broker /);
      assert.equal(r.stderr, '', argv.join(' '));
    }
  });

  test('--version prints the package version', async () => {
    const r = await run(['--version'], {});
    assert.equal(r.code, 0, r.stderr);
    const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string };
    assert.equal(r.stdout.trim(), pkg.version);
  });

  test('unknown flags, unknown subcommands and missing arguments are refused naming what is wrong (exit 2)', async () => {
    const { parseCommand } = await import('../src/cli/args.js');
    const err = (command: string, args: string[]) => {
      const p = parseCommand(command, args);
      assert.equal(p.kind, 'error', `${command} ${args.join(' ')}`);
      return p.kind === 'error' ? p.message : '';
    };
    assert.match(err('status', ['--jsn']), /^status: unknown flag --jsn\n/);
    assert.match(err('seed', ['--froce', 'auth.json']), /^seed: unknown flag --froce/);
    assert.match(err('clients', ['list', '--all']), /^clients list: unknown flag --all/);
    assert.match(err('clients', ['add', 'x', '--workspace']), /--workspace needs a value/);
    assert.match(err('clients', ['purge']), /unknown subcommand "purge"/);
    assert.match(err('clients', []), /name a subcommand/);
    assert.match(err('seed', []), /^seed: expected 1 argument, got 0/);
    assert.match(err('status', ['-x']), /unknown flag -x/);
    assert.match(err('serve', ['extra']), /expected 0 arguments, got 1/);
    const r = await run(['status', '--jsn'], {});
    assert.equal(r.code, 2);
    assert.match(r.stderr, /status: unknown flag --jsn/);
  });

  test('a reader that goes away (status | true) ends the command quietly: no EPIPE stack trace', async () => {
    const help = [process.execPath, ...cliArgs(['--help'])].map((a) => `"${a}"`).join(' ');
    const script = `${help} 2>"$ERR" | true; ${help} 2>>"$ERR" | head -c 10 >/dev/null; cat "$ERR"`;
    const dir = tmpDir();
    const r = await runProcess('bash', ['-c', script], { cwd: ROOT, env: cleanEnv({ ERR: path.join(dir, 'err') }), timeoutMs: 120_000 });
    assert.equal(r.code, 0, r.stderr);
    assert.doesNotMatch(r.stdout + r.stderr, /EPIPE|Error|\n\s+at /);
  });

  test('Ctrl-C in a one-shot command says so and exits 130 without a stack trace', async () => {
    // A "database" that accepts the connection and never answers: status is stuck in its
    // first query when the operator gives up.
    const net = await import('node:net');
    const held: Socket[] = [];
    let connected!: () => void;
    const reached = new Promise<void>((resolve) => (connected = resolve));
    const silent = net.createServer((sock) => {
      held.push(sock);
      connected();
    });
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    const port = (silent.address() as { port: number }).port;
    try {
      const child = spawn(process.execPath, cliArgs(['status']), {
        cwd: ROOT,
        env: cleanEnv({ DATABASE_URL: `postgres://u:p@127.0.0.1:${port}/db`, SECRETS_ENCRYPTION_KEY: KEY_B64 }),
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let err = '';
      child.stderr.on('data', (d: Buffer) => (err += d.toString()));
      const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
      await reached;
      child.kill('SIGINT');
      const code = await exited;
      assert.equal(code, 130, err);
      assert.match(err, /status: interrupted/);
      assert.doesNotMatch(err, /\n\s+at /);
    } finally {
      for (const sock of held) sock.destroy();
      silent.close();
    }
  });
});

describe('serve on the embedded default', () => {
  function startServe(dir: string, port: number, extra: Record<string, string> = {}): { child: ChildProcess; out: () => string } {
    // The README's start command, with only a port and a data directory of the test's own.
    const child = spawn('npm', ['start'], { cwd: ROOT, env: cleanEnv({ PORT: String(port), DATA_DIR: dir, ...extra }), stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    let out = '';
    child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr?.on('data', (d: Buffer) => (out += d.toString()));
    return { child, out: () => out };
  }

  async function waitHealthy(port: number, out: () => string, ms = 60_000): Promise<number> {
    const start = Date.now();
    for (;;) {
      try {
        const r = await fetch(`http://127.0.0.1:${port}/healthz`);
        if (r.status === 200) return Date.now() - start;
      } catch {
        /* not up yet */
      }
      if (Date.now() - start > ms) throw new Error(`broker did not become healthy: ${out()}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /**
   * SIGTERM to the whole group (a terminal's Ctrl-C, an orchestrator), or to npm alone (a
   * supervisor or `kill` given npm's pid). Resolves when every holder of npm's output has
   * exited, i.e. the broker too; 'orphaned' if that takes 30 s (the group is then killed).
   */
  function stop(child: ChildProcess, target: 'group' | 'npm' = 'group'): Promise<number | null | 'orphaned'> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        process.kill(-(child.pid ?? 0), 'SIGKILL');
        resolve('orphaned');
      }, 30_000);
      child.once('close', (code) => {
        clearTimeout(timer);
        resolve(code);
      });
      if (target === 'group') process.kill(-(child.pid ?? 0), 'SIGTERM');
      else child.kill('SIGTERM');
    });
  }

  test('as root, the postgres user is given the search bit (o+x) on exactly the directories above the binaries it cannot enter', { skip: process.getuid?.() !== 0 ? 'needs root' : false }, async () => {
    const top = tmpDir(); // 0700, like mktemp -d
    const bin = path.join(top, 'checkout', 'native', 'bin');
    fs.mkdirSync(bin, { recursive: true, mode: 0o755 });
    const exe = path.join(bin, 'probe');
    fs.writeFileSync(exe, '#!/bin/sh\necho reached\n', { mode: 0o755 });
    const asPostgres = () => spawnSync('su', ['-s', '/bin/sh', 'postgres', '-c', exe], { encoding: 'utf8' });
    assert.notEqual(asPostgres().status, 0, 'the postgres user cannot run a binary under a root-only directory');
    const before = fs.statSync(path.join(top, 'checkout')).mode & 0o7777;
    const opened = await openForPostgresUser([path.dirname(bin)]);
    assert.deepEqual(opened, [top]);
    assert.equal(fs.statSync(top).mode & 0o777, 0o701, 'search only: others can enter, not list');
    assert.equal(fs.statSync(path.join(top, 'checkout')).mode & 0o7777, before, 'directories that already allowed it are untouched');
    const r = asPostgres();
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout.trim(), 'reached');
    assert.deepEqual(await openForPostgresUser([path.dirname(bin)]), [], 'idempotent');
  });

  test('the start command brings up /healthz with no Postgres and no environment, and a restart reuses the data', async () => {
    // A root-only parent, like a checkout made with `mktemp -d`.
    const parent = tmpDir();
    assert.equal(fs.statSync(parent).mode & 0o777, 0o700);
    const dir = path.join(parent, 'data');
    const migrated = await run(['migrate'], { DATA_DIR: dir });
    assert.equal(migrated.code, 0, migrated.stderr);
    if (process.getuid?.() === 0) {
      // As root, Postgres runs as the postgres user: the parent gets the search bit only, and the log says so.
      assert.equal(fs.statSync(parent).mode & 0o777, 0o701);
      const opened = `${migrated.stdout}${migrated.stderr}`.split('\n').find((l) => l.includes('"event":"embedded_db_path_opened"'));
      assert.ok(opened, 'the permission change is logged');
      assert.ok((JSON.parse(opened) as { dirs: string[] }).dirs.includes(parent), opened);
    }
    const port = await freePort();
    const first = startServe(dir, port);
    const startMs = await waitHealthy(port, first.out);
    console.log(`# embedded default: healthy ${startMs} ms after spawn (first start, initdb included)`);
    const keyFile = path.join(dir, 'secrets-encryption-key');
    assert.equal(fs.statSync(keyFile).mode & 0o777, 0o600);
    const key = fs.readFileSync(keyFile, 'utf8');
    // The CLI attaches to the running embedded database.
    const doc = upstream.seed({ accountId: 'acct-embedded' });
    const seeded = await run(['seed', '-'], { DATA_DIR: dir }, JSON.stringify(doc));
    assert.equal(seeded.code, 0, seeded.stderr);
    const ready = await fetch(`http://127.0.0.1:${port}/readyz`);
    assert.equal(ready.status, 200);
    // npm itself dies of the signal (code null); the broker must have shut down in order.
    const firstStop = await stop(first.child);
    assert.ok(firstStop === 0 || firstStop === null, `stop: ${String(firstStop)}`);
    outputs.push(first.out());
    assert.match(first.out(), /"event":"embedded_db_stopped"/);
    assert.match(first.out(), /"event":"stopped"/);

    const second = startServe(dir, port);
    const restartMs = await waitHealthy(port, second.out);
    console.log(`# embedded default: healthy ${restartMs} ms after spawn (restart, data reused)`);
    assert.equal(fs.readFileSync(keyFile, 'utf8'), key);
    const r = await fetch(`http://127.0.0.1:${port}/readyz`);
    assert.equal(r.status, 200, 'the seeded login survived the restart');
    // SIGTERM to npm's pid alone must reach the broker: `npm start` once left it running,
    // orphaned with its Postgres, when only npm was signalled.
    const stopped = await stop(second.child, 'npm');
    outputs.push(second.out());
    assert.notEqual(stopped, 'orphaned', `the broker outlived npm: ${second.out().slice(-500)}`);
    assert.match(second.out(), /"event":"stopped"/);
    assert.match(second.out(), /"event":"embedded_db_stopped"/);
    assert.doesNotMatch(second.out(), /embedded_db_init/);
  });
});

test('no token value appears in any output of the CLI or the service', () => {
  assert.ok(outputs.length > 0);
  assert.deepEqual(findLeaks(outputs, [...upstream.issuedTokens(), KEY_B64]), []);
});
