import { strict as assert } from 'node:assert';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { test } from 'node:test';
import { SecretStore } from '../src/secret-store.js';
import { createPool, migrate } from '../src/db.js';
import { LogCapture } from './helpers/logs.js';
import { runProcess } from './helpers/process.js';
import { useSuite } from './helpers/suite.js';
import { waitFor } from './helpers/wait.js';
import { cliArgs } from './helpers/cli.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const suite = useSuite();

test('serve binds its port before the first refresh: a port already held fails the start with no upstream POST', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const key = randomBytes(32);
  const logs = new LogCapture();
  const pool = createPool(url, logs.logger, 1);
  try {
    await migrate(pool, logs.logger);
    const nowSec = Math.floor(Date.now() / 1000);
    // Due at once: a refresh loop that started before the bind would POST it.
    await new SecretStore(pool, key).put('CODEX_AUTH_JSON', JSON.stringify(upstream.seed({ iatSec: nowSec - 10 * 86_400 + 600, expSec: nowSec + 600 })));
  } finally {
    await pool.end();
  }
  const holder = net.createServer();
  await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
  const port = (holder.address() as { port: number }).port;
  try {
    const env: NodeJS.ProcessEnv = { PATH: process.env['PATH'], HOME: process.env['HOME'], DATABASE_URL: url, SECRETS_ENCRYPTION_KEY: key.toString('base64'), OAUTH_TOKEN_URL: upstream.url, HOST: '127.0.0.1', PORT: String(port) };
    const r = await runProcess(process.execPath, cliArgs(['serve']), { cwd: ROOT, env, input: '', timeoutMs: 120_000 });
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /EADDRINUSE/);
    assert.equal(upstream.posts, 0, 'no refresh before the port was bound');
  } finally {
    holder.close();
  }
});

test('build_info names the version and the replica; database_up is 1 while the replica is connected', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const t = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url, config: { replicaId: 'replica-info' } });
  const version = (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
  await waitFor('the listener connected', () => t.core.listener.connected);
  const body = (await t.app.inject({ url: '/metrics' })).body;
  assert.match(body, new RegExp(`^codex_broker_build_info\\{version="${version.replaceAll('.', '\\.')}",replica="replica-info"\\} 1$`, 'm'));
  assert.match(body, /^codex_broker_database_up 1$/m);
  await t.core.listener.close();
  assert.match((await t.app.inject({ url: '/metrics' })).body, /^codex_broker_database_up 0$/m);
});
