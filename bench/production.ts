/**
 * The broker as deployed, started for the bench and its probes: `node dist/cli.js serve`
 * with the image's NODE_OPTIONS, holding the bench fleet (bench/fleet.ts). Also the
 * process helpers the bench shares (pinning, CPU and RSS from /proc).
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { loadCredentialSecret, CLIENTS_CHANNEL } from '../src/clients/credentials.js';
import { bulkInsert } from '../test/helpers/bulk-clients.js';
import { FakeUpstream } from '../test/helpers/fake-upstream.js';
import { freePort } from '../test/helpers/pg.js';
import { CREDENTIALS } from './fleet.js';
import type { ServeInfo } from './server.js';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

// Two cores shared by the servers and the load generator make every number swing with the
// scheduler. Pinned, the server under test has a core of its own and autocannon the other:
// the server's CPU cost per request is what the ratios then compare.
export const CPU_COUNT = os.cpus().length;
export const SERVER_CPU = String(CPU_COUNT - 1);
export const PIN = process.env['BENCH_PIN'] !== '0' && CPU_COUNT >= 2 && spawnSync('taskset', ['-V']).status === 0;
if (PIN) execFileSync('taskset', ['-p', '-c', '0', String(process.pid)], { stdio: 'ignore' });
/** The command line for a server process, pinned to SERVER_CPU when pinning. */
export function serverCommand(args: string[]): [string, string[]] {
  return PIN ? ['taskset', ['-c', SERVER_CPU, process.execPath, ...args]] : [process.execPath, args];
}


/** A bench/server.ts process (pinned to SERVER_CPU when pinning) and the JSON line it prints once ready. */
export function startServer(mode: 'serve' | 'refresh' | 'limits', databaseUrl: string, extraArgs: string[] = [], extraEnv: NodeJS.ProcessEnv = {}): { child: ChildProcess; firstLine: Promise<string> } {
  const [cmd, args] = serverCommand([...extraArgs, '--import', 'tsx', path.join(root, 'bench/server.ts'), mode]);
  const child = spawn(cmd, args, {
    cwd: root,
    env: { ...process.env, DATABASE_URL: databaseUrl, ...extraEnv },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const firstLine = new Promise<string>((resolve, reject) => {
    let buf = '';
    child.stdout?.on('data', (d: Buffer) => {
      buf += d.toString('utf8');
      const nl = buf.indexOf('\n');
      if (nl >= 0) resolve(buf.slice(0, nl));
    });
    child.once('exit', (code) => reject(new Error(`bench/server.ts ${mode} exited (${String(code)}) before reporting`)));
  });
  return { child, firstLine };
}

export async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await exited;
}

export const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100;
/** CPU time a process has used (all threads), user and system, in microseconds, from /proc. */
export function cpuSplitOf(pid: number): { user: number; sys: number } {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may contain spaces): utime and stime are 14 and 15.
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { user: (Number(f[11]) * 1e6) / CLK_TCK, sys: (Number(f[12]) * 1e6) / CLK_TCK };
}

export function rssOf(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : NaN;
}


export function imageNodeOptions(): string {
  // BENCH_NODE_OPTIONS: an experiment's flags instead of the image's (e.g. '' for V8's defaults).
  if (process.env['BENCH_NODE_OPTIONS'] !== undefined) return process.env['BENCH_NODE_OPTIONS'];
  const m = /NODE_OPTIONS=("[^"]*"|\S+)/.exec(fs.readFileSync(path.join(root, 'Dockerfile'), 'utf8'));
  return m?.[1]?.replace(/^"|"$/g, '') ?? '';
}

/**
 * The glibc malloc settings of the image's ENV (MALLOC_ARENA_MAX), as `K=V` pairs: the
 * production process runs with them, and BENCH_SERVER_ENV can override them (e.g.
 * MALLOC_ARENA_MAX=0, glibc's default of 8 arenas per core).
 */
