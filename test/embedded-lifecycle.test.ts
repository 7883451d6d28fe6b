import { strict as assert } from 'node:assert';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { beforeEach, test } from 'node:test';
import { freePort } from './helpers/pg.js';
import { runProcess } from './helpers/process.js';
import { cleanEnv, logEvents, pidAlive, spawnServe, statusOf, type Serve } from './helpers/serve.js';
import { tempDirs } from './helpers/tmp.js';
import { waitFor } from './helpers/wait.js';
import { cliArgs } from './helpers/cli.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const tmp = tempDirs('cab-embedded-');

/**
 * One data directory for the whole file, under a 0700 parent like `mktemp -d`: initdb runs
 * once. Every test starts and ends with no Postgres running in it.
 */
const dir = path.join(tmp(), 'data');
beforeEach(() => assert.equal(fs.existsSync(path.join(dir, 'postgres', 'postmaster.pid')), false, 'no Postgres left by an earlier test'));

/** The postmaster's pid, from DATA_DIR/postgres/postmaster.pid. */
function postmasterPid(): number {
  return Number(fs.readFileSync(path.join(dir, 'postgres', 'postmaster.pid'), 'utf8').split('\n')[0]);
}

async function serveEmbedded(extra: Record<string, string> = {}): Promise<Serve> {
  const b = spawnServe({ DATA_DIR: dir, PORT: String(await freePort()), MAX_EVENT_LOOP_DELAY_MS: '0', ...extra });
  await waitFor('the broker answering /healthz', async () => (await statusOf(b.port)) === 200, 120_000, b.out);
  return b;
}

function cli(args: string[]) {
  return runProcess(process.execPath, cliArgs(args), { cwd: ROOT, env: cleanEnv({ DATA_DIR: dir, LOG_LEVEL: 'info' }), timeoutMs: 120_000 });
}

test('a shutdown held past its deadline still stops the embedded Postgres before exiting', async () => {
  // Long connection deadlines, so that one half-sent request holds the HTTP server's close.
  const b = await serveEmbedded({
    SHUTDOWN_TIMEOUT_SECONDS: '0.5',
    HTTP_CONNECTION_TIMEOUT_SECONDS: '600',
    HTTP_HEADERS_TIMEOUT_SECONDS: '600',
    HTTP_REQUEST_TIMEOUT_SECONDS: '600',
  });
  const pg = postmasterPid();
  assert.ok(pidAlive(pg));
  const holder = net.connect(b.port, '127.0.0.1');
  holder.on('error', () => undefined);
  await new Promise((r) => holder.once('connect', r));
  holder.write('GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n');
  // Give the broker time to read the half request: a connection it has parsed nothing from
  // yet counts as idle, and close() would drop it instead of waiting on it.
  await new Promise((r) => setTimeout(r, 300));
  try {
    process.kill(b.pid, 'SIGTERM');
    const ended = await b.exited;
    assert.equal(ended.code, 1, b.out().slice(-2000));
    assert.equal(logEvents(b.out(), 'shutdown_timeout').length, 1, 'the deadline ran out');
    assert.equal(logEvents(b.out(), 'stopped').length, 0, 'the orderly shutdown never finished');
    assert.equal(logEvents(b.out(), 'embedded_db_stopped').length, 1);
    assert.equal(pidAlive(pg), false, `the postmaster (pid ${pg}) is gone`);
  } finally {
    holder.destroy();
  }
});

test('a serve that finds the embedded Postgres of a killed serve takes it over and stops it on exit, while a CLI command beside a live serve leaves it running', async () => {
  const first = await serveEmbedded();
  const pg = postmasterPid();

  // The CLI attaches to a live broker's database and must not stop it.
  const status = await cli(['status']);
  assert.equal(status.code, 3, status.stderr); // no credential stored yet
  assert.match(status.stderr, /"event":"embedded_db_attached"/);
  assert.ok(pidAlive(pg), 'the CLI left the live broker its database');
  assert.equal(await statusOf(first.port), 200);

  process.kill(first.pid, 'SIGKILL');
  await first.exited;
  assert.ok(pidAlive(pg), 'a SIGKILL leaves the postmaster behind: the orphan under test');

  const second = await serveEmbedded();
  const adopted = logEvents(second.out(), 'embedded_db_adopted');
  assert.equal(adopted.length, 1, second.out().slice(-2000));
  assert.equal(adopted[0]?.['pid'], pg);
  assert.equal(adopted[0]?.['previousOwner'], first.pid);
  assert.equal(postmasterPid(), pg, 'the same postmaster, not a second one');
  process.kill(second.pid, 'SIGTERM');
  assert.equal((await second.exited).code, 0, second.out().slice(-2000));
  assert.equal(logEvents(second.out(), 'embedded_db_stopped').length, 1);
  assert.equal(pidAlive(pg), false, `the adopted postmaster (pid ${pg}) is gone`);
});

test('a CLI command that finds an orphaned embedded Postgres uses it and stops it; without an owner file, a live parent counts as the owner', async () => {
  const b = await serveEmbedded();
  const pg = postmasterPid();
  // As a broker from before the owner file left it: its live parent (the serve) owns it.
  fs.rmSync(path.join(dir, 'postgres.owner'));
  const beside = await cli(['status']);
  assert.match(beside.stderr, /"event":"embedded_db_attached"/);
  assert.ok(pidAlive(pg), 'the live broker keeps its database');
  process.kill(b.pid, 'SIGKILL');
  await b.exited;
  const status = await cli(['status']);
  assert.equal(status.code, 3, status.stderr);
  assert.match(status.stderr, /"event":"embedded_db_adopted"/);
  assert.equal(pidAlive(pg), false, `the orphaned postmaster (pid ${pg}) is gone`);
});

test('a serve that cannot listen stops the embedded Postgres it started', async () => {
  const holder = net.createServer();
  await new Promise<void>((r) => holder.listen(0, '127.0.0.1', r));
  try {
    const port = (holder.address() as net.AddressInfo).port;
    const b = spawnServe({ DATA_DIR: dir, PORT: String(port) });
    const ended = await b.exited;
    assert.equal(ended.code, 1, b.out().slice(-2000));
    assert.equal(logEvents(b.out(), 'embedded_db_started').length, 1);
    assert.equal(logEvents(b.out(), 'embedded_db_stopped').length, 1);
    assert.equal(fs.existsSync(path.join(dir, 'postgres', 'postmaster.pid')), false, 'no postmaster left');
  } finally {
    holder.close();
  }
});
