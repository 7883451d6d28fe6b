/**
 * What the broker's process loads, and so holds in memory for its whole life (issue #16:
 * RSS with 3 credentials and 10,000 clients). Code that the broker never runs costs heap
 * (its source and bytecode) and resident pages all the same; BENCHMARKS.md (history,
 * session 10) has the figures.
 */
import { strict as assert } from 'node:assert';
import type * as Crypto from 'node:crypto';
import * as fs from 'node:fs';
import { createRequire, syncBuiltinESMExports } from 'node:module';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, test } from 'node:test';
import { ADMIN_TOKEN } from './helpers/app.js';
import { insertClients } from './helpers/bulk-clients.js';
import { freePort } from './helpers/pg.js';
import { runProcess } from './helpers/process.js';
import { spawnServePreloaded, statusOf, stopAndRead } from './helpers/serve.js';
import { useSuite } from './helpers/suite.js';
import { tempDirs } from './helpers/tmp.js';
import { waitFor } from './helpers/wait.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const suite = useSuite();
const tmp = tempDirs('cab-footprint-');

// Loaded into the broker with NODE_OPTIONS=--import: at exit, every CommonJS file and every
// Node built-in module the process loaded.
const PRELOAD = [
  "import { createRequire } from 'node:module';",
  "const cache = createRequire(process.cwd() + '/').cache;",
  "const builtins = () => process.moduleLoadList.filter((m) => m.startsWith('NativeModule ')).map((m) => m.slice('NativeModule '.length));",
  "process.on('exit', () => process.stderr.write('\\nLOADED ' + JSON.stringify({ files: Object.keys(cache), builtins: builtins() }) + '\\n'));",
].join('\n');

interface Loaded {
  /** CommonJS files, with / separators. */
  files: string[];
  /** Node's built-in modules (process.moduleLoadList), internal ones included. */
  builtins: string[];
}

/**
 * What a serving broker (`codex-auth-broker serve` on Postgres, built and answering
 * /healthz and GET /codex-auth) has loaded by the time it stops on SIGTERM.
 */
let loaded: Promise<Loaded> | undefined;
function loadedModules(): Promise<Loaded> {
  loaded ??= serveAndList();
  return loaded;
}

async function loadedFiles(): Promise<string[]> {
  return (await loadedModules()).files;
}

async function serveAndList(): Promise<Loaded> {
  const upstream = await suite.upstream();
  const port = await freePort();
  const b = spawnServePreloaded({ DATABASE_URL: await suite.pg.newDatabase(), DATA_DIR: tmp(), OAUTH_TOKEN_URL: upstream.url, PORT: String(port) }, PRELOAD);
  await waitFor('the broker answering /healthz', async () => (await statusOf(port)) === 200, 60_000, b.out);
  assert.equal((await fetch(`http://127.0.0.1:${port}/codex-auth`)).status, 401);
  const l = await stopAndRead<Loaded>(b, 'LOADED');
  return { files: l.files.map((f) => f.split(path.sep).join('/')), builtins: l.builtins };
}

function sourceFiles(dir: string): string[] {
  return fs
    .readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile() && e.name.endsWith('.ts'))
    .map((e) => path.join(e.parentPath, e.name));
}

