/**
 * npm run bench: the broker's serving routes side by side with a bare Fastify route and a
 * raw node:http server, on 127.0.0.1, with autocannon; plus DB queries on the hot path,
 * memory, /metrics latency, refresh cost and a CPU profile. Writes BENCHMARKS.md.
 *
 * Env: BENCH_SECONDS (per case, default 10), BENCH_WARMUP_SECONDS (2), BENCH_ROUNDS (5:
 * the side-by-side cases run interleaved this many times, each on fresh processes; the table
 * shows the median: one process of a build can run 20-40 % dearer than the next for its
 * whole life on this machine, and a median of 5 processes moves less than one of 3),
 * BENCH_MEMORY_REQUESTS (1,000,000), BENCH_QUERY_REQUESTS (100,000), BENCH_PROFILE_SECONDS (8),
 * BENCH_PIN (1: with taskset and 2+ cores, servers on the last core, autocannon on the first;
 * the cases then run a second time unpinned, everything sharing every core), BENCH_QUICK (0),
 * BENCH_FRESH (1: each round on a fresh production and limits process; 0: every round on one pair),
 * BENCH_CASES (a regular expression: only the side-by-side cases whose name matches, beside
 * the bare route; for experiments with BENCH_QUICK), BENCH_LIMITS_ARGS (node flags for the
 * limits process, e.g. --cpu-prof --cpu-prof-dir=DIR; BENCH_NODE_ARGS is the production's),
 * BENCH_PAIRED_SECONDS (5: each pinned round ends with every broker case loaded at the same
 * moments as the standalone bare route, half the connections each, for this long).
 * Each case prints the server's CPU per request split into user and system time.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import autocannon from 'autocannon';
import { startTestPostgres } from '../test/helpers/pg.js';
import { CLIENTS, CREDENTIALS, LOADED_CLIENTS } from './fleet.js';
import { CPU_COUNT, PIN, SERVER_CPU, cpuSplitOf, root, rssOf, startProduction, startServer, stopChild } from './production.js';
import { requestSpecs, type RequestSpec, shimBody, STALE_GENERATION } from './requests.js';
import type { LimitsInfo, RefreshTrial, ServeInfo } from './server.js';

const HISTORY_MARKER = '<!-- history: everything below is kept by npm run bench -->';

type Result = Awaited<ReturnType<typeof autocannon>>;

const num = (name: string, d: number) => Number(process.env[name] ?? d);
const SECONDS = num('BENCH_SECONDS', 10);
const WARMUP = num('BENCH_WARMUP_SECONDS', 2);
const MEMORY_REQUESTS = num('BENCH_MEMORY_REQUESTS', 1_000_000);
const QUERY_REQUESTS = num('BENCH_QUERY_REQUESTS', 100_000);
const PROFILE_SECONDS = num('BENCH_PROFILE_SECONDS', 8);
const ROUNDS = Math.max(1, num('BENCH_ROUNDS', 5));
/** BENCH_QUICK=1: only the production side by side (pinned when pinning), printed; BENCHMARKS.md untouched. */
const QUICK = process.env['BENCH_QUICK'] === '1';
/** The side-by-side case of the bare route served from inside the production process. */
const IN_PROCESS_BARE = "bare Fastify route in the broker's process";
const BARE_POST = 'bare Fastify POST route with a JSON body (limit)';
const RAW_POST = 'raw node:http POST with a JSON body';
const SHIM = 'POST /oauth/token (stale caller)';
/** The broker's cases the pinned rounds also measure paired with the bare route, then the bare route inside the broker's process. */
const PAIRED = ['GET /codex-auth 200', 'GET /codex-auth 304', 'GET drop-in /workspaces/:id/secrets/values', SHIM, 'GET /healthz', IN_PROCESS_BARE];
/** BENCH_FRESH=0: every round on one production and limits pair (default: a fresh pair per round). */
const FRESH = process.env['BENCH_FRESH'] !== '0';
const CONNECTIONS = 50;
const PAIRED_SECONDS = Number(process.env['BENCH_PAIRED_SECONDS'] ?? 5);
/** One pool, three logins: every serving case goes through each client's stored assignment. */
const MB = 1024 * 1024;


interface Row {
  name: string;
  rps: number;
  p50: number;
  p99: number;
  total: number;
  statuses: string;
  errors: number;
  /** req/s of every round, in order (the row itself is the median round). */
  rounds?: number[];
  /** The server process's CPU time per request in this run (µs, /proc utime + stime). */
  cpuUs?: number;
  /** cpuUs of every round. */
  cpuRounds?: number[];
}

async function run(url: string, requests: RequestSpec[], seconds: number, connections = CONNECTIONS, amount?: number): Promise<Result> {
  return autocannon({ url, connections, requests, ...(amount !== undefined ? { amount } : { duration: seconds }) });
}

function row(name: string, r: Result): Row {
  const statuses = Object.entries(r.statusCodeStats)
    .map(([k, v]) => `${k}×${v.count}`)
    .join(' ');
  return { name, rps: r.requests.average, p50: r.latency.p50, p99: r.latency.p99, total: r.requests.total, statuses, errors: r.errors + r.timeouts };
}

/** Warn when a run answered anything but the one status its case expects. */
function warnUnexpected(label: string, expect: string, r: Result): void {
  if (!(expect in r.statusCodeStats) || Object.keys(r.statusCodeStats).length !== 1) console.warn(`  unexpected statuses for ${label}: ${row('', r).statuses}`);
}

