/**
 * npm run bench:alloc: what each request allocates, garbage included, by function, for the
 * bare Fastify route and the broker's serving routes in one harness process
 * (bench/server.ts serve: 3 credentials, BENCH_CLIENTS clients). V8's sampling heap
 * profiler (node:inspector, every 1 KiB, objects later collected by either GC kept) over
 * BENCH_SECONDS (5) of load per case after a 2 s warm-up (pinned like the bench when pinning). Allocation drives the young
 * generation's collections and what gets promoted, so it explains CPU and RSS alike, and
 * unlike CPU time it barely moves with other work on the machine. Prints; writes nothing
 * else (BENCH_ALLOC_DIR=dir keeps each .heapprofile for Chrome DevTools).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import autocannon from 'autocannon';
import { startTestPostgres } from '../test/helpers/pg.js';
import { root, startServer, stopChild } from './production.js';
import type { ServeInfo } from './server.js';

interface ProfileNode {
  callFrame: { functionName: string; url: string; lineNumber: number };
  selfSize: number;
  children: ProfileNode[];
}
type Spec = NonNullable<Parameters<typeof autocannon>[0]['requests']>[number];

const SECONDS = Number(process.env['BENCH_SECONDS'] ?? 5);
const TOP = Number(process.env['BENCH_TOP'] ?? 20);
const KEEP = process.env['BENCH_ALLOC_DIR'];

function rotating(make: (i: number) => Record<string, string>): Spec {
  let i = 0;
  return { setupRequest: (req) => ({ ...req, headers: make(i++) }) };
}

async function main(): Promise<void> {
  const pg = await startTestPostgres();
  const server = startServer('serve', await pg.newDatabase(), ['--max-semi-space-size=2']);
  try {
    const info = JSON.parse(await server.firstLine) as ServeInfo;
    const clientAt = (i: number) => info.clients[i % info.clients.length] ?? { token: '', etag: '', workspaceId: '' };
    const broker = `http://127.0.0.1:${info.brokerPort}`;
    const cases: Array<{ name: string; url: string; spec: Spec }> = [
      { name: 'bare Fastify route', url: `http://127.0.0.1:${info.fastifyPort}/codex-auth`, spec: rotating(() => ({})) },
      { name: 'GET /codex-auth 200', url: `${broker}/codex-auth`, spec: rotating((i) => ({ authorization: `Bearer ${clientAt(i).token}` })) },
      { name: 'GET /codex-auth 304', url: `${broker}/codex-auth`, spec: rotating((i) => ({ authorization: `Bearer ${clientAt(i).token}`, 'if-none-match': clientAt(i).etag })) },
      { name: 'GET /healthz', url: `${broker}/healthz`, spec: rotating(() => ({})) },
    ];
    const control = `http://127.0.0.1:${info.controlPort}`;
    const summary: string[] = [];
    for (const c of cases) {
      await autocannon({ url: c.url, connections: 50, duration: 2, requests: [c.spec] });
      await fetch(`${control}/alloc/start`, { method: 'POST' });
      const r = await autocannon({ url: c.url, connections: 50, duration: SECONDS, requests: [c.spec] });
      const profile = (await (await fetch(`${control}/alloc/stop`, { method: 'POST' })).json()) as { head: ProfileNode };
      if (KEEP) {
        fs.mkdirSync(KEEP, { recursive: true });
        fs.writeFileSync(path.join(KEEP, `${c.name.replace(/[^a-z0-9]+/gi, '-')}.heapprofile`), JSON.stringify(profile));
      }
      const bySite = new Map<string, number>();
      let total = 0;
      const walk = (n: ProfileNode) => {
        const where = n.callFrame.url.replace(/^file:\/\//, '').replace(`${root}/`, '').replace(/^.*node_modules\//, '');
        const key = `${n.callFrame.functionName || '(anonymous)'} ${where}${where ? `:${n.callFrame.lineNumber + 1}` : ''}`;
        bySite.set(key, (bySite.get(key) ?? 0) + n.selfSize);
        total += n.selfSize;
        for (const x of n.children) walk(x);
      };
      walk(profile.head);
      const n = Math.max(1, r.requests.total);
      summary.push(`| ${c.name} | ${(total / n).toFixed(0)} |`);
      console.log(`\n${c.name}: ${r.requests.total} requests, ${(total / n).toFixed(0)} bytes allocated per request (sampled)`);
      for (const [k, v] of [...bySite].sort((a, b) => b[1] - a[1]).slice(0, TOP)) console.log(`${(v / n).toFixed(0).padStart(7)}  ${k}`);
    }
    console.log(['', '| case | bytes allocated per request |', '|---|---:|', ...summary].join('\n'));
  } finally {
    await stopChild(server.child);
    await pg.stop();
  }
}

await main();
