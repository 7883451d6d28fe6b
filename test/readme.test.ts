/**
 * The README's commands work as written. Every line of every `sh` block either runs here,
 * in the README's order, against a real Postgres, the strict fake upstream and a listening
 * broker, and exits 0, or is listed below as not runnable here, with the reason. The only
 * rewrites are the ones a reader makes: `127.0.0.1:8080` becomes the test broker's address,
 * `~` a temporary HOME holding a codex auth.json, and `<the client token>` the token the
 * README's own `clients add` printed. The compose block must also be the compose file's own
 * header, so the two never drift apart.
 */
import { strict as assert } from 'node:assert';
import * as fs from 'node:fs';
import type { AddressInfo } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, test } from 'node:test';
import { createTestApp, keyFor, type TestApp } from './helpers/app.js';
import { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { startTestPostgres, type TestPostgres } from './helpers/pg.js';
import { runProcess } from './helpers/process.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const README = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');

/** Commands that cannot run in this test, and why (each is covered elsewhere or needs what no test has). */
const NOT_RUNNABLE = new Map<string, string>([
  ['npm ci && npm start', 'starts a long-running server on port 8080; test/cli.test.ts runs this exact start command on the embedded default and waits for /healthz'],
  ['npm ci && npm test', 'the test command itself: .ci/run runs it'],
  ['npx codex-auth-broker login', 'waits for a person to approve a device code at the issuer; test/login-cli.test.ts runs it against the fake issuer'],
  ['npx codex-auth-broker login --browser', 'waits for a person to paste a callback URL; test/login-cli.test.ts runs it against the fake issuer'],
  ['ADMIN_TOKEN=$(openssl rand -hex 32) npm start', 'starts a long-running server; the admin routes it enables are exercised by test/workspace.test.ts and test/contract.test.ts'],
  ['cp .env.example .env', 'prepares the Docker Compose deployment, which needs a Docker engine (none on these machines); test/deploy.test.ts checks .env.example against the compose file'],
  ['docker compose up -d --build', 'no Docker engine on these machines; test/deploy.test.ts parses and checks the compose file and rebuilds the image layout'],
  ['docker compose --profile ha up -d --build', 'no Docker engine on these machines (see above)'],
  ['docker compose exec -T broker npx codex-auth-broker seed - < ~/.codex/auth.json', 'no Docker engine on these machines; the same seed from standard input runs in test/cli.test.ts ("seed reads standard input with -")'],
]);

