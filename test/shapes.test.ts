/**
 * The broker settles V8's sizing of Node's request objects before it serves (issue #16:
 * "dear processes", BENCHMARKS.md history, session 17). V8 sizes a constructor's objects
 * from the hidden classes its earlier objects left behind; when that happens after a full
 * GC collected them all, every later ServerResponse and Socket becomes a dictionary-mode
 * object and the process pays about 1.4x per request for life.
 *
 * It also holds one of Node's tick objects for life (session 19): full GCs with no tick
 * object alive collect their hidden classes, and after a few the caches that build them
 * give up (megamorphic): every later process.nextTick builds its object in V8's runtime,
 * several times slower, for the life of the process. Read from V8's own feedback
 * (%DebugPrint of process.nextTick).
 *
 * The checks read V8's own answer (%HasFastProperties), in processes of their own: one
 * plain node process that reproduces the condition with and without settleRequestShapes,
 * and a serving broker driven into the same condition (a full GC after every response,
 * a new connection per request).
 */
import { strict as assert } from 'node:assert';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, test } from 'node:test';
import { freePort } from './helpers/pg.js';
import { runProcess } from './helpers/process.js';
import { spawnServePreloaded, statusOf, stopAndRead } from './helpers/serve.js';
import { useSuite } from './helpers/suite.js';
import { tempDirs } from './helpers/tmp.js';
import { waitFor } from './helpers/wait.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const suite = useSuite();
const tmp = tempDirs('cab-shapes-');

/**
 * Run before the main module (NODE_OPTIONS=--import): V8's natives syntax and gc() switched
 * on at run time; each request's IncomingMessage, ServerResponse and Socket checked for
 * fast properties as the server emits it; a full GC after every response (so every earlier
 * response is collected before the next is built); the findings on stderr at exit.
 */
const PROBE = [
  "import * as http from 'node:http';",
  "import * as v8 from 'node:v8';",
  "import * as vm from 'node:vm';",
  "v8.setFlagsFromString('--allow-natives-syntax');",
  "v8.setFlagsFromString('--expose-gc');",
  "const gc = vm.runInNewContext('gc');",
  "const fast = new Function('o', 'return %HasFastProperties(o)');",
  'const seen = [];',
  'const emit = http.Server.prototype.emit;',
  'http.Server.prototype.emit = function (event, req, res) {',
  "  if (event === 'request') {",
  '    seen.push({ req: fast(req), res: fast(res), socket: fast(req.socket) });',
  "    res.once('finish', () => setImmediate(gc));",
  '  }',
  '  return emit.apply(this, arguments);',
  '};',
  "process.on('exit', () => process.stderr.write('\\nSHAPES ' + JSON.stringify(seen) + '\\n'));",
  // V8's feedback of process.nextTick, on stdout (V8 writes it there itself, past Node's
  // stream: the pipe is made blocking first, or a full pipe drops the rest).
  "const debugPrint = new Function('f', '%DebugPrint(f)');",
  "process.on('exit', () => { process.stdout._handle?.setBlocking?.(true); debugPrint(process.nextTick); });",
].join('\n');

/** Run an ES module script in a plain node process with V8's natives and gc(); its stdout. */
async function nativesScript(script: string): Promise<string> {
  const r = await runProcess(process.execPath, ['--import', 'tsx', '--allow-natives-syntax', '--expose-gc', '--input-type=module', '-e', script], {
    cwd: ROOT,
    env: process.env,
    input: '',
    timeoutMs: 60_000,
  });
  assert.equal(r.code, 0, r.stderr);
  return r.stdout;
}

/**
 * The states of the caches that build a tick object (process.nextTick's literal, one per
 * property), from V8's %DebugPrint of process.nextTick: 4 on Node 20, 5 on Node 22 and 24.
 */
function tickLiteralStates(debugPrint: string): string[] {
  const states = [...debugPrint.matchAll(/DefineKeyedOwnPropertyInLiteral (\w+)/g)].map((m) => m[1] ?? '');
  assert.ok(states.length >= 4, `no tick-object literal in V8's feedback of process.nextTick (did its %DebugPrint format change?): ${debugPrint.slice(0, 2000)}`);
  return states;
}

/**
 * A plain node process: optionally holdTickObjects, then the condition (ticks, then a full
 * GC with none alive, ten times), then V8's feedback of process.nextTick.
 */
async function tickProcess(hold: boolean): Promise<string[]> {
  const shapes = pathToFileURL(path.join(ROOT, 'src', 'lib', 'shapes.ts')).href;
  const script = [
    `import { holdTickObjects } from ${JSON.stringify(shapes)};`,
    `if (${hold}) await holdTickObjects();`,
    'const noop = () => {};',
    'const turn = () => new Promise((r) => setImmediate(r));',
    'for (let i = 0; i < 10; i++) {',
    '  for (let j = 0; j < 50; j++) process.nextTick(noop);',
    '  await turn();',
    '  gc();',
    '  await turn();',
    '}',
    // V8 writes past Node's stream: blocking, or a full pipe drops the rest.
    'process.stdout._handle?.setBlocking?.(true);',
    '%DebugPrint(process.nextTick);',
  ].join('\n');
  return tickLiteralStates(await nativesScript(script));
}

