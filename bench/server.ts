/**
 * The servers under load, in a process of their own so that autocannon (bench/run.ts)
 * does not share their event loop.
 *
 *   node --import tsx bench/server.ts serve   <DATABASE_URL in env>
 *     the broker (3 credentials in one pool, 10,000 clients assigned across them), a bare Fastify route and a raw node:http server, all on
 *     127.0.0.1; prints one JSON line (ports, sample tokens, RSS) and runs until SIGTERM.
 *   node --import tsx bench/server.ts limits   <BENCH_BODY in env>
 *     only the limits: a bare Fastify route and a raw node:http server serving BENCH_BODY
 *     (and, to a POST, BENCH_POST_BODY);
 *     prints one JSON line ({ pid, fastifyPort, rawPort }) and runs until SIGTERM.
 *   node --import tsx bench/server.ts refresh <DATABASE_URL in env>
 *     three replicas on one database; times a due refresh (upstream answering in 200 ms)
 *     until all three serve the rotated token; prints one JSON line and exits.
 */
import { createServer } from 'node:http';
import { Session } from 'node:inspector';
import type { AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';
import Fastify from 'fastify';
import { refreshLeadSeconds } from '../src/due.js';
import { holdTickObjects, settleRequestShapes } from '../src/lib/shapes.js';
import { ADMIN_TOKEN, createTestApp, type TestApp } from '../test/helpers/app.js';
import { bulkInsert } from '../test/helpers/bulk-clients.js';
import { FakeUpstream } from '../test/helpers/fake-upstream.js';
import { CLIENTS, CREDENTIALS, LOADED_CLIENTS } from './fleet.js';

const LONG = 3_600_000;

export interface ServeInfo {
  pid: number;
  brokerPort: number;
  fastifyPort: number;
  rawPort: number;
  /** Bench-only control server: GET /mem[?gc=1], POST /profile/start, POST /profile/stop, POST /alloc/start, POST /alloc/stop. */
  controlPort: number;
  bodyBytes: number;
  clients: Array<{ token: string; etag: string; refresh: string; workspaceId: string }>;
  staleGeneration: string;
  rss: { afterStart: NodeJS.MemoryUsage; afterClients: NodeJS.MemoryUsage };
  clientsLoaded: number;
}

export interface RefreshTrial {
  /** From runCycle start to all three replicas serving the rotated token. */
  totalMs: number;
  /** From the upstream's answer (request arrival + its 200 ms delay) to all three serving it. */
  afterUpstreamMs: number;
  perReplicaMs: number[];
  runCycleMs: number;
}

export interface LimitsInfo {
  pid: number;
  fastifyPort: number;
  rawPort: number;
}

const databaseUrl = process.env['DATABASE_URL'] ?? '';
const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };

function workspaceId(i: number): string {
  return `00000000-0000-4000-8000-${String(i).padStart(12, '0')}`;
}

async function listen(server: ReturnType<typeof createServer>): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return (server.address() as AddressInfo).port;
}

/** process.memoryUsage(), after a full GC when asked (the child runs with --expose-gc). */
function memory(gc: boolean): NodeJS.MemoryUsage {
  const g = (globalThis as { gc?: () => void }).gc;
  if (gc && g) g();
  return process.memoryUsage();
}

/** A control server on its own port: memory and an in-process CPU profile of a load window. */
async function controlServer(): Promise<number> {
  const session = new Session();
  session.connect();
  const post = (method: string, params: object = {}) =>
    new Promise<unknown>((resolve, reject) => session.post(method, params, (err, res) => (err ? reject(err) : resolve(res))));
  const server = createServer((req, res) => {
    const reply = (body: unknown) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body));
    };
    const fail = (err: Error) => {
      res.writeHead(500);
      res.end(err.message);
    };
    if (req.url?.startsWith('/mem')) return reply(memory(req.url.includes('gc=1')));
    if (req.url === '/profile/start') {
      post('Profiler.enable')
        .then(() => post('Profiler.setSamplingInterval', { interval: 200 }))
        .then(() => post('Profiler.start'))
        .then(() => reply({ ok: true }), fail);
      return;
    }
    if (req.url === '/profile/stop') {
      post('Profiler.stop').then((r) => reply((r as { profile: unknown }).profile), fail);
      return;
    }
    // Sampled allocations of a load window, garbage included (what each request allocates).
    if (req.url === '/alloc/start') {
      post('HeapProfiler.enable')
        .then(() => post('HeapProfiler.startSampling', { samplingInterval: 1024, includeObjectsCollectedByMajorGC: true, includeObjectsCollectedByMinorGC: true }))
        .then(() => reply({ ok: true }), fail);
      return;
    }
    if (req.url === '/alloc/stop') {
      post('HeapProfiler.stopSampling').then((r) => reply((r as { profile: unknown }).profile), fail);
      return;
    }
    res.writeHead(404);
    res.end();
  });
  return listen(server);
}

