import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { after } from 'node:test';
import { cliArgs } from './cli.js';

const ROOT = path.resolve(import.meta.dirname, '..', '..');

/** The environment a user would have: none of the broker's variables unless given. */
export function cleanEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (/^(PORT|HOST|DATABASE_URL|DATA_DIR|SECRETS_ENCRYPTION_KEY|ADMIN_TOKEN|LOG_LEVEL|BROKER_ENV|MOLECULE_ENV|NODE_TEST_CONTEXT|REPLICA_ID|MAX_CONNECTIONS|HTTP_\w+)$/.test(k)) continue;
    env[k] = v;
  }
  return { ...env, ...extra };
}

export interface Serve {
  child: ChildProcess;
  pid: number;
  port: number;
  out: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  alive: () => boolean;
}

const children = new Set<ChildProcess>();
after(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
});

/**
 * `codex-auth-broker serve` as its own process, JSON logs kept. With openFiles, it runs
 * under `ulimit -n` (bash execs node, so the pid is the broker's).
 */
export function spawnServe(env: Record<string, string>, o: { openFiles?: number } = {}): Serve {
  // Under `ulimit -n` too, what npm test built (dist/) runs, as in the image. (The broker
  // starts under 160 descriptors; TypeBox's 247 ES modules, opened at once by node's loader,
  // once failed it there with EMFILE. config.ts no longer uses TypeBox.)
  const node = [process.execPath, ...cliArgs(['serve'])];
  const [cmd, args] = o.openFiles === undefined ? [node[0] ?? '', node.slice(1)] : ['bash', ['-c', `ulimit -n ${o.openFiles} && exec "$@"`, 'bash', ...node]];
  const child = spawn(cmd, args, { cwd: ROOT, env: cleanEnv({ LOG_LEVEL: 'info', LOG_FORMAT: 'json', HOST: '127.0.0.1', ...env }), stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  let out = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once('close', (code, signal) => resolve({ code, signal })));
  return { child, pid: child.pid ?? 0, port: Number(env['PORT']), out: () => out, exited, alive: () => child.exitCode === null && child.signalCode === null };
}

/** The JSON log lines with this event. */
export function logEvents(out: string, event: string): Array<Record<string, unknown>> {
  const found: Array<Record<string, unknown>> = [];
  for (const l of out.split('\n')) {
    if (!l.startsWith('{')) continue;
    try {
      const e = JSON.parse(l) as Record<string, unknown>;
      if (e['event'] === event) found.push(e);
    } catch {
      /* not a log line */
    }
  }
  return found;
}

/** The status of GET path on a fresh connection; 0 when it could not be had (refused, reset, timed out). */
export function statusOf(port: number, p = '/healthz'): Promise<number> {
  return new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port, path: p, agent: false, timeout: 2_000 }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
      res.on('error', () => resolve(0));
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(0));
  });
}

/** How many file descriptors the process holds (Linux /proc). */
export function openFds(pid: number): number {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

/** Is the process (by pid) still there? */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * `serve` with a module of the test's own run before the broker's (NODE_OPTIONS=--import of
 * its inline source). Such a module reports by writing `<prefix> <JSON>` to stderr at exit:
 * stopAndRead reads it.
 */
export function spawnServePreloaded(env: Record<string, string>, preload: string): Serve {
  return spawnServe({ ...env, MAX_EVENT_LOOP_DELAY_MS: '0', NODE_OPTIONS: `--import=data:text/javascript,${encodeURIComponent(preload)}` });
}

/** SIGTERM, a clean exit, then the JSON its preloaded module wrote after `prefix `. */
export async function stopAndRead<T>(b: Serve, prefix: string): Promise<T> {
  process.kill(b.pid, 'SIGTERM');
  const exited = await b.exited;
  if (exited.code !== 0) throw new Error(`serve exited with ${exited.code ?? exited.signal}: ${b.out().slice(-2000)}`);
  const line = b.out().split('\n').find((l) => l.startsWith(`${prefix} `));
  if (!line) throw new Error(`no ${prefix} line from the broker: ${b.out().slice(-2000)}`);
  return JSON.parse(line.slice(prefix.length + 1)) as T;
}