/** A plain node process: optionally settleRequestShapes, then the condition, then V8's verdict on a new socket, request and response. */
async function plainProcess(settle: boolean): Promise<{ req: boolean; res: boolean; socket: boolean }> {
  const shapes = pathToFileURL(path.join(ROOT, 'src', 'lib', 'shapes.ts')).href;
  const script = [
    "import { IncomingMessage, ServerResponse } from 'node:http';",
    "import { Socket } from 'node:net';",
    `import { settleRequestShapes } from ${JSON.stringify(shapes)};`,
    `if (${settle}) settleRequestShapes();`,
    // Each object built after every earlier one was collected, more times than V8's sizing
    // window (built in a function, so nothing of it is still in scope at the gc()).
    'function build() {',
    "  const q = new IncomingMessage(new Socket()); q.method = 'GET'; q.httpVersionMajor = 1; q.httpVersionMinor = 1;",
    '  new ServerResponse(q);',
    '}',
    'for (let i = 0; i < 12; i++) {',
    '  build();',
    '  gc();',
    '}',
    'const socket = new Socket();',
    "const req = new IncomingMessage(socket); req.method = 'GET'; req.httpVersionMajor = 1; req.httpVersionMinor = 1;",
    'const res = new ServerResponse(req);',
    'console.log(JSON.stringify({ req: %HasFastProperties(req), res: %HasFastProperties(res), socket: %HasFastProperties(socket) }));',
  ].join('\n');
  return JSON.parse((await nativesScript(script)).trim().split('\n').at(-1) ?? '') as { req: boolean; res: boolean; socket: boolean };
}

describe("V8's shapes of Node's per-request objects (settleRequestShapes, holdTickObjects)", () => {
  test('without settling, a ServerResponse built after its predecessors were collected is a dictionary-mode object (the condition is real on this Node)', async () => {
    // A Socket goes the same way in a plain node process; under tsx (this script's loader),
    // which opens sockets of its own as it starts, the Socket's sizing is over before the script runs.
    // If this fails, this V8 no longer sizes objects this way and src/lib/shapes.ts can go.
    assert.equal((await plainProcess(false)).res, false);
  });

  test('settleRequestShapes keeps a later ServerResponse, IncomingMessage and Socket in fast mode under the same condition', async () => {
    assert.deepEqual(await plainProcess(true), { req: true, res: true, socket: true });
  });

  test('without holding one, full GCs with no tick object alive make the caches that build tick objects megamorphic (the condition is real on this Node)', async () => {
    // If this fails, this V8 keeps those hidden classes (or its caches cope) and holdTickObjects can go.
    const states = await tickProcess(false);
    assert.ok(states.slice(1).every((s) => s === 'MEGAMORPHIC'), states.join(' '));
  });

  test('holdTickObjects keeps the caches that build tick objects monomorphic under the same condition', async () => {
    const states = await tickProcess(true);
    assert.deepEqual(
      states.filter((s) => s !== 'MONOMORPHIC'),
      [],
      states.join(' '),
    );
  });

  test('a serving broker keeps its responses, requests and sockets in fast mode, and builds its tick objects in compiled code, when a full GC follows every response (serve settles the shapes and holds a tick object at start)', async () => {
    const upstream = await suite.upstream();
    const port = await freePort();
    const b = spawnServePreloaded({ DATABASE_URL: await suite.pg.newDatabase(), DATA_DIR: tmp(), OAUTH_TOKEN_URL: upstream.url, PORT: String(port) }, PROBE);
    await waitFor('the broker answering /healthz', async () => (await statusOf(port)) !== 0, 60_000, b.out);
    // More than V8's sizing window, each on a connection of its own (statusOf: no keep-alive),
    // each followed by a full GC in the broker.
    for (let i = 0; i < 12; i++) {
      assert.notEqual(await statusOf(port), 0);
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.equal(await statusOf(port, '/codex-auth'), 401);
    const seen = await stopAndRead<Array<{ req: boolean; res: boolean; socket: boolean }>>(b, 'SHAPES');
    assert.ok(seen.length >= 13, `only ${seen.length} requests seen`);
    assert.deepEqual(
      seen.filter((s) => !(s.req && s.res && s.socket)),
      [],
      'requests whose objects V8 turned into dictionaries',
    );
    const states = tickLiteralStates(b.out());
    assert.deepEqual(
      states.filter((s) => s === 'MEGAMORPHIC'),
      [],
      `the caches that build tick objects: ${states.join(' ')}`,
    );
  });
});