export function imageMallocEnv(): Record<string, string> {
  const out: Record<string, string> = {};
  for (const m of fs.readFileSync(path.join(root, 'Dockerfile'), 'utf8').replace(/^\s*#.*$/gm, '').matchAll(/\b(MALLOC_[A-Z_]+)=(\S+)/g)) out[m[1] ?? ''] = m[2] ?? '';
  return out;
}

/** The node flags of the image's CMD (`node <flags> dist/cli.js serve`): V8 flags NODE_OPTIONS refuses. */
export function imageNodeArgs(): string[] {
  // BENCH_CMD_ARGS: an experiment's node flags instead of the CMD's (e.g. '' for V8's defaults).
  if (process.env['BENCH_CMD_ARGS'] !== undefined) return process.env['BENCH_CMD_ARGS'].split(' ').filter(Boolean);
  const m = /^CMD\s+(\[.*\])\s*$/m.exec(fs.readFileSync(path.join(root, 'Dockerfile'), 'utf8'));
  const cmd = m?.[1] ? (JSON.parse(m[1]) as string[]) : [];
  const script = cmd.indexOf('dist/cli.js');
  return cmd[0] === 'node' && script > 0 ? cmd.slice(1, script) : [];
}

/** The image's node flags, then BENCH_NODE_ARGS: more flags NODE_OPTIONS refuses (e.g. --cpu-prof --cpu-prof-dir=DIR), for a profile of the production process. */
function nodeArgs(): string[] {
  return [...imageNodeArgs(), ...(process.env['BENCH_NODE_ARGS'] ?? '').split(' ').filter(Boolean)];
}

export interface Production {
  command: string;
  pid: number;
  base: string;
  port: number;
  clients: ServeInfo['clients'];
  clientCount: number;
  /** Clients per credential, as stored. */
  assigned: Record<string, number>;
  /** The loaded clients (the load rotates over them) per credential served. */
  servedBy: Record<string, number>;
  body: string;
  /** With `inProcessBare`: the bare Fastify route served from this same process (bench/in-process-bare.mjs). */
  inProcessBare?: string;
  rss: { afterStart: number; afterSeed: number; afterClients: number };
  stop(): Promise<void>;
}

/**
 * The broker as it is deployed: `node dist/cli.js serve` (built first) with the image's
 * NODE_OPTIONS, on its own database, seeded through the admin API, with clientCount
 * clients inserted in the shape createClient writes and loaded through NOTIFY.
 */
/**
 * `cwd`: the production process's working directory (default the checkout): where V8 writes
 * what it writes there, such as `--perf-prof`'s jit-PID.dump (bench/profile.ts).
 */
export async function startProduction(databaseUrl: string, clientCount: number, loaded: number, o: { build?: boolean; inProcessBare?: boolean; cwd?: string } = {}): Promise<Production> {
  if (o.build !== false) {
    const build = spawnSync('npm', ['run', '--silent', 'build'], { cwd: root, stdio: 'inherit' });
    if (build.status !== 0) throw new Error('npm run build failed');
  }
  const upstream = await FakeUpstream.start();
  const key = randomBytes(32);
  const admin = `bench-admin-${randomBytes(16).toString('hex')}`;
  const port = await freePort();
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cab-bench-'));
  const nodeOptions = imageNodeOptions();
  const env: NodeJS.ProcessEnv = {
    PATH: process.env['PATH'],
    HOME: process.env['HOME'],
    NODE_OPTIONS: nodeOptions,
    ...imageMallocEnv(),
    DATABASE_URL: databaseUrl,
    SECRETS_ENCRYPTION_KEY: key.toString('base64'),
    ADMIN_TOKEN: admin,
    OAUTH_TOKEN_URL: upstream.url,
    PORT: String(port),
    HOST: '127.0.0.1',
    DATA_DIR: dataDir,
    LOG_LEVEL: 'warn',
  };
  // BENCH_SERVER_ENV='K=V K2=V2': more environment for the production process (e.g. MALLOC_ARENA_MAX=0: glibc's default).
  for (const kv of (process.env['BENCH_SERVER_ENV'] ?? '').split(' ').filter(Boolean)) {
    const i = kv.indexOf('=');
    if (i <= 0) throw new Error(`BENCH_SERVER_ENV: ${kv} is not K=V`);
    env[kv.slice(0, i)] = kv.slice(i + 1);
  }
  // The bare route inside this process (a bench-only preload; the image never loads it).
  const bareFile = path.join(dataDir, 'in-process-bare-port');
  const preload = o.inProcessBare ? ['--import', path.join(root, 'bench/in-process-bare.mjs')] : [];
  if (o.inProcessBare) env['BENCH_IN_PROCESS_BARE_FILE'] = bareFile;
  const [cmd, args] = serverCommand([...nodeArgs(), ...preload, path.join(root, 'dist/cli.js'), 'serve']);
  // BENCH_SERVER_STDOUT=file keeps what the process prints on stdout (e.g. with --trace-gc).
  const stdoutFile = process.env['BENCH_SERVER_STDOUT'];
  const child = spawn(cmd, args, { cwd: o.cwd ?? root, env, stdio: ['ignore', stdoutFile ? fs.openSync(stdoutFile, 'w') : 'ignore', 'inherit'] });
  const pool = new pg.Pool({ connectionString: databaseUrl, max: 2 });
  const base = `http://127.0.0.1:${port}`;
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
  const stop = async () => {
    await stopChild(child);
    await pool.end().catch(() => undefined);
    await upstream.close();
    fs.rmSync(dataDir, { recursive: true, force: true });
  };
  try {
    const pid = child.pid ?? 0;
    for (let i = 0; ; i++) {
      if (child.exitCode !== null) throw new Error(`dist/cli.js serve exited with ${child.exitCode}`);
      const ok = await fetch(`${base}/healthz`).then((r) => r.ok, () => false);
      if (ok) break;
      if (i > 600) throw new Error('dist/cli.js serve did not answer /healthz within 60 s');
      await sleep(100);
    }
    await sleep(1_000);
    const afterStart = rssOf(pid);
    // Every credential of the one pool, each its own login (account): `default` and the named ones.
    for (const name of CREDENTIALS) {
      const url = name === 'default' ? `${base}/admin/credential` : `${base}/admin/credentials/${name}`;
      const seeded = await fetch(url, { method: 'PUT', headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' }, body: JSON.stringify(upstream.seed({ accountId: `bench-${name}` })) });
      if (seeded.status !== 200) throw new Error(`seed ${name}: ${seeded.status} ${await seeded.text()}`);
    }
    const afterSeed = rssOf(pid);

    const secret = await loadCredentialSecret(pool, key);
    const workspaceId = (i: number) => `00000000-0000-4000-8000-${String(i).padStart(12, '0')}`;
    const bulk = bulkInsert(secret, clientCount, { prefix: 'bench', workspaceId });
    const { tokens } = bulk;
    await pool.query(bulk.text, bulk.values);
    await pool.query(`NOTIFY ${CLIENTS_CHANNEL}`);
    const get = (token: string) => fetch(`${base}/codex-auth`, { headers: { authorization: `Bearer ${token}` } });
    for (let i = 0; ; i++) {
      const r = await get(tokens[clientCount - 1] ?? '');
      await r.arrayBuffer();
      if (r.status === 200) break;
      if (i > 300) throw new Error(`the ${clientCount} clients did not load (last GET: ${r.status})`);
      await sleep(100);
    }
    // The reload makes the broker store an assignment for every client (one statement) and
    // reload them once more: serving then reads each client's stored credential.
    const spread = async () =>
      (await pool.query<{ credential: string | null; n: string }>('SELECT assigned_credential AS credential, count(*) AS n FROM broker_clients GROUP BY 1 ORDER BY 1')).rows;
    for (let i = 0; ; i++) {
      const rows = await spread();
      if (rows.every((r) => r.credential !== null) && rows.length === CREDENTIALS.length) break;
      if (i > 300) throw new Error(`the ${clientCount} clients were not assigned: ${JSON.stringify(rows)}`);
      await sleep(100);
    }
    await sleep(1_000);
    const assigned = Object.fromEntries((await spread()).map((r) => [r.credential ?? '', Number(r.n)]));
    const afterClients = rssOf(pid);

    // What a workspace holds after a sync, for the 304 and shim cases.
    const clients: ServeInfo['clients'] = [];
    const servedBy: Record<string, number> = {};
    let body = '';
    for (let i = 0; i < loaded; i++) {
      const token = tokens[i] ?? '';
      const r = await get(token);
      if (r.status !== 200) throw new Error(`GET /codex-auth: ${r.status}`);
      const text = await r.text();
      body ||= text;
      const doc = JSON.parse(text) as { tokens: { refresh_token: string } };
      const credential = r.headers.get('x-codex-credential') ?? '';
      servedBy[credential] = (servedBy[credential] ?? 0) + 1;
      clients.push({ token, etag: r.headers.get('etag') ?? '', refresh: doc.tokens.refresh_token.split('.')[0] ?? '', workspaceId: workspaceId(i) });
    }
    if (Object.keys(servedBy).length !== CREDENTIALS.length) throw new Error(`the loaded clients are not served every credential: ${JSON.stringify(servedBy)}`);
    let inProcessBare: string | undefined;
    if (o.inProcessBare) {
      inProcessBare = `http://127.0.0.1:${fs.readFileSync(bareFile, 'utf8')}`;
      const set = await fetch(`${inProcessBare}/body`, { method: 'PUT', headers: { 'content-type': 'text/plain' }, body });
      if (set.status !== 204) throw new Error(`in-process bare route: PUT /body ${set.status}`);
    }
    return {
      command: `${Object.entries(env).filter(([k, v]) => k.startsWith('MALLOC_') && v).map(([k, v]) => `${k}=${v} `).join('')}${nodeOptions ? `NODE_OPTIONS=${nodeOptions} ` : ''}${['node', ...imageNodeArgs(), 'dist/cli.js', 'serve'].join(' ')}`,
      pid,
      base,
      port,
      clients,
      clientCount,
      assigned,
      servedBy,
      body,
      ...(inProcessBare ? { inProcessBare } : {}),
      rss: { afterStart, afterSeed, afterClients },
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