/**
 * The limits: the same bytes, from a bare Fastify route and from node:http. The same two
 * also answer a POST /oauth/token with a JSON body (parsed, then `postBody`, the shim's
 * answer): what any POST route with a body costs, the floor for the shim's ratio.
 */
async function startLimits(body: string, postBody: string) {
  const bare = Fastify({ logger: false });
  bare.get('/codex-auth', async (_req, reply) => reply.type('application/json; charset=utf-8').send(body));
  bare.post('/oauth/token', async (req, reply) => {
    if (typeof (req.body as { refresh_token?: unknown } | null)?.refresh_token !== 'string') return reply.code(400).send();
    return reply.header('cache-control', 'no-store').type('application/json; charset=utf-8').send(postBody);
  });
  await bare.listen({ port: 0, host: '127.0.0.1' });
  const raw = createServer((req, res) => {
    if (req.method !== 'POST') {
      res.writeHead(200, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body) });
      res.end(body);
      return;
    }
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      let ok: boolean;
      try {
        ok = typeof (JSON.parse(Buffer.concat(chunks).toString('utf8')) as { refresh_token?: unknown } | null)?.refresh_token === 'string';
      } catch {
        ok = false;
      }
      if (!ok) {
        res.writeHead(400);
        res.end();
        return;
      }
      res.writeHead(200, { 'cache-control': 'no-store', 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(postBody) });
      res.end(postBody);
    });
  });
  const rawPort = await listen(raw);
  return { bare, raw, rawPort };
}

async function limits(body: string, postBody: string): Promise<void> {
  const { bare, raw, rawPort } = await startLimits(body, postBody);
  const info: LimitsInfo = { pid: process.pid, fastifyPort: (bare.server.address() as AddressInfo).port, rawPort };
  process.stdout.write(`${JSON.stringify(info)}\n`);
  process.once('SIGTERM', () => {
    raw.close();
    void bare.close().then(() => process.exit(0));
  });
}