async function scrape(port: number): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${port}/metrics`);
  return res.text();
}
function metricValue(text: string, name: string): number {
  const m = new RegExp(`^${name}(?:\\{[^}]*\\})? ([0-9.e+-]+)$`, 'm').exec(text);
  return m ? Number(m[1]) : NaN;
}

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
}
interface ProfileSummary {
  top: Array<{ fn: string; where: string; pct: number }>;
  byArea: Array<{ area: string; pct: number }>;
  /** Self-time share of groups that explain the difference to the bare route. */
  groups: Record<'idle' | 'writev' | 'gc' | 'hashing' | 'logger' | 'metrics' | 'fastify' | 'broker' | 'ticks', number>;
}
const GROUPS: Array<[keyof ProfileSummary['groups'], (fn: string, where: string) => boolean]> = [
  ['idle', (fn) => fn === '(idle)'],
  ['writev', (fn) => fn === 'writev' || fn === 'writevGeneric' || fn === 'writeGeneric' || fn === 'writeUtf8String'],
  ['gc', (fn) => fn === '(garbage collector)'],
  ['hashing', (fn, w) => /^(Hash|update|digest|timingSafeEqual|createHash|randomUUID|randomFillSync|secureBuffer)$/.test(fn) || w.includes('internal/crypto')],
  ['logger', (_fn, w) => /node_modules\/(pino|@pinojs|pino-std-serializers)/.test(w)],
  ['metrics', (_fn, w) => w.includes('node_modules/prom-client')],
  ['fastify', (_fn, w) => /node_modules\/(fastify|@fastify|find-my-way|light-my-request|secure-json-parse|fast-json-stringify|toad-cache|avvio)/.test(w)],
  ['broker', (_fn, w) => w.startsWith('src/')],
  ['ticks', (fn) => fn === 'nextTick' || fn === 'processTicksAndRejections' || fn === 'runMicrotasks'],
];
function summariseProfile(prof: { nodes: ProfileNode[]; samples: number[] }): ProfileSummary {
  const hits = new Map<number, number>();
  for (const s of prof.samples) hits.set(s, (hits.get(s) ?? 0) + 1);
  const total = prof.samples.length || 1;
  const byFn = new Map<string, { fn: string; where: string; n: number }>();
  const byArea = new Map<string, number>();
  const groups = Object.fromEntries(GROUPS.map(([g]) => [g, 0])) as ProfileSummary['groups'];
  for (const node of prof.nodes) {
    const n = hits.get(node.id) ?? 0;
    if (!n) continue;
    const { functionName, url, lineNumber } = node.callFrame;
    const rel = url.startsWith('file://') ? path.relative(root, fileURLToPath(url)) : url;
    const where = rel ? `${rel}:${lineNumber + 1}` : '(native)';
    const key = `${functionName}@${where}`;
    const e = byFn.get(key) ?? { fn: functionName || '(anonymous)', where, n: 0 };
    e.n += n;
    byFn.set(key, e);
    const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(rel)?.[1];
    const area = functionName === '(idle)' ? '(idle)' : functionName === '(garbage collector)' ? '(gc)' : pkg ? pkg : rel.startsWith('src/') ? 'src/ (broker)' : rel.startsWith('node:') ? 'node: internals' : rel ? rel.split('/')[0] ?? rel : '(native/V8)';
    byArea.set(area, (byArea.get(area) ?? 0) + n);
    const g = GROUPS.find(([, test]) => test(functionName, where));
    if (g) groups[g[0]] += (100 * n) / total;
  }
  const top = [...byFn.values()]
    .sort((x, y) => y.n - x.n)
    .slice(0, 15)
    .map((e) => ({ fn: e.fn, where: e.where, pct: (100 * e.n) / total }));
  return { groups, top, byArea: [...byArea.entries()].sort((x, y) => y[1] - x[1]).slice(0, 12).map(([area, n]) => ({ area, pct: (100 * n) / total })) };
}

/** NODE_OPTIONS the image sets (Dockerfile ENV): the production process runs with them. */
const f1 = (x: number) => x.toFixed(1);
const spreadOf = (counts: Record<string, number>) =>
  Object.entries(counts)
    .map(([name, n]) => `${name} ${n.toLocaleString('en-US')}`)
    .join(', ');
const medianOf = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor((xs.length - 1) / 2)] ?? NaN;

/** The side-by-side table: req/s, latency, and the server's CPU per request, each against the bare route (row 0). */
function sideBySideTable(rows: Row[]): string[] {
  const bare = rows[0] as Row;
  return [
    '| case | requests/s (median) | every round | p50 (ms) | p99 (ms) | ratio to bare Fastify | server CPU µs/request (median; every round) | CPU vs bare Fastify | statuses |',
    '|---|---:|---|---:|---:|---:|---|---:|---|',
    ...rows.map(
      (r) =>
        `| ${r.name} | ${f1(r.rps)} | ${(r.rounds ?? []).map((x) => x.toFixed(0)).join(' / ')} | ${r.p50} | ${r.p99} | ${(r.rps / bare.rps).toFixed(2)} | ${f1(r.cpuUs ?? NaN)}; ${(r.cpuRounds ?? []).map(f1).join(' / ')} | ${((r.cpuUs ?? NaN) / (bare.cpuUs ?? NaN)).toFixed(2)}× | ${r.statuses}${r.errors ? `, ${r.errors} errors` : ''} |`,
    ),
  ];
}
const fmtMb = (b: number) => `${(b / MB).toFixed(1)} MB`;

/** One broker case loaded at the same moments as the standalone bare route: CPU per request of each, per round. */
interface Paired {
  name: string;
  caseUs: number[];
  bareUs: number[];
}
const pairedRatios = (p: Paired) => p.caseUs.map((u, i) => u / (p.bareUs[i] as number));

/**
 * The cases measured paired with the bare route. Loaded one after the other, a case and the
 * bare route are 10-60 s apart, and this machine's CPU per request drifts by 20-40 % from
 * one minute to the next (the same process, the same route); loaded at the same moments, both
 * servers share the server core and whatever slows it, so each window's ratio is the route's
 * own cost.
 */
function pairedTable(paired: Paired[]): string[] {
  if (paired.length === 0) return [];
  return [
    '## Paired with the bare route',
    '',
    `Each pinned round ends with every broker case loaded at the same moments as the standalone bare route: two autocannon runs of ${CONNECTIONS / 2} connections each (the same ${CONNECTIONS} in all), both servers on the server core, 1 s of warm-up then ${PAIRED_SECONDS} s; each server's CPU per request from /proc, and their ratio within the window. Loaded one after the other (the tables above), a case and the bare route are measured up to a minute apart, and on this shared machine the same process serving the same route drifts by 20-40 % from one minute to the next (BENCHMARKS.md history, session 15): a drift the sequential ratio cannot tell from the route's cost, and the paired ratio cancels, since whatever slows the core slows both servers in the same window. Every round's ratio is listed; the median is what the targets read.`,
    '',
    '| case | CPU vs bare Fastify, paired (median) | every round | case µs/request (median) | bare route µs/request in the same windows (median) |',
    '|---|---:|---|---:|---:|',
    ...paired.map((p) => `| ${p.name} | ${medianOf(pairedRatios(p)).toFixed(2)}× | ${pairedRatios(p).map((x) => x.toFixed(2)).join(' / ')} | ${f1(medianOf(p.caseUs))} | ${f1(medianOf(p.bareUs))} |`),
    '',
  ];
}

/**
 * The broker's CPU per request split in two by the bare route served from inside its own
 * process: what the process costs every request (its heap, V8 flags and timers) and what
 * each route's code adds.
 */
