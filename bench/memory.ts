/**
 * npm run bench:memory: where the production process's RSS goes, point by point. Starts the
 * broker as deployed (bench/production.ts: 3 credentials, BENCH_CLIENTS clients), then
 * serves BENCH_MEMORY_REQUESTS GET /codex-auth; at each point it prints RSS split into
 * anonymous and file-backed pages (/proc smaps_rollup) beside V8's heap and external
 * memory (the broker's own /metrics), then every V8 heap space (used / committed).
 * BENCH_HEAP_SNAPSHOTS=dir also writes a V8 heap snapshot at each point (SIGUSR2,
 * --heapsnapshot-signal) for Chrome DevTools.
 * Prints a table; writes nothing else.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import autocannon from 'autocannon';
import { startTestPostgres } from '../test/helpers/pg.js';
import { CLIENTS, LOADED_CLIENTS } from './fleet.js';
import { imageNodeOptions, rssOf, startProduction } from './production.js';

const MB = 1024 * 1024;
const REQUESTS = Number(process.env['BENCH_MEMORY_REQUESTS'] ?? 1_000_000);
const SNAPSHOTS = process.env['BENCH_HEAP_SNAPSHOTS'];

function smaps(pid: number): { anon: number; file: number } {
  const text = fs.readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const kb = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? NaN) * 1024;
  return { anon: kb('Anonymous'), file: kb('Rss') - kb('Anonymous') };
}

function metric(text: string, name: string, labels = ''): number {
  const prefix = `${name}${labels ? `{${labels}}` : ''} `;
  const line = text.split('\n').find((l) => l.startsWith(prefix));
  return line ? Number(line.slice(line.lastIndexOf(' ') + 1)) : NaN;
}

async function main(): Promise<void> {
  if (SNAPSHOTS) fs.mkdirSync(SNAPSHOTS, { recursive: true });
  const extra = SNAPSHOTS ? ` --heapsnapshot-signal=SIGUSR2 --diagnostic-dir=${path.resolve(SNAPSHOTS)}` : '';
  process.env['BENCH_NODE_OPTIONS'] = `${imageNodeOptions()}${extra}`.trim();
  const pg = await startTestPostgres();
  const rows: string[][] = [];
  const spaceLines: string[] = [];
  try {
    const prod = await startProduction(await pg.newDatabase(), CLIENTS, LOADED_CLIENTS);
    try {
      const point = async (label: string) => {
        await new Promise((r) => setTimeout(r, 2_000));
        const text = await (await fetch(`${prod.base}/metrics`)).text();
        const m = smaps(prod.pid);
        const mb = (x: number) => (x / MB).toFixed(1);
        rows.push([
          label,
          mb(rssOf(prod.pid)),
          mb(m.anon),
          mb(m.file),
          mb(metric(text, 'codex_broker_nodejs_heap_size_total_bytes')),
          mb(metric(text, 'codex_broker_nodejs_heap_size_used_bytes')),
          mb(metric(text, 'codex_broker_nodejs_heap_space_size_used_bytes', 'space="old"')),
          mb(metric(text, 'codex_broker_nodejs_heap_space_size_total_bytes', 'space="new"')),
          mb(metric(text, 'codex_broker_nodejs_external_memory_bytes')),
        ]);
        const spaces = [...text.matchAll(/^codex_broker_nodejs_heap_space_size_(total|used)_bytes\{space="(\w+)"\} (\S+)$/gm)];
        const bySpace = new Map<string, { total: number; used: number }>();
        for (const [, kind, space, value] of spaces) {
          const e = bySpace.get(space ?? '') ?? { total: 0, used: 0 };
          e[kind as 'total' | 'used'] = Number(value);
          bySpace.set(space ?? '', e);
        }
        spaceLines.push(`${label}: ${[...bySpace].map(([k, v]) => `${k} ${mb(v.used)}/${mb(v.total)}`).join(', ')} (used/total MB)`);
        if (SNAPSHOTS) {
          const before = new Set(fs.readdirSync(SNAPSHOTS));
          process.kill(prod.pid, 'SIGUSR2');
          for (let i = 0; i < 600 && fs.readdirSync(SNAPSHOTS).every((f) => before.has(f)); i++) await new Promise((r) => setTimeout(r, 100));
          await new Promise((r) => setTimeout(r, 3_000));
          const made = fs.readdirSync(SNAPSHOTS).filter((f) => !before.has(f));
          for (const f of made) fs.renameSync(path.join(SNAPSHOTS, f), path.join(SNAPSHOTS, `${label.replace(/[^a-z0-9]+/gi, '-')}.heapsnapshot`));
        }
        console.log(rows.at(-1)?.join('  '));
      };
      console.log(`${prod.command} (pid ${prod.pid}): ${prod.clientCount} clients; RSS at start ${(prod.rss.afterStart / MB).toFixed(1)} MB, seeded ${(prod.rss.afterSeed / MB).toFixed(1)} MB, clients loaded ${(prod.rss.afterClients / MB).toFixed(1)} MB`);
      await point(`${prod.clientCount} clients loaded`);
      let i = 0;
      const r = await autocannon({
        url: prod.base,
        connections: 50,
        amount: REQUESTS,
        requests: [{ setupRequest: (req) => ({ ...req, headers: { authorization: `Bearer ${prod.clients[i++ % prod.clients.length]?.token ?? ''}` } }) }],
      });
      await point(`after ${r.requests.total} GET /codex-auth`);
      console.log(
        [
          '| point | RSS | anonymous | file-backed | V8 heap total | V8 heap used | old space used | new space total | external |',
          '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
          ...rows.map((x) => `| ${x.join(' | ')} |`),
          '',
          'V8 heap spaces:',
          ...spaceLines.map((l) => `- ${l}`),
        ].join('\n'),
      );
    } finally {
      await prod.stop();
    }
  } finally {
    await pg.stop();
  }
}

await main();