/** The commands of every ```sh block, comments dropped, in order. */
function shCommands(markdown: string): string[] {
  const out: string[] = [];
  for (const m of markdown.matchAll(/^[ \t]*```sh\n([\s\S]*?)^[ \t]*```/gm)) {
    for (const line of m[1]!.split('\n')) {
      const cmd = line.replace(/\s+#\s.*$/, '').trim();
      if (cmd !== '' && !cmd.startsWith('#')) out.push(cmd);
    }
  }
  return out;
}

let pg: TestPostgres;
let upstream: FakeUpstream;
let broker: TestApp;
let home: string;
let env: NodeJS.ProcessEnv;
let address: string;

before(async () => {
  pg = await startTestPostgres();
  upstream = await FakeUpstream.start();
  const databaseUrl = await pg.newDatabase();
  broker = await createTestApp({ databaseUrl, upstreamUrl: upstream.url });
  await broker.app.listen({ port: 0, host: '127.0.0.1' });
  address = `127.0.0.1:${(broker.app.server.address() as AddressInfo).port}`;
  home = fs.mkdtempSync(path.join(os.tmpdir(), 'cab-readme-'));
  fs.mkdirSync(path.join(home, '.codex'), { recursive: true });
  fs.writeFileSync(path.join(home, '.codex', 'auth.json'), JSON.stringify(upstream.seed({ accountId: 'acct-readme' }), null, 2));
  // The worked example's logins (Several accounts): one auth.json per ChatGPT account.
  fs.mkdirSync(path.join(home, 'logins'));
  for (const name of ['research', 'batch-1', 'batch-2', 'batch-3']) {
    fs.writeFileSync(path.join(home, 'logins', `${name}.json`), JSON.stringify(upstream.seed({ accountId: `acct-${name}` }), null, 2));
  }
  env = {
    PATH: process.env['PATH'],
    HOME: home,
    DATABASE_URL: databaseUrl,
    SECRETS_ENCRYPTION_KEY: keyFor(databaseUrl).toString('base64'),
    OAUTH_TOKEN_URL: upstream.url,
    CODEX_HOME: path.join(home, 'workspace-codex'),
  };
});
after(async () => {
  await broker?.close();
  await upstream?.close();
  await pg?.stop();
  if (home) fs.rmSync(home, { recursive: true, force: true });
});

test('every command in the README runs as written, or is listed as not runnable here with the reason', { timeout: 600_000 }, async (t) => {
  const commands = shCommands(README);
  assert.ok(commands.length >= 10, `found ${commands.length} commands`);
  for (const listed of NOT_RUNNABLE.keys()) assert.ok(commands.includes(listed), `NOT_RUNNABLE lists a command the README no longer shows: ${listed}`);
  const outputs: string[] = [];
  let clientToken: string | undefined;
  let ran = 0;
  for (const command of commands) {
    if (NOT_RUNNABLE.has(command)) {
      t.diagnostic(`not run here: ${command} (${NOT_RUNNABLE.get(command)})`);
      continue;
    }
    let line = command.replaceAll('127.0.0.1:8080', address);
    if (line.includes('<the client token>')) {
      assert.ok(clientToken, `${command}: needs the token a README command printed earlier`);
      line = line.replaceAll('<the client token>', clientToken);
    }
    assert.doesNotMatch(line, /<[^>]+>/, `${command}: a placeholder the test cannot fill; list it in NOT_RUNNABLE with the reason`);
    const r = await runProcess('bash', ['-c', line], { cwd: ROOT, env, timeoutMs: 120_000 });
    outputs.push(r.stdout, r.stderr);
    assert.equal(r.code, 0, `README command failed: ${command}\n${r.stdout}\n${r.stderr}`);
    ran += 1;
    const token = /^token\s+(\S+)$/m.exec(r.stdout)?.[1];
    if (token) clientToken = token;
  }
  t.diagnostic(`${ran} commands ran, ${NOT_RUNNABLE.size} listed as not runnable here`);
  assert.ok(ran >= 5, 'the README shows commands a reader can run');
  // What the commands did: the login is stored, the client exists, the workspace got its auth.json.
  assert.equal(broker.core.refresher.current()?.account.accountId, 'acct-readme');
  const written = JSON.parse(fs.readFileSync(path.join(home, 'workspace-codex', 'auth.json'), 'utf8')) as { tokens: { access_token: string; refresh_token: string } };
  assert.equal(written.tokens.access_token, broker.core.refresher.current()?.parsed.tokens.access_token);
  assert.notEqual(written.tokens.refresh_token, broker.core.refresher.current()?.parsed.tokens.refresh_token, 'the workspace got its broker credential, not the upstream token');
  assert.deepEqual(findLeaks(outputs, upstream.issuedTokens()), [], 'no README command prints an upstream token');
});

test("the README's compose commands are the compose file's own header", () => {
  const header = fs
    .readFileSync(path.join(ROOT, 'docker-compose.yml'), 'utf8')
    .split('\n')
    .filter((l) => /^#\s{2,}\S/.test(l))
    .map((l) => l.replace(/^#\s+/, '').replace(/\s+#\s.*$/, '').trim());
  assert.ok(header.length >= 4, `compose header commands: ${header.join(' | ')}`);
  const readme = shCommands(README);
  for (const h of header) assert.ok(readme.includes(h), `docker-compose.yml shows "${h}", the README does not`);
  for (const must of ['GRAFANA_ADMIN_PASSWORD', 'up -d --build', 'exec -T']) assert.ok(README.includes(must), `the README mentions ${must}`);
});