function processAndRoute(rows: Row[]): string[] {
  const bare = rows[0];
  const inside = rows.find((r) => r.name === IN_PROCESS_BARE);
  if (!bare || !inside) return [];
  const us = (r: Row) => r.cpuUs ?? NaN;
  return [
    '## Process and route',
    '',
    `The bare Fastify route also runs inside each production process (\`bench/in-process-bare.mjs\`, which the bench loads with \`node --import\`; the image never does): the same route code, on the broker's heap with its ${CLIENTS.toLocaleString('en-US')} clients, its V8 flags and its timers. Against the standalone bare route it shows what the process costs every request whatever the route; each route against it shows what the route's own code adds. ${PIN ? 'Pinned' : 'Unpinned'} rounds, server CPU per request (medians):`,
    '',
    "| case | µs/request | vs the standalone bare route | vs the bare route in the broker's process |",
    '|---|---:|---:|---:|',
    ...[inside, ...rows.filter((r) => r !== bare && r !== inside && !/^raw node|\/metrics$/.test(r.name) && r.name !== BARE_POST)].map((r) => `| ${r.name} | ${f1(us(r))} | ${(us(r) / us(bare)).toFixed(2)}× | ${(us(r) / us(inside)).toFixed(2)}× |`),
    '',
    ...postFloor(rows),
  ];
}

/** The shim against the GET route every target divides by, and against a POST with a body (what a POST costs). */
function postFloor(rows: Row[]): string[] {
  const [bare, shim, barePost, rawPost] = [rows[0], ...[SHIM, BARE_POST, RAW_POST].map((n) => rows.find((r) => r.name === n))];
  if (!bare || !shim || !barePost || !rawPost) return [];
  const us = (r: Row) => r.cpuUs ?? NaN;
  const x = (a: Row, b: Row) => `${(us(a) / us(b)).toFixed(2)}×`;
  return [
    '### A POST with a body',
    '',
    `The shim's target divides by the bare GET route, but a POST with a JSON body costs more than a GET before any route code runs: Node parses a longer request and streams the body ('data', 'end'), and Fastify adds its content-type parser. The limits process also answers the shim's exact request with the shim's answer bytes, from a bare Fastify POST route (Fastify's JSON parser, then the answer) and from raw node:http (read the body, JSON.parse, answer). Server CPU per request (medians):`,
    '',
    '| case | µs/request | vs the bare GET route | vs the bare Fastify POST route |',
    '|---|---:|---:|---:|',
    ...[rawPost, barePost, shim].map((r) => `| ${r.name} | ${f1(us(r))} | ${x(r, bare)} | ${x(r, barePost)} |`),
    '',
  ];
}