describe('what the broker loads', () => {
  test("the broker process loads undici's client and proxy agent, not the rest of undici (no fetch, WebSocket, EventSource, mock agents or cache stores)", async () => {
    const undici = (await loadedFiles())
      .filter((f) => f.includes('/node_modules/undici/'))
      .map((f) => f.slice(f.indexOf('/node_modules/undici/') + '/node_modules/undici/'.length));
    // What the broker does use (the proof that this looked at the right process).
    for (const used of ['lib/dispatcher/env-http-proxy-agent.js', 'lib/dispatcher/agent.js', 'lib/api/api-request.js']) {
      assert.ok(undici.includes(used), `${used} is not loaded; loaded: ${undici.join(', ')}`);
    }
    assert.ok(!undici.includes('index.js'), "undici's index (all of undici) is loaded");
    const unused = undici.filter((f) => /^lib\/(web|mock|cache|interceptor)\//.test(f));
    assert.deepEqual(unused, [], 'parts of undici the broker never uses are loaded');
  });

  test('the broker process loads no JSON-schema compiler (Ajv, fast-json-stringify): no route declares a schema', async () => {
    const files = await loadedFiles();
    assert.ok(files.some((f) => f.includes('/node_modules/fastify/')), 'fastify is not loaded: the test looked at the wrong process');
    // (fastify's precompiled error serializer needs fast-json-stringify's small runtime, lib/serializer.js: not a compiler.)
    const compilers = files.filter((f) => /\/node_modules\/(ajv|ajv-formats|@fastify\/ajv-compiler|@fastify\/fast-json-stringify-compiler)\/|\/node_modules\/fast-json-stringify\/index\.js$/.test(f));
    assert.deepEqual(compilers, []);
  });

  test("the broker process never loads Node's own fetch implementation (pg's Cloudflare probe is answered without it, src/lib/pg.ts)", async () => {
    const { builtins } = await loadedModules();
    // What it does load (the proof that this looked at the right process): pg's sockets.
    assert.ok(builtins.includes('net'), `net is not loaded; loaded: ${builtins.join(', ')}`);
    assert.ok(!builtins.includes('internal/deps/undici/undici'), "Node's bundled undici (fetch) is loaded");
  });

  test("no source imports node:http's values as an ES module (on Node 22, the image, that import reads http.WebSocket, which loads fetch): values come from src/lib/node-http.ts", () => {
    const valueImport = /^import\s+(?!type\b)[^;]*?from\s+['"](node:)?http['"]/m;
    const offenders = sourceFiles(path.join(ROOT, 'src')).filter((f) => valueImport.test(fs.readFileSync(f, 'utf8')));
    assert.deepEqual(offenders.map((f) => path.relative(ROOT, f)), []);
    // The check itself: it sees a value import, and lets a type-only one through.
    assert.ok(valueImport.test("import { createServer, type Server } from 'node:http';"));
    assert.ok(!valueImport.test("import type { IncomingMessage } from 'node:http';"));
    const users = sourceFiles(path.join(ROOT, 'src')).filter((f) => /from ['"]\.{1,2}\/(lib\/)?node-http\.js['"]/.test(fs.readFileSync(f, 'utf8')));
    assert.ok(users.length >= 2, 'no source file takes node:http from src/lib/node-http.ts: the test looked in the wrong place');
  });

  /** A node process (tsx) that runs `before`, imports src/lib/pg.ts, then `after`; its last line of output, parsed. */
  async function withPgModule(before: string[], after: string[]): Promise<unknown> {
    const script = [
      "const fetchLoaded = () => process.moduleLoadList.includes('NativeModule internal/deps/undici/undici');",
      ...before,
      `const { pg } = await import(${JSON.stringify(pathToFileURL(path.join(ROOT, 'src', 'lib', 'pg.ts')).href)});`,
      ...after,
    ].join('\n');
    const r = await runProcess(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: ROOT, env: process.env, input: '', timeoutMs: 60_000 });
    assert.equal(r.code, 0, r.stderr);
    return JSON.parse(r.stdout.trim().split('\n').at(-1) ?? '');
  }

  test('src/lib/pg.ts loads pg without fetch and leaves the global Response as it was: still lazy, and working when asked for', async () => {
    const seen = await withPgModule(
      [],
      [
        'const before = fetchLoaded();',
        // Node 20's lazy global is an accessor; on Node 22 (a navigator) reading it is what loads fetch.
        "const lazy = 'navigator' in globalThis ? 'function' : typeof Object.getOwnPropertyDescriptor(globalThis, 'Response').get;",
        "const text = await new Response('works').text();",
        'console.log(JSON.stringify({ pool: typeof pg.Pool, before, lazy, text, after: fetchLoaded() }));',
      ],
    );
    assert.deepEqual(seen, { pool: 'function', before: false, lazy: 'function', text: 'works', after: true });
  });

  test("src/lib/pg.ts leaves Response alone where pg skips its probe (a navigator with a string userAgent, as on Node 21 and later): on Node 22 even reading Response's descriptor loads fetch", async () => {
    const seen = await withPgModule(
      [
        // Node 21 and later have one already (a getter); Node 20 gets one shaped like it.
        "if (!('navigator' in globalThis)) Object.defineProperty(globalThis, 'navigator', { value: { userAgent: 'Node.js/22' }, configurable: true });",
        'const getDescriptor = Object.getOwnPropertyDescriptor;',
        'let read = false;',
        "Object.getOwnPropertyDescriptor = function (o, k) { if (o === globalThis && k === 'Response') read = true; return getDescriptor.call(this, o, k); };",
      ],
      ['Object.getOwnPropertyDescriptor = getDescriptor;', 'console.log(JSON.stringify({ pool: typeof pg.Pool, read, fetch: fetchLoaded() }));'],
    );
    assert.deepEqual(seen, { pool: 'function', read: false, fetch: false });
  });

  test("the broker imports jose's decodeJwt alone (jose/jwt/decode), not jose's index", () => {
    const offenders = sourceFiles(path.join(ROOT, 'src')).filter((f) => /from ['"]jose['"]/.test(fs.readFileSync(f, 'utf8')));
    assert.deepEqual(offenders.map((f) => path.relative(ROOT, f)), []);
    const users = sourceFiles(path.join(ROOT, 'src')).filter((f) => /from ['"]jose\/jwt\/decode['"]/.test(fs.readFileSync(f, 'utf8')));
    assert.ok(users.length > 0, 'no source file imports jose/jwt/decode: the test looked in the wrong place');
  });
});

describe('what loading clients allocates', () => {
  test('loading and assigning 2,000 clients builds no hash object per client: SHA-256 is one-shot (crypto.hash), not createHash', async (t) => {
    // A createHash object keeps its native digest context (about 300 bytes of malloc) until
    // a GC collects it: a reload and an assignment of 10,000 clients built 40,000 of them,
    // and the process's malloc arena kept the peak (BENCHMARKS.md, history, session 11).
    const upstream = await suite.upstream();
    const a = await suite.app({ databaseUrl: await suite.pg.newDatabase(), upstreamUrl: upstream.url, clientReloadMs: 3_600_000, clientFlushMs: 3_600_000 });
    for (const name of ['one', 'two', 'three']) {
      const res = await a.app.inject({ method: 'PUT', url: `/admin/credentials/${name}`, headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, payload: upstream.seed({ accountId: `acct-${name}` }) });
      assert.equal(res.statusCode, 200, res.body);
    }
    const crypto = createRequire(import.meta.url)('node:crypto') as typeof Crypto;
    const original = crypto.createHash;
    let calls = 0;
    crypto.createHash = function (this: unknown, ...args: Parameters<typeof original>) {
      calls++;
      return original.apply(this, args);
    } as typeof original;
    syncBuiltinESMExports();
    t.after(() => {
      crypto.createHash = original;
      syncBuiltinESMExports();
    });
    // The count sees what an ES module importing node:crypto calls (the proof that it can fail).
    (await import('node:crypto')).createHash('sha256');
    assert.equal(calls, 1);
    calls = 0;

    const clients = await insertClients(a.core, 2_000, 'ws');
    await a.core.assignments.rebalance();
    await a.core.clients.reload();
    const assigned = await a.core.pool.query<{ n: string }>('SELECT count(*) AS n FROM broker_clients WHERE assigned_credential IS NOT NULL');
    assert.equal(Number(assigned.rows[0]?.n), clients.length, 'the clients were not assigned: the test measured nothing');
    assert.equal((await a.app.inject({ url: '/codex-auth', headers: { authorization: `Bearer ${clients[0]?.token}` } })).statusCode, 200);
    assert.ok(calls < 20, `${calls} createHash calls for ${clients.length} clients`);
  });
  /** An app (background flushes and reloads slowed right down) serving one credential to three assigned clients. */
  const servingThree = async (accountId: string, prefix: string) => {
    const upstream = await suite.upstream();
    const a = await suite.app({ databaseUrl: await suite.pg.newDatabase(), upstreamUrl: upstream.url, clientReloadMs: 3_600_000, clientFlushMs: 3_600_000 });
    const seeded = await a.app.inject({ method: 'PUT', url: '/admin/credential', headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, payload: upstream.seed({ accountId }) });
    assert.equal(seeded.statusCode, 200, seeded.body);
    const clients = await insertClients(a.core, 3, prefix);
    await a.core.assignments.rebalance();
    await a.core.clients.reload();
    return { a, clients };
  };
  test("a client's last-seen time is always a number (0 = never seen), so serving overwrites it in place instead of leaving a timestamp object per request to be promoted", async () => {
    // A field that may hold undefined makes V8 box every stored timestamp; the box lives until
    // the client's next poll and is promoted into the old generation (BENCHMARKS.md, history,
    // session 12: promoted bytes per scavenge 10.4 KB -> 4.2 KB for GET /codex-auth 200).
    const { a, clients } = await servingThree('acct-seen', 'seen');
    const all = [...a.core.clients.all()];
    assert.equal(all.length, clients.length);
    for (const c of all) assert.equal(c.lastSeenAt, 0, 'a never-seen client holds 0');
    assert.equal((await a.app.inject({ url: '/codex-auth', headers: { authorization: `Bearer ${clients[0]?.token}` } })).statusCode, 200);
    const counts = a.core.clients.counts(() => undefined);
    assert.equal(counts.never_seen, clients.length - 1, 'the served client is no longer never-seen');
    await a.core.clients.flush();
    await a.core.clients.reload();
    for (const c of a.core.clients.all()) assert.equal(typeof c.lastSeenAt, 'number', 'after a flush and a reload, too');
    assert.ok([...a.core.clients.all()].some((c) => c.lastSeenAt > 0));
  });
  test('a served client is queued for the last-seen write once per flush: served many times, written once; a failed flush queues it again, without doubles', async () => {
    // A Set's add() on every request was a measured share of serving (BENCHMARKS.md, history,
    // session 16); a record now carries the flush epoch it was queued in.
    const { a, clients } = await servingThree('acct-queue', 'queue');
    const serve = async (token: string | undefined, times: number) => {
      for (let i = 0; i < times; i++) assert.equal((await a.app.inject({ url: '/codex-auth', headers: { authorization: `Bearer ${token}` } })).statusCode, 200);
    };
    await serve(clients[0]?.token, 20);
    await serve(clients[1]?.token, 5);
    assert.equal(await a.core.clients.flush(), 2, 'two clients served: two rows, however many requests');
    assert.equal(await a.core.clients.flush(), 0, 'nothing served since');
    await serve(clients[0]?.token, 3);
    // The write fails once: the batch is queued again, and a client served meanwhile is not doubled.
    const pool = a.core.pool as unknown as { query: (...args: unknown[]) => Promise<unknown> };
    const real = pool.query;
    pool.query = function (this: unknown, ...args: unknown[]) {
      if (String(args[0]).includes('UPDATE broker_clients AS c SET')) {
        pool.query = real;
        return serve(clients[0]?.token, 2).then(() => Promise.reject(new Error('database went away')));
      }
      return real.apply(this, args);
    };
    await assert.rejects(a.core.clients.flush(), /database went away/);
    assert.equal(await a.core.clients.flush(), 1, 'queued again once, not twice');
    const rows = await a.core.pool.query<{ name: string; seen: boolean }>('SELECT name, last_used_at IS NOT NULL AS seen FROM broker_clients ORDER BY name');
    assert.deepEqual(
      rows.rows.map((r) => [r.name, r.seen]),
      clients.map((c, i) => [c.name, i < 2]),
    );
  });
});