async function serve(url: string): Promise<void> {
  const controlPort = await controlServer();
  const upstream = await FakeUpstream.start();
  // Background work slowed right down: steady state is what is measured.
  // The login sweep (every 15 s) and each credential's refresh check too: on a slow run
  // they land in the query count's window.
  const t = await createTestApp({
    databaseUrl: url,
    upstreamUrl: upstream.url,
    clientReloadMs: LONG,
    clientFlushMs: LONG,
    login: { sweepMs: LONG },
    config: { REFRESH_CHECK_INTERVAL_SECONDS: LONG / 1000 },
  });
  // One pool, three logins: serving goes through each client's stored assignment.
  for (const name of CREDENTIALS) {
    const url = name === 'default' ? '/admin/credential' : `/admin/credentials/${name}`;
    const seeded = await t.app.inject({ method: 'PUT', url, headers: admin, payload: upstream.seed({ accountId: `bench-${name}` }) });
    if (seeded.statusCode !== 200) throw new Error(`seed ${name} failed: ${seeded.body}`);
  }
  const afterStart = memory(true);

  // 10,000 clients in one statement, in the shape createClient writes.
  const bulk = bulkInsert(t.core.credentialSecret, CLIENTS, { prefix: 'bench', workspaceId });
  const { tokens } = bulk;
  await t.core.pool.query(bulk.text, bulk.values);
  await t.core.clients.reload();
  // Store every client's assignment (as the first replica to see them does), then reload them.
  await t.core.assignments.rebalance();
  await t.core.clients.reload();
  const afterClients = memory(true);

  const clients: ServeInfo['clients'] = [];
  let body = '';
  for (let i = 0; i < LOADED_CLIENTS; i++) {
    const token = tokens[i] ?? '';
    const r = await t.app.inject({ url: '/codex-auth', headers: { authorization: `Bearer ${token}` } });
    if (r.statusCode !== 200) throw new Error(`GET /codex-auth: ${r.statusCode} ${r.body}`);
    body ||= r.body;
    const doc = r.json() as { tokens: { refresh_token: string } };
    clients.push({ token, etag: String(r.headers.etag), refresh: doc.tokens.refresh_token.split('.')[0] ?? '', workspaceId: workspaceId(i) });
  }

  const { bare, raw, rawPort } = await startLimits(body, '{}');
  await t.app.listen({ port: 0, host: '127.0.0.1' });

  const info: ServeInfo = {
    pid: process.pid,
    brokerPort: (t.app.server.address() as AddressInfo).port,
    fastifyPort: (bare.server.address() as AddressInfo).port,
    rawPort,
    controlPort,
    bodyBytes: Buffer.byteLength(body),
    clients,
    staleGeneration: 'AAAAAAAAAAAA',
    rss: { afterStart, afterClients },
    clientsLoaded: t.core.clients.size,
  };
  process.stdout.write(`${JSON.stringify(info)}\n`);

  let closing = false;
  const stop = () => {
    if (closing) return;
    closing = true;
    void (async () => {
      raw.close();
      await bare.close();
      await t.close();
      await upstream.close();
      // A normal exit, so that --cpu-prof writes its profile.
      process.exit(0);
    })();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

async function refresh(url: string, trials: number): Promise<void> {
  let offset = 0;
  const now = () => Date.now() + offset;
  const upstream = await FakeUpstream.start({ now });
  const opts = { databaseUrl: url, upstreamUrl: upstream.url, now, clientReloadMs: LONG, clientFlushMs: LONG, config: { REFRESH_CHECK_INTERVAL_SECONDS: 3600 } };
  const replicas: TestApp[] = [];
  for (let i = 0; i < 3; i++) replicas.push(await createTestApp(opts));
  const a = replicas[0] as TestApp;
  const created = await a.app.inject({ method: 'POST', url: '/admin/clients', headers: admin, payload: { name: 'bench-refresh' } });
  if (created.statusCode !== 201) throw new Error(`client: ${created.body}`);
  const auth = { authorization: `Bearer ${(created.json() as { token: string }).token}` };
  const seeded = await a.app.inject({ method: 'PUT', url: '/admin/credential', headers: admin, payload: upstream.seed() });
  if (seeded.statusCode !== 200) throw new Error(`seed failed: ${seeded.body}`);

  const served = async (r: TestApp): Promise<string | undefined> => {
    const res = await r.app.inject({ url: '/codex-auth', headers: auth });
    return res.statusCode === 200 ? (res.json() as { tokens: { access_token: string } }).tokens.access_token : undefined;
  };
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
  const waitAll = async (pred: (at: string | undefined) => boolean, t0: number, limitMs: number): Promise<number[]> => {
    const at: Array<number | undefined> = [undefined, undefined, undefined];
    while (at.some((x) => x === undefined)) {
      for (let i = 0; i < 3; i++) if (at[i] === undefined && pred(await served(replicas[i] as TestApp))) at[i] = performance.now() - t0;
      if (performance.now() - t0 > limitMs) throw new Error('replicas did not converge');
      await sleep(1);
    }
    return at as number[];
  };
  // Every replica serves the seeded credential and knows the client.
  await waitAll((x) => x !== undefined, performance.now(), 10_000);

  const out: RefreshTrial[] = [];
  for (let n = 0; n < trials; n++) {
    const snap = a.core.refresher.current();
    const old = snap?.parsed.tokens.access_token;
    if (!snap?.claims.exp || !old) throw new Error('no credential');
    // Move every replica's clock (and the upstream's) to 5 s into the refresh window.
    const lead = refreshLeadSeconds(snap.claims, 86_400);
    offset += (snap.claims.exp - lead + 5) * 1000 - now();
    upstream.fault({ kind: 'delay', ms: 200 });
    const postsBefore = upstream.posts;
    let arrived: number | undefined;
    const t0 = performance.now();
    let runCycleMs = 0;
    const cycle = a.core.refresher.runCycle({ reason: 'bench' }).then((r) => {
      runCycleMs = performance.now() - t0;
      return r;
    });
    const watch = setInterval(() => {
      if (arrived === undefined && upstream.posts > postsBefore) arrived = performance.now() - t0;
    }, 1);
    const perReplicaMs = await waitAll((x) => x !== undefined && x !== old, t0, 10_000);
    clearInterval(watch);
    const report = await cycle;
    if (report.attempt !== 'rotated') throw new Error(`cycle: ${JSON.stringify(report)}`);
    const totalMs = Math.max(...perReplicaMs);
    out.push({ totalMs, afterUpstreamMs: totalMs - ((arrived ?? 0) + 200), perReplicaMs, runCycleMs });
    await sleep(200);
  }
  process.stdout.write(`${JSON.stringify({ trials: out, upstreamPosts: upstream.posts })}\n`);
  for (const r of replicas) await r.close();
  await upstream.close();
  process.exit(0);
}

// As the broker's serve does at start (src/lib/shapes.ts): the bare route is measured as a
// process that V8 sized well, never as one of the 1 in 5 that turn every response into a
// dictionary (that would flatter every ratio to it), nor one that builds its tick objects
// in V8's runtime (holdTickObjects, likewise).
settleRequestShapes();
await holdTickObjects();
const mode = process.argv[2] ?? 'serve';
if (mode !== 'limits' && !databaseUrl) throw new Error('DATABASE_URL is required');
if (mode === 'limits') await limits(process.env['BENCH_BODY'] ?? '', process.env['BENCH_POST_BODY'] ?? '{}');
else if (mode === 'serve') await serve(databaseUrl);
else if (mode === 'refresh') await refresh(databaseUrl, Number(process.env['BENCH_REFRESH_TRIALS'] ?? 5));
else throw new Error(`unknown mode ${mode}`);
