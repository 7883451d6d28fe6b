/**
 * npm run bench:reload: what one reload of the client registry costs with BENCH_CLIENTS
 * clients (10,000): CPU and wall time per reload, and the bytes each reload leaves promoted
 * into the old generation (V8's --trace-gc-nvp, summed over the reloads). The broker
 * reloads at start, on every NOTIFY on the clients channel and every 30 s as a safety net
 * (5 s with PLATFORM_WORKSPACE_TOKENS), while it serves: what a reload promotes is what
 * brings the next full GC, and RSS steps up at each. BENCH_RELOADS (20) reloads, with a
 * background of short-lived allocations like serving's (BENCH_RELOAD_IDLE=1: without).
 * Prints; writes nothing.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { loadCredentialSecret } from '../src/clients/credentials.js';
import { ClientRegistry } from '../src/clients/registry.js';
import { migrate } from '../src/db.js';
import { bulkInsert } from '../test/helpers/bulk-clients.js';
import { LogCapture } from '../test/helpers/logs.js';
import { startTestPostgres } from '../test/helpers/pg.js';
import { CLIENTS } from './fleet.js';

const RELOADS = Number(process.env['BENCH_RELOADS'] ?? 20);
const IDLE = process.env['BENCH_RELOAD_IDLE'] === '1';
const here = fileURLToPath(import.meta.url);

async function child(url: string, key: string): Promise<void> {
  const logs = new LogCapture();
  const pool = new pg.Pool({ connectionString: url, max: 4 });
  const secret = await loadCredentialSecret(pool, Buffer.from(key, 'base64'));
  const registry = new ClientRegistry({ pool, logger: logs.logger, credentialSecret: secret, platformTokens: false });
  await registry.reload();
  // Serving's garbage: about 9.7 KB a request, short-lived.
  let sink: unknown[] = [];
  const background = IDLE ? undefined : setInterval(() => {
    sink = [];
    for (let i = 0; i < 3_000; i++) sink.push({ i, s: `r${i}` });
  }, 1);
  await registry.reload();
  console.log('RELOADS-BEGIN');
  const cpu = process.cpuUsage();
  const t0 = performance.now();
  for (let i = 0; i < RELOADS; i++) await registry.reload();
  const used = process.cpuUsage(cpu);
  const wall = performance.now() - t0;
  console.log('RELOADS-END');
  if (background) clearInterval(background);
  console.log(JSON.stringify({ clients: registry.size, cpuMs: (used.user + used.system) / 1000 / RELOADS, wallMs: wall / RELOADS, sink: sink.length > 0 }));
  await pool.end();
}

async function main(): Promise<void> {
  const pgs = await startTestPostgres();
  try {
    const url = await pgs.newDatabase();
    const pool = new pg.Pool({ connectionString: url, max: 2 });
    const logs = new LogCapture();
    await migrate(pool, logs.logger);
    const key = randomBytes(32);
    const secret = await loadCredentialSecret(pool, key);
    const bulk = bulkInsert(secret, CLIENTS, { prefix: 'reload', workspaceId: (i) => `00000000-0000-4000-8000-${String(i).padStart(12, '0')}` });
    await pool.query(bulk.text, bulk.values);
    // As a served fleet has them: assigned, seen, with a generation.
    await pool.query("UPDATE broker_clients SET assigned_credential = 'default', last_used_at = now(), last_served_generation = 'g-1'");
    await pool.end();
    const out = await new Promise<string>((resolve, reject) => {
      const c = spawn(process.execPath, ['--import', 'tsx', '--max-semi-space-size=8', '--heap-growing-percent=20', '--trace-gc-nvp', here, 'child', url, key.toString('base64')], {
        cwd: path.resolve(path.dirname(here), '..'),
        stdio: ['ignore', 'pipe', 'inherit'],
      });
      let text = '';
      c.stdout.on('data', (d: Buffer) => (text += d.toString()));
      c.once('error', reject);
      c.once('close', (code) => (code === 0 ? resolve(text) : reject(new Error(`the reload child exited with ${String(code)}`))));
    });
    const lines = out.split('\n');
    const inside = lines.slice(lines.indexOf('RELOADS-BEGIN') + 1, lines.indexOf('RELOADS-END'));
    let promoted = 0;
    let scavenges = 0;
    let fullGcs = 0;
    for (const l of inside) {
      if (/\bgc=s\b/.test(l)) {
        scavenges += 1;
        promoted += Number(/\bpromoted=(\d+)/.exec(l)?.[1] ?? 0);
      } else if (/\bgc=mc\b/.test(l)) fullGcs += 1;
    }
    const result = JSON.parse(lines.find((l) => l.startsWith('{"clients"')) ?? '{}') as { clients: number; cpuMs: number; wallMs: number };
    console.log(
      `${result.clients} clients, ${RELOADS} reloads${IDLE ? '' : ' beside short-lived allocations'}: ${result.cpuMs.toFixed(1)} ms of CPU and ${result.wallMs.toFixed(1)} ms per reload; ` +
        `${(promoted / RELOADS / 1024).toFixed(0)} KB promoted per reload (${scavenges} scavenges, ${fullGcs} full GCs during them)`,
    );
  } finally {
    await pgs.stop();
  }
}

if (process.argv[2] === 'child') await child(process.argv[3] ?? '', process.argv[4] ?? '');
else await main();