async function main(): Promise<void> {
  const started = new Date();
  // Other work on the machine inflates CPU per request (fewer requests per wake-up): said in the report.
  const loadAtStart = os.loadavg()[0] ?? NaN;
  console.log(`bench: ${SECONDS} s per case after ${WARMUP} s warm-up, ${CONNECTIONS} connections, 127.0.0.1`);
  const pg = await startTestPostgres();
  const children: ChildProcess[] = [];
  const stoppers: Array<() => Promise<void>> = [];
  try {
    // What the harness alone costs in RSS: plain node, and node + tsx + the modules the server imports.
    const oneLine = async (args: string[]): Promise<NodeJS.MemoryUsage> => {
      const c = spawn(process.execPath, args, { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] });
      let out = '';
      c.stdout.on('data', (d: Buffer) => (out += d.toString('utf8')));
      await new Promise((r) => c.once('exit', r));
      return JSON.parse(out) as NodeJS.MemoryUsage;
    };
    const plainNode = await oneLine(['--expose-gc', '-e', 'gc(); console.log(JSON.stringify(process.memoryUsage()))']);
    const harness = await oneLine(['--expose-gc', '--import', 'tsx', path.join(root, 'bench/baseline-mem.ts')]);
    const [serveDb, refreshDb, prodDb] = [await pg.newDatabase(), await pg.newDatabase(), await pg.newDatabase()];

    // ---- the production process: side by side, /metrics, memory
    const prod = await startProduction(prodDb, CLIENTS, LOADED_CLIENTS);
    stoppers.push(prod.stop);
    console.log(`${prod.command} (pid ${prod.pid}): ${CLIENTS} clients, auth.json ${Buffer.byteLength(prod.body)} bytes`);
    const limitsArgs = (process.env['BENCH_LIMITS_ARGS'] ?? '').split(' ').filter(Boolean);
    const { clients } = prod;
    const broker = prod.base;
    const caseList = (base: string, served: ServeInfo['clients'], lim: LimitsInfo, inProcessBare: string): Array<{ name: string; url: string; spec: RequestSpec; expect: string; pid?: number }> => {
      const specs = requestSpecs(served, STALE_GENERATION);
      return [
        { name: 'bare Fastify route (limit)', pid: lim.pid, url: `http://127.0.0.1:${lim.fastifyPort}`, spec: specs.get200(), expect: '200' },
        { name: 'raw node:http', pid: lim.pid, url: `http://127.0.0.1:${lim.rawPort}`, spec: specs.get200(), expect: '200' },
        { name: 'GET /codex-auth 200', url: base, spec: specs.get200(), expect: '200' },
        { name: 'GET /codex-auth 304', url: base, spec: specs.get304, expect: '304' },
        { name: 'GET drop-in /workspaces/:id/secrets/values', url: base, spec: specs.dropIn, expect: '200' },
        { name: SHIM, url: base, spec: specs.shim, expect: '200' },
        { name: 'GET /healthz', url: base, spec: specs.healthz, expect: '200' },
        // The limit again, served from inside the production process (bench/in-process-bare.mjs).
        { name: IN_PROCESS_BARE, url: inProcessBare, spec: specs.get200(), expect: '200' },
        { name: 'GET /metrics', url: base, spec: specs.metrics, expect: '200' },
        // The shim's own floor: any POST with a JSON body, the same request and answer bytes.
        { name: BARE_POST, pid: lim.pid, url: `http://127.0.0.1:${lim.fastifyPort}`, spec: specs.shim, expect: '200' },
        { name: RAW_POST, pid: lim.pid, url: `http://127.0.0.1:${lim.rawPort}`, spec: specs.shim, expect: '200' },
      ];
    };
    const caseFilter = process.env['BENCH_CASES'] ? new RegExp(process.env['BENCH_CASES']) : undefined;
    // The report reads every case by position: a filtered run only prints.
    if (caseFilter && !QUICK) throw new Error('BENCH_CASES needs BENCH_QUICK=1 (the full report needs every case)');
    /** The bare route (the limit every ratio divides by), then the cases BENCH_CASES names. */
    const chosen = <T extends { name: string }>(list: T[]) => list.filter((c, i) => i === 0 || !caseFilter || caseFilter.test(c.name));
    // The memory process's list names the cases and gives the specs it runs (the long GET
    // and /metrics): the side-by-side rounds run on fresh pairs, which hold the limits and
    // the in-process bare route.
    const allCases = caseList(broker, clients, { pid: 0, fastifyPort: 0, rawPort: 0 }, '');
    const cases = chosen(allCases);

    // Memory first, on the fresh process: RSS through MEMORY_REQUESTS GET /codex-auth.
    const rssBeforeRun = rssOf(prod.pid);
    const raw: Array<{ t: number; rss: number }> = [{ t: 0, rss: rssBeforeRun }];
    const t0 = Date.now();
    const sampler = setInterval(() => raw.push({ t: (Date.now() - t0) / 1000, rss: rssOf(prod.pid) }), 2_000);
    const memRun = await run(broker, [allCases[2]?.spec as RequestSpec], 0, CONNECTIONS, MEMORY_REQUESTS);
    clearInterval(sampler);
    await new Promise((r) => setTimeout(r, 2_000));
    const rssEnd = rssOf(prod.pid);
    const rate = memRun.requests.total / Math.max(memRun.duration, 1e-9);
    const rssSamples = [
      ...raw.map((x) => ({ seconds: x.t, served: Math.min(memRun.requests.total, Math.round(x.t * rate)), rss: x.rss })),
      { seconds: (Date.now() - t0) / 1000, served: memRun.requests.total, rss: rssEnd },
    ];
    const rssPeak = Math.max(...rssSamples.map((x) => x.rss));
    const memStatuses = row('', memRun).statuses;
    console.log(`  memory: ${memRun.requests.total} requests in ${memRun.duration.toFixed(0)} s (${f1(memRun.requests.average)} req/s); RSS ${fmtMb(rssEnd)} (peak ${fmtMb(rssPeak)}) `);

    // Interleaved rounds: a slow moment on the shared machine hits one round of every case
    // rather than all rounds of one case. Each row is the round with the median req/s.
    // Each round runs on a fresh production process and a fresh limits process
    // (BENCH_FRESH=0: all rounds on one pair): the same build measures 20-25 % apart from
    // one process to the next, so a row is the median of several processes. The memory
    // process is not one of them: it runs without the in-process bare route, which the
    // side-by-side processes load.
    const freshPair = async (pinned: boolean) => {
      const p = await startProduction(await pg.newDatabase(), CLIENTS, LOADED_CLIENTS, { build: false, inProcessBare: true });
      // The shim's answer to one stale caller: what the limits answer a POST with.
      const c0 = p.clients[0];
      const shimAnswer = await fetch(`${p.base}/oauth/token`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: shimBody(c0?.refresh ?? '', STALE_GENERATION),
      }).then(async (r) => (r.status === 200 ? r.text() : Promise.reject(new Error(`the shim answered ${r.status}`))));
      const l = startServer('limits', '', limitsArgs, { BENCH_BODY: p.body, BENCH_POST_BODY: shimAnswer });
      const li = await l.firstLine.then((line) => JSON.parse(line) as LimitsInfo).catch(async (err: unknown) => {
        await p.stop();
        throw err;
      });
      if (!pinned) for (const pid of [p.pid, li.pid]) execFileSync('taskset', ['-a', '-p', '-c', `0-${CPU_COUNT - 1}`, String(pid)], { stdio: 'ignore' });
      return {
        cases: chosen(caseList(p.base, p.clients, li, p.inProcessBare ?? '')),
        pid: p.pid,
        stop: async () => {
          await stopChild(l.child);
          await p.stop();
        },
      };
    };
    /** Filled by the pinned pass: each broker case paired with the bare route, per round. */
    const paired: Paired[] = [];
    const sideBySide = async (label: string, pinned: boolean): Promise<Row[]> => {
      const byCase: Row[][] = cases.map(() => []);
      let kept: Awaited<ReturnType<typeof freshPair>> | undefined;
      for (let round = 0; round < ROUNDS; round++) {
        const reused = FRESH ? undefined : kept;
        const fresh = reused === undefined;
        console.log(`${label} round ${round + 1}/${ROUNDS}${fresh ? ' (fresh processes)' : ''}`);
        const set = reused ?? (await freshPair(pinned));
        if (!FRESH) kept = set;
        try {
          for (const [i, c] of set.cases.entries()) {
            if (fresh) await run(c.url, [c.spec], WARMUP);
            const pid = c.pid ?? set.pid;
            const before = cpuSplitOf(pid);
            const r = await run(c.url, [c.spec], SECONDS);
            const after = cpuSplitOf(pid);
            const n = Math.max(1, r.requests.total);
            const user = (after.user - before.user) / n;
            const sys = (after.sys - before.sys) / n;
            const rw = { ...row(c.name, r), cpuUs: user + sys };
            const split = `(user ${f1(user)}, system ${f1(sys)})`;
            warnUnexpected(c.name, c.expect, r);
            byCase[i]?.push(rw);
            console.log(`  ${c.name.padEnd(44)} ${f1(rw.rps).padStart(9)} req/s  p50 ${rw.p50} ms  p99 ${rw.p99} ms  server CPU ${f1(rw.cpuUs)} µs/request ${split}  [${rw.statuses}]`);
          }
          // The broker's cases again, each loaded at the same moments as the bare route.
          const bareCase = set.cases[0];
          if (pinned && PIN && bareCase) {
            for (const c of set.cases.filter((x) => PAIRED.includes(x.name))) {
              const both = (seconds: number) => Promise.all([run(c.url, [c.spec], seconds, CONNECTIONS / 2), run(bareCase.url, [bareCase.spec], seconds, CONNECTIONS / 2)]);
              await both(1);
              const cpuOf = (pid: number) => {
                const t = cpuSplitOf(pid);
                return t.user + t.sys;
              };
              const [casePid, barePid] = [c.pid ?? set.pid, bareCase.pid ?? set.pid];
              const [case0, bare0] = [cpuOf(casePid), cpuOf(barePid)];
              const [caseRun, bareRun] = await both(PAIRED_SECONDS);
              const caseUs = (cpuOf(casePid) - case0) / Math.max(1, caseRun.requests.total);
              const bareUs = (cpuOf(barePid) - bare0) / Math.max(1, bareRun.requests.total);
              warnUnexpected(`${c.name} (paired)`, c.expect, caseRun);
              warnUnexpected(`${bareCase.name} (paired)`, bareCase.expect, bareRun);
              let entry = paired.find((x) => x.name === c.name);
              if (!entry) paired.push((entry = { name: c.name, caseUs: [], bareUs: [] }));
              entry.caseUs.push(caseUs);
              entry.bareUs.push(bareUs);
              console.log(`  paired: ${c.name.padEnd(36)} ${f1(caseUs)} µs/request, bare ${f1(bareUs)} µs/request: ${(caseUs / bareUs).toFixed(2)}×`);
            }
          }
        } finally {
          if (FRESH || round === ROUNDS - 1) await set.stop();
        }
      }
      return byCase.map((runs) => {
        const sorted = [...runs].sort((x, y) => x.rps - y.rps);
        const median = sorted[Math.floor((sorted.length - 1) / 2)] as Row;
        const cpuRounds = runs.map((x) => x.cpuUs ?? NaN);
        return { ...median, rounds: runs.map((x) => x.rps), cpuRounds, cpuUs: medianOf(cpuRounds) };
      });
    };
    const rows = await sideBySide(PIN ? 'pinned' : 'unpinned', PIN);
    const bare = rows[0] as Row;
    // The same cases with the load generator and the servers sharing every core, as on a
    // busy host: the req/s ratio then shows what the broker's CPU costs its neighbours.
    let unpinned: Row[] | undefined;
    if (PIN && !QUICK) {
      const all = `0-${CPU_COUNT - 1}`;
      // autocannon runs in this process; the fresh pairs are unpinned as they start.
      execFileSync('taskset', ['-a', '-p', '-c', all, String(process.pid)], { stdio: 'ignore' });
      unpinned = await sideBySide('unpinned', false);
      execFileSync('taskset', ['-a', '-p', '-c', '0', String(process.pid)], { stdio: 'ignore' });
    }
    if (QUICK) {
      console.log(`\n${sideBySideTable(rows).join('\n')}\n\n${processAndRoute(rows).join('\n')}\n${pairedTable(paired).join('\n')}\n(BENCH_QUICK: BENCHMARKS.md left as it is)`);
      return;
    }

    // /metrics as Prometheus scrapes it: one request at a time.
    const scrapeRun = await run(broker, [allCases.find((c) => c.name === 'GET /metrics')?.spec as RequestSpec], 0, 1, 2_000);
    const scrapeP99 = scrapeRun.latency.p99;
    const prodServed = memRun.requests.total + scrapeRun.requests.total;
    console.log(`  /metrics, 1 connection, 2,000 scrapes: p50 ${scrapeRun.latency.p50} ms, p99 ${scrapeP99} ms`);
    const rssAfterCases = rssOf(prod.pid);

    await prod.stop();

    // ---- the harness (same buildApp, in-process): DB query count, heap after GC, profiles
    const s = startServer('serve', serveDb, ['--expose-gc']);
    children.push(s.child);
    const info = JSON.parse(await s.firstLine) as ServeInfo;
    console.log(`harness pid ${info.pid}: ${info.clientsLoaded} clients`);
    const hb = `http://127.0.0.1:${info.brokerPort}`;
    const hSpecs = requestSpecs(info.clients, info.staleGeneration);
    const hCases = {
      bare: { name: allCases[0]?.name ?? '', url: `http://127.0.0.1:${info.fastifyPort}`, spec: hSpecs.get200() },
      get200: { name: allCases[2]?.name ?? '', url: hb, spec: hSpecs.get200() },
      get304: { name: allCases[3]?.name ?? '', url: hb, spec: hSpecs.get304 },
      dropIn: { name: allCases[4]?.name ?? '', url: hb, spec: hSpecs.dropIn },
      shim: { name: allCases[5]?.name ?? '', url: hb, spec: hSpecs.shim },
      healthz: { name: allCases[6]?.name ?? '', url: hb, spec: hSpecs.healthz },
    };
    const control = `http://127.0.0.1:${info.controlPort}`;
    const mem = async (): Promise<NodeJS.MemoryUsage> => (await fetch(`${control}/mem?gc=1`)).json() as Promise<NodeJS.MemoryUsage>;

    // Database queries on the hot path: a mix of every serving route, in steady state.
    const before = metricValue(await scrape(info.brokerPort), 'codex_broker_db_queries_total');
    const q = await run(hb, [hSpecs.get200(), hSpecs.get304, hSpecs.dropIn, hSpecs.shim, hSpecs.healthz], 0, CONNECTIONS, QUERY_REQUESTS);
    const after = metricValue(await scrape(info.brokerPort), 'codex_broker_db_queries_total');
    const queries = after - before;
    let harnessServed = q.requests.total;
    console.log(`  db queries: ${queries} for ${q.requests.total} requests (counter ${before} -> ${after}) [${row('', q).statuses}]`);
    const memAfterQueries = await mem();

    // CPU profiles (in-process inspector, load window only) of the limit and the routes that miss.
    const profiles: Array<{ name: string; rps: number; busyUs: number; usPerPct: number; summary: ProfileSummary }> = [];
    for (const c of Object.values(hCases)) {
      await run(c.url, [c.spec], WARMUP);
      await fetch(`${control}/profile/start`, { method: 'POST' });
      const pr = await run(c.url, [c.spec], PROFILE_SECONDS);
      const prof = (await (await fetch(`${control}/profile/stop`, { method: 'POST' })).json()) as { nodes: ProfileNode[]; samples: number[] };
      if (c.url === hb) harnessServed += pr.requests.total;
      const summary = summariseProfile(prof);
      // Server time per request that was not idle (wall-clock samples over the window).
      const busyUs = ((1 - summary.groups.idle / 100) * pr.duration * 1e6) / Math.max(1, pr.requests.total);
      profiles.push({ name: c.name, rps: pr.requests.average, busyUs, usPerPct: (pr.duration * 1e6) / Math.max(1, pr.requests.total) / 100, summary });
      console.log(`  profiled ${c.name}: ${f1(pr.requests.average)} req/s; top: ${profiles.at(-1)?.summary.top.slice(0, 6).map((e) => `${e.fn} ${f1(e.pct)}%`).join(', ')}`);
    }
    const memEnd = await mem();
    await stopChild(s.child);

    // Refresh cost across three replicas.
    const rf = startServer('refresh', refreshDb);
    children.push(rf.child);
    const refresh = JSON.parse(await rf.firstLine) as { trials: RefreshTrial[]; upstreamPosts: number };
    await new Promise((r) => (rf.child.exitCode !== null ? r(undefined) : rf.child.once('exit', r)));
    const worstAfter = Math.max(...refresh.trials.map((x) => x.afterUpstreamMs));
    console.log(`  refresh: ${refresh.trials.map((x) => `${f1(x.totalMs)} ms (${f1(x.afterUpstreamMs)} after upstream)`).join(', ')}`);

    // ---------------------------------------------------------------- report
    const ratio = (r: Row) => r.rps / bare.rps;
    const cpu = (r: Row) => (r.cpuUs ?? NaN) / (bare.cpuUs ?? NaN);
    const get200 = rows[2] as Row;
    const get304 = rows[3] as Row;
    const shim = rows[5] as Row;
    // Issue #16, per case: its row, the CPU limit, and its p99 when the issue was filed
    // (the 2026-11-28 run), in ms, when the bare route's own p99 was 1 ms.
    const cpuTargets: Array<[number, number, number]> = [
      [2, 1.15, 1],
      [3, 1.1, 2],
      [4, 1.2, 2],
      [5, 1.35, 2],
      [6, 1.05, 1],
    ];
    const targets = [
      ...cpuTargets.map(([i, limit]) => {
        const r = rows[i] as Row;
        return { t: `${r.name}: server CPU per request ≤ ${limit.toFixed(2)}× bare Fastify`, v: `${f1(r.cpuUs ?? NaN)} µs vs ${f1(bare.cpuUs ?? NaN)} µs (${cpu(r).toFixed(2)}×)`, ok: cpu(r) <= limit };
      }),
      // The same limits, read from the paired windows (see "Paired with the bare route").
      ...cpuTargets.flatMap(([i, limit]) => {
        const p = paired.find((x) => x.name === (rows[i] as Row).name);
        if (!p) return [];
        const x = medianOf(pairedRatios(p));
        return [{ t: `${p.name}: server CPU per request ≤ ${limit.toFixed(2)}× bare Fastify, paired (loaded at the same moments)`, v: `${x.toFixed(2)}× (median of ${p.caseUs.length} windows; ${f1(medianOf(p.caseUs))} µs vs ${f1(medianOf(p.bareUs))} µs)`, ok: x <= limit }];
      }),
      // "p99 no worse than today's": autocannon's p99 (whole ms) is mostly the machine's (the
      // bare route's own moves between 1 and 10 ms from one run to the next), so it is read
      // as it stood against the bare route when the issue was filed: at most that many
      // times the bare route's p99 in the same rounds.
      ...cpuTargets.map(([i, , p99]) => {
        const r = rows[i] as Row;
        const limit = p99 * Math.max(1, bare.p99);
        return { t: `${r.name}: p99 ≤ ${p99}× the bare route's p99 in the same rounds (at filing: ${p99} ms against 1 ms)`, v: `${r.p99} ms against ${bare.p99} ms (limit ${limit} ms)`, ok: r.p99 <= limit };
      }),
      { t: 'GET /codex-auth 200 ≥ 85 % of bare Fastify req/s', v: `${f1(100 * ratio(get200))} %`, ok: ratio(get200) >= 0.85 },
      { t: 'GET /codex-auth 304 ≥ 90 % of bare Fastify req/s', v: `${f1(100 * ratio(get304))} %`, ok: ratio(get304) >= 0.9 },
      { t: 'POST /oauth/token (stale) ≥ 70 % of bare Fastify req/s', v: `${f1(100 * ratio(shim))} %`, ok: ratio(shim) >= 0.7 },
      { t: 'Zero DB queries per served request (steady state)', v: `${queries} queries / ${q.requests.total} requests`, ok: queries === 0 && q.requests.total >= QUERY_REQUESTS },
      {
        t: `RSS ≤ 100 MB, ${CREDENTIALS.length} credentials and 10,000 clients, after 1,000,000 requests`,
        v: `${fmtMb(rssEnd)} after ${memRun.requests.total.toLocaleString('en-US')} requests to \`${prod.command}\` with ${prod.clientCount.toLocaleString('en-US')} clients (peak during the run ${fmtMb(rssPeak)})`,
        ok: rssEnd <= 100 * MB && memRun.requests.total >= 1_000_000 && prod.clientCount >= 10_000,
      },
      { t: 'Rotation on all 3 replicas ≤ 1 s after the upstream answers', v: `worst ${f1(worstAfter)} ms over ${refresh.trials.length} trials`, ok: worstAfter <= 1000 },
      { t: '/metrics scrape ≤ 10 ms p99 with 10,000 clients', v: `${scrapeP99} ms (1 connection)`, ok: scrapeP99 <= 10 },
    ];

    const table = sideBySideTable(rows);
    console.log(`\n${table.join('\n')}\n`);
    for (const x of targets) console.log(`${x.ok ? 'MET   ' : 'MISSED'} ${x.t}: ${x.v}`);

    const cpus = os.cpus();
    function missedNotes(): string[] {
      const missed = targets.filter((x) => !x.ok);
      const out: string[] = [missed.length === 0 ? 'Every target was met.' : `Missed: ${missed.map((x) => x.t).join('; ')}.`, ''];
      const [pb, pa] = profiles;
      // Always shown: when the limit and the broker both approach what one autocannon core can
      // generate, the req/s ratio flatters the broker, and CPU per request is the sharper measure.
      if (pb && pa) {
        const us = (p: typeof pb, g: keyof ProfileSummary['groups']) => f1(p.summary.groups[g] * p.usPerPct);
        const names: Record<Exclude<keyof ProfileSummary['groups'], 'idle'>, string> = {
          writev: 'socket writes (kernel loopback, incl. time descheduled)',
          gc: 'GC',
          hashing: 'node:crypto (sha256)',
          logger: 'pino (per-request child logger, redact)',
          metrics: 'prom-client (http duration histogram)',
          fastify: 'fastify & its deps (hooks, routing, body parse, serialize)',
          broker: 'broker src/',
          ticks: 'nextTick / microtasks (async hooks)',
        };
        out.push(
          `**Server CPU per request.** On the production process the bare route and the broker's routes approach what autocannon on one core generates (GET /healthz: ${f1(rows[6]?.rps ?? 0)} req/s), so their pinned req/s ratio understates what the broker adds. The server CPU column of the side-by-side table measures it without the load generator: ${[2, 3, 4, 5, 6].map((i) => `${rows[i]?.name} ${f1(rows[i]?.cpuUs ?? NaN)} µs (${((rows[i]?.cpuUs ?? NaN) / (bare.cpuUs ?? NaN)).toFixed(2)}×)`).join(', ')}, against ${f1(bare.cpuUs ?? NaN)} µs for the bare route. The harness profiles below show where the time goes (in one tsx process under the inspector, which inflates every figure). While profiled, the bare Fastify route's server was ${f1(pb.summary.groups.idle)} % idle: at ${f1(pb.rps)} req/s it waits on ${PIN ? 'autocannon (on its own core)' : `the load generator, which shares the ${os.cpus().length} cores`} rather than on Fastify; the broker's GET /codex-auth server was ${f1(pa.summary.groups.idle)} % idle. Wall-clock samples, microseconds per request:`,
          '',
          `| group | ${profiles.map((p) => p.name).join(' | ')} |`,
          `|---|${profiles.map(() => '---:').join('|')}|`,
          `| all non-idle | ${profiles.map((p) => f1(p.busyUs)).join(' | ')} |`,
          ...(Object.keys(names) as Array<keyof typeof names>).map((g) => `| ${names[g]} | ${profiles.map((p) => us(p, g)).join(' | ')} |`),
          '',
          'Everything the broker adds over the bare route is in that table; the functions are in the profiles below. No database or I/O is involved (see the query count).',
        );
      }
      if (missed.some((x) => x.t.startsWith('RSS'))) {
        out.push(
          '',
          `**RSS.** \`${prod.command}\` peaked at ${fmtMb(rssPeak)} and ended at ${fmtMb(rssEnd)} (samples in the memory section). Its heap is small (the harness's broker holds ${fmtMb(info.rss.afterClients.heapUsed)} of heap with ${info.clientsLoaded.toLocaleString('en-US')} clients and ${fmtMb(memEnd.heapUsed)} after ${harnessServed.toLocaleString('en-US')} served requests, after GC); the rest is node itself (${fmtMb(plainNode.rss)} for an empty \`node\`), the loaded code, and the young generation V8 grows under load (NODE_OPTIONS bounds it).`,
        );
      }
      for (const x of missed.filter((m) => !/req\/s|p99 ≤|^RSS|server CPU/.test(m.t))) out.push('', `**${x.t}**: ${x.v}.`);
      return out;
    }
    const md = [
      '# Benchmarks',
      '',
      `Written by \`npm run bench\` (bench/run.ts) on ${started.toISOString()}.`,
      '',
      `Machine: ${cpus.length} cores (${cpus[0]?.model.trim() ?? 'unknown CPU'}), ${(os.totalmem() / 1024 ** 3).toFixed(1)} GiB memory, Node ${process.version}, ${os.platform()} ${os.release()}. Load average (1 min) ${loadAtStart.toFixed(2)} at the start and ${(os.loadavg()[0] ?? NaN).toFixed(2)} at the end: with other work on the ${cpus.length} cores every server pays more CPU per request (fewer requests per wake-up), the bare route included, so compare ratios only from a run on an otherwise idle machine.`,
      PIN
        ? `Pinned with taskset: the server under test on core ${SERVER_CPU}, autocannon on core 0 (Postgres, idle in steady state, unpinned). The ratios compare the server's CPU cost per request; absolute numbers depend on this machine.`
        : 'Not pinned (BENCH_PIN=0, no taskset, or one core): autocannon and the servers share the cores, so absolute numbers are a floor and the ratios swing with the scheduler.',
      '',
      `Method: autocannon, ${CONNECTIONS} connections, ${WARMUP} s warm-up then ${SECONDS} s per case, the cases interleaved in ${ROUNDS} rounds (each row is the round with the median req/s; every round's req/s is listed)${FRESH ? ', each round on a fresh production process and a fresh limits process (on a busy machine the same build measured 20-25 % apart from one process to the next, and separate runs drift apart even on a quiet one; see the history below), so a row is the median of several processes and only runs interleaved with each other compare closely' : ', every round on one production process and one limits process (BENCH_FRESH=0)'}, 127.0.0.1. The broker is the production process, \`${prod.command}\` (built by the bench; JSON logs at warn, default process metrics, client last-seen flush every 2 s, refresh-token exposure \`proxy\`), on an embedded Postgres, holding ${CREDENTIALS.length} credentials in one pool (${CREDENTIALS.map((c) => `\`${c}\``).join(', ')}, each its own login) and ${prod.clientCount.toLocaleString('en-US')} clients, assigned across them by the broker itself (${spreadOf(prod.assigned)}); requests rotate over ${clients.length.toLocaleString('en-US')} of them (one token per request; served ${spreadOf(prod.servedBy)}), so every case serves through each client's stored assignment. The two limits run in a process of their own (\`bench/server.ts limits\`) and serve the same ${Buffer.byteLength(prod.body)}-byte auth.json to the same request mix; the bare route runs once more inside each production process (see "Process and route").`,
      '',
      '## Side by side',
      '',
      ...table,
      '',
      ...(unpinned
        ? [
            '## Side by side, unpinned',
            '',
            `The same cases in the same run, ${ROUNDS} more interleaved rounds, with autocannon and the servers sharing all ${CPU_COUNT} cores (as on a busy host, BENCH_PIN=0): the load generator now competes with the server for CPU, so the req/s ratio to the bare route shows what the broker's CPU per request costs in throughput.`,
            '',
            ...sideBySideTable(unpinned),
            '',
          ]
        : []),
      ...processAndRoute(rows),
      ...pairedTable(paired),
      '## Targets',
      '',
      '| target | measured | met |',
      '|---|---|---|',
      ...targets.map((x) => `| ${x.t} | ${x.v} | ${x.ok ? 'yes' : '**no**'} |`),
      '',
      '## Database queries on the hot path',
      '',
      `On the harness broker (same buildApp; its periodic client reload, last-seen flush, login sweep and every credential's refresh check slowed to once an hour, so that only the serving path is counted): \`codex_broker_db_queries_total\` from /metrics before and after ${q.requests.total.toLocaleString('en-US')} requests mixing GET /codex-auth (200 and 304), the drop-in route, POST /oauth/token (stale caller) and /healthz: ${before} → ${after}, a difference of **${queries}**. (test/hot-path.test.ts proves the same by counting, untimed.)`,
      '',
      '## Memory',
      '',
      '### The production process (the RSS target)',
      '',
      `\`${prod.command}\`, with ${prod.clientCount.toLocaleString('en-US')} clients inserted and loaded through NOTIFY, then ${memRun.requests.total.toLocaleString('en-US')} GET /codex-auth over ${clients.length.toLocaleString('en-US')} of them in ${memRun.duration.toFixed(0)} s (${f1(memRun.requests.average)} req/s; ${memStatuses}) before anything else; then 2,000 single /metrics scrapes: ${prodServed.toLocaleString('en-US')} requests in all. (The side-by-side cases run on processes of their own.) RSS from /proc, no forced GC.`,
      '',
      '| point | RSS |',
      '|---|---:|',
      `| plain \`node\`, for scale | ${fmtMb(plainNode.rss)} |`,
      `| listening, nothing stored | ${fmtMb(prod.rss.afterStart)} |`,
      `| ${CREDENTIALS.length} credentials seeded | ${fmtMb(prod.rss.afterSeed)} |`,
      `| ${prod.clientCount.toLocaleString('en-US')} clients loaded and assigned | ${fmtMb(prod.rss.afterClients)} |`,
      `| after ${memRun.requests.total.toLocaleString('en-US')} requests | ${fmtMb(rssEnd)} (peak during the run ${fmtMb(rssPeak)}) |`,
      `| after ${prodServed.toLocaleString('en-US')} requests in all (the /metrics scrapes too) | ${fmtMb(rssAfterCases)} |`,
      '',
      'During the long run:',
      '',
      '| seconds | served in the run (≈) | RSS |',
      '|---:|---:|---:|',
      ...rssSamples.map((x) => `| ${x.seconds.toFixed(0)} | ${x.served.toLocaleString('en-US')} | ${fmtMb(x.rss)} |`),
      '',
      '### The harness (heap after a full GC)',
      '',
      'The harness process is `node --import tsx --expose-gc bench/server.ts serve`: the same buildApp plus the tsx loader, the fake upstream, the limits, a log capture and the bench control server, so its RSS says little; its heap after a forced GC shows what the broker retains.',
      '',
      '| point | RSS | heap used | heap total | external |',
      '|---|---:|---:|---:|---:|',
      `| harness only: \`node --import tsx\` + the modules bench/server.ts imports, nothing started | ${fmtMb(harness.rss)} | ${fmtMb(harness.heapUsed)} | ${fmtMb(harness.heapTotal)} | ${fmtMb(harness.external)} |`,
      `| after start (${CREDENTIALS.length} credentials seeded, no clients) | ${fmtMb(info.rss.afterStart.rss)} | ${fmtMb(info.rss.afterStart.heapUsed)} | ${fmtMb(info.rss.afterStart.heapTotal)} | ${fmtMb(info.rss.afterStart.external)} |`,
      `| after loading and assigning ${info.clientsLoaded.toLocaleString('en-US')} clients | ${fmtMb(info.rss.afterClients.rss)} | ${fmtMb(info.rss.afterClients.heapUsed)} | ${fmtMb(info.rss.afterClients.heapTotal)} | ${fmtMb(info.rss.afterClients.external)} |`,
      `| after the ${q.requests.total.toLocaleString('en-US')}-request query count | ${fmtMb(memAfterQueries.rss)} | ${fmtMb(memAfterQueries.heapUsed)} | ${fmtMb(memAfterQueries.heapTotal)} | ${fmtMb(memAfterQueries.external)} |`,
      `| after ${harnessServed.toLocaleString('en-US')} served requests (incl. the profiled runs) | ${fmtMb(memEnd.rss)} | ${fmtMb(memEnd.heapUsed)} | ${fmtMb(memEnd.heapTotal)} | ${fmtMb(memEnd.external)} |`,
      '',
      '## /metrics',
      '',
      `Scraped from the production process one request at a time (as Prometheus does), 2,000 scrapes with ${prod.clientCount.toLocaleString('en-US')} clients, default process metrics included: p50 ${scrapeRun.latency.p50} ms, p99 ${scrapeP99} ms.`,
      '',
      '## Refresh cost',
      '',
      'Three replicas (test/helpers/app.ts instances) on one database, fake upstream answering after 200 ms (fault `delay`). Each trial moves every clock 5 s into the refresh window, calls `runCycle()` on replica 1 and polls GET /codex-auth on all three every millisecond until each serves the rotated access token. "After upstream" subtracts the moment the upstream received the POST plus its 200 ms delay.',
      '',
      '| trial | runCycle start → all 3 serve it (ms) | after the upstream answered (ms) | per replica (ms) | runCycle resolved (ms) |',
      '|---:|---:|---:|---|---:|',
      ...refresh.trials.map((x, i) => `| ${i + 1} | ${f1(x.totalMs)} | ${f1(x.afterUpstreamMs)} | ${x.perReplicaMs.map(f1).join(', ')} | ${f1(x.runCycleMs)} |`),
      '',
      `Upstream POSTs: ${refresh.upstreamPosts} for ${refresh.trials.length} rotations.`,
      '',
      '## What bounds the numbers',
      '',
      ...missedNotes(),
      '',
      '## CPU profiles',
      '',
      `In-process V8 sampling profiles (node:inspector, 200 µs interval) of the harness process (its own bare Fastify route and broker) over the ${PROFILE_SECONDS} s load window only, after a warm-up; self time as a share of all samples. \`(idle)\` is the server waiting on the load generator. \`writev\` is the socket write of each response.`,
      '',
      ...profiles.flatMap((p) => [
        `### ${p.name} (${f1(p.rps)} req/s while profiled, ${f1(p.busyUs)} µs of non-idle server time per request)`,
        '',
        `Groups: idle ${f1(p.summary.groups.idle)} %, socket writes ${f1(p.summary.groups.writev)} %, GC ${f1(p.summary.groups.gc)} %, crypto ${f1(p.summary.groups.hashing)} %, logger (pino) ${f1(p.summary.groups.logger)} %, prom-client ${f1(p.summary.groups.metrics)} %, fastify & co ${f1(p.summary.groups.fastify)} %, broker src/ ${f1(p.summary.groups.broker)} %, ticks/microtasks ${f1(p.summary.groups.ticks)} %.`,
        '',
        '| area | self time |',
        '|---|---:|',
        ...p.summary.byArea.map((a) => `| ${a.area} | ${f1(a.pct)} % |`),
        '',
        '| function | where | self time |',
        '|---|---|---:|',
        ...p.summary.top.map((e) => `| \`${e.fn}\` | ${e.where} | ${f1(e.pct)} % |`),
        '',
      ]),
    ];
    // Hand-written history (before/after of hot-path changes) below the marker survives re-runs.
    const file = path.join(root, 'BENCHMARKS.md');
    const previous = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
    const at = previous.indexOf(HISTORY_MARKER);
    const history = at >= 0 ? previous.slice(at) : `${HISTORY_MARKER}\n`;
    fs.writeFileSync(file, `${md.join('\n')}\n\n${history}`);
    console.log(`\nwrote BENCHMARKS.md (${((Date.now() - started.getTime()) / 1000).toFixed(0)} s)`);
  } finally {
    for (const c of children) await stopChild(c).catch(() => undefined);
    for (const stop of stoppers) await stop().catch(() => undefined);
    await pg.stop();
  }
}

await main();
