import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as path from 'node:path';
import { describe, test } from 'node:test';
import Fastify from 'fastify';
import { loadConfig } from '../src/config.js';
import { ConfigError } from '../src/errors.js';
import { guardConnections, serverTimeouts, type HttpLimitsConfig } from '../src/http/connection-limits.js';
import { FastLane } from '../src/http/lane.js';
import { connectionCap, FD_RESERVE, guardMemoryUsage, openFileLimit } from '../src/lib/fd-limit.js';
import { LogCapture } from './helpers/logs.js';
import { freePort } from './helpers/pg.js';
import { logEvents, openFds, spawnServe, statusOf, type Serve } from './helpers/serve.js';
import { useSuite } from './helpers/suite.js';
import { tempDirs } from './helpers/tmp.js';
import { waitFor } from './helpers/wait.js';

const suite = useSuite();
const tmp = tempDirs('cab-conn-');

/** Idle TCP connections that send nothing: how many the server has closed, and a way to close the rest. */
async function idleSockets(port: number, n: number) {
  const sockets: net.Socket[] = [];
  let closedByServer = 0;
  await Promise.all(
    Array.from({ length: n }, () => {
      const s = net.connect(port, '127.0.0.1');
      sockets.push(s);
      let counted = false;
      // An end (FIN) or a reset (a refusal, libuv's EMFILE trick): closed by the server either way.
      const byServer = () => {
        if (!counted) closedByServer++;
        counted = true;
      };
      s.on('error', byServer);
      s.on('end', byServer);
      return new Promise<void>((resolve) => {
        s.once('connect', () => resolve());
        s.once('close', () => resolve());
      });
    }),
  );
  return {
    closed: () => closedByServer,
    open: () => sockets.filter((s) => !s.destroyed && s.readyState === 'open').length,
    destroy: () => sockets.forEach((s) => s.destroy()),
  };
}

async function brokerEnv(extra: Record<string, string>): Promise<Record<string, string>> {
  const upstream = await suite.upstream();
  return { DATABASE_URL: await suite.pg.newDatabase(), DATA_DIR: tmp(), OAUTH_TOKEN_URL: upstream.url, PORT: String(await freePort()), MAX_EVENT_LOOP_DELAY_MS: '0', ...extra };
}

async function healthy(b: Serve): Promise<void> {
  await waitFor('the broker answering /healthz', async () => (await statusOf(b.port)) === 200, 60_000, b.out);
}

function assertNoFatal(b: Serve): void {
  assert.ok(b.alive(), `the broker is still running: ${b.out().slice(-2000)}`);
  assert.deepEqual(logEvents(b.out(), 'fatal'), [], 'nothing reached the fatal path');
  assert.deepEqual(logEvents(b.out(), 'shutdown'), [], 'no shutdown began');
}

describe('connection configuration', () => {
  for (const [name, value] of [
    ['HTTP_CONNECTION_TIMEOUT_SECONDS', '0'],
    ['HTTP_HEADERS_TIMEOUT_SECONDS', 'ten'],
    ['HTTP_REQUEST_TIMEOUT_SECONDS', '4000'],
    ['HTTP_KEEP_ALIVE_TIMEOUT_SECONDS', '-1'],
  ] as const) {
    test(`a bad ${name} is rejected, naming the variable`, () => {
      assert.throws(() => loadConfig({ [name]: value }), (err) => err instanceof ConfigError && err.variable === name && err.message.includes(name));
    });
  }

  test('a headers deadline past the request deadline is rejected, naming HTTP_HEADERS_TIMEOUT_SECONDS', () => {
    assert.throws(
      () => loadConfig({ HTTP_HEADERS_TIMEOUT_SECONDS: '40', HTTP_REQUEST_TIMEOUT_SECONDS: '30' }),
      (err) => err instanceof ConfigError && err.variable === 'HTTP_HEADERS_TIMEOUT_SECONDS',
    );
  });

  test('the defaults: 512 connections, nothing-sent and headers 10 s, request 30 s, keep-alive 5 s, deadlines swept every second', () => {
    const c = loadConfig({});
    assert.equal(c.MAX_CONNECTIONS, 512);
    assert.deepEqual(serverTimeouts(c), {
      connectionTimeout: 10_000,
      keepAliveTimeout: 5_000,
      requestTimeout: 30_000,
      http: { headersTimeout: 10_000, requestTimeout: 30_000, connectionsCheckingInterval: 1_000 },
    });
  });

  test('MAX_CONNECTIONS is lowered to leave a reserve of file descriptors under the open-file limit', () => {
    assert.equal(connectionCap(512, 1024), 512);
    assert.equal(connectionCap(512, 256), 256 - FD_RESERVE);
    assert.equal(connectionCap(512, undefined), 512);
    assert.equal(connectionCap(512, 10), 1);
    const limits = path.join(tmp(), 'limits');
    fs.writeFileSync(limits, 'Limit                     Soft Limit           Hard Limit           Units\nMax open files            256                  4096                 files\n');
    assert.equal(openFileLimit(limits), 256);
    assert.equal(openFileLimit(path.join(tmp(), 'absent')), undefined);
  });
});

describe('out of file descriptors', () => {
  test('memory sampling out of descriptors answers the last sample and reports it, instead of throwing', () => {
    const emfile = Object.assign(new Error('EMFILE: too many open files, uv_resident_set_memory'), { code: 'EMFILE' });
    let fail: Error | undefined;
    const sample = { rss: 123, heapTotal: 2, heapUsed: 1, external: 4, arrayBuffers: 5 };
    const fake = {
      memoryUsage: Object.assign(
        () => {
          if (fail) throw fail;
          return sample;
        },
        {
          rss: () => {
            if (fail) throw fail;
            return sample.rss;
          },
        },
      ),
    };
    const reported: Error[] = [];
    const restore = guardMemoryUsage(fake, (err) => reported.push(err));
    assert.equal(fake.memoryUsage().rss, 123);
    fail = emfile;
    const during = fake.memoryUsage();
    assert.equal(during.rss, 123, 'the last good resident size');
    assert.ok(during.heapUsed > 0, 'the heap is read without a file');
    assert.equal(fake.memoryUsage.rss(), 123);
    assert.equal(reported.length, 2);
    fail = new Error('something else');
    assert.throws(() => fake.memoryUsage(), /something else/, 'other errors are not swallowed');
    restore();
    fail = emfile;
    assert.throws(() => fake.memoryUsage(), /EMFILE/);
  });

  test('an accept failing for want of a descriptor is logged, not thrown', async () => {
    const logs = new LogCapture();
    const app = Fastify();
    guardConnections(app.server, {}, logs.logger);
    await app.listen({ port: 0, host: '127.0.0.1' });
    try {
      app.server.emit('error', Object.assign(new Error('accept EMFILE'), { code: 'EMFILE', syscall: 'accept' }));
      app.server.emit('error', Object.assign(new Error('accept EMFILE'), { code: 'EMFILE', syscall: 'accept' }));
      assert.equal(logs.withEvent('fd_exhausted').length, 1, 'one line, the repeat throttled');
      assert.match(String(logs.withEvent('fd_exhausted')[0]?.['msg']), /ulimit -n/);
    } finally {
      await app.close();
    }
  });
});

/** A Fastify app on the broker's server (the lane's factory, no lane route) with its connection guards. */
function guardedApp(limits: Partial<HttpLimitsConfig>) {
  const app = Fastify({ serverFactory: new FastLane().serverFactory, ...serverTimeouts(limits) });
  guardConnections(app.server, limits, new LogCapture().logger);
  return app;
}

/** GET path n times, one after another, on one kept-alive connection; the statuses. */
async function keptAlive(port: number, path: string, n: number): Promise<number[]> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const sockets = new Set<net.Socket>();
  const statuses: number[] = [];
  try {
    for (let i = 0; i < n; i++) {
      statuses.push(
        await new Promise<number>((resolve, reject) => {
          const req = http.get({ host: '127.0.0.1', port, path, agent }, (res) => {
            res.resume();
            res.on('end', () => resolve(res.statusCode ?? 0));
          });
          req.on('socket', (s) => sockets.add(s));
          req.on('error', reject);
        }),
      );
    }
  } finally {
    agent.destroy();
  }
  assert.equal(sockets.size, 1, 'every request went over the same connection');
  return statuses;
}

test('a connection that sends nothing is closed after HTTP_CONNECTION_TIMEOUT_SECONDS, while a request slower than that is still answered', async () => {
  const app = guardedApp({ HTTP_CONNECTION_TIMEOUT_SECONDS: 0.3 });
  let release: () => void = () => undefined;
  const gate = new Promise<void>((r) => (release = r));
  app.get('/slow', async () => {
    await gate;
    return { ok: true };
  });
  const address = await app.listen({ port: 0, host: '127.0.0.1' });
  try {
    const slow = fetch(`${address}/slow`);
    const idle = await idleSockets(Number(new URL(address).port), 1);
    // The slow request began before the idle connection opened: once the idle one is
    // closed for inactivity, the slow one has been silent longer than the deadline too.
    await waitFor('the idle connection closed by the server', () => idle.closed() === 1, 10_000);
    release();
    const r = await slow;
    assert.equal(r.status, 200);
    assert.deepEqual(await r.json(), { ok: true });
  } finally {
    await app.close();
  }
});

test('the nothing-sent deadline is armed once per connection, not again at every kept-alive request, and a slow request after the first is still answered', async () => {
  // A deadline no other timer here has, to tell its arming apart from the keep-alive one's;
  // long enough that a loaded machine still sends each connection's first request within it.
  const app = guardedApp({ HTTP_CONNECTION_TIMEOUT_SECONDS: 1.5 });
  const armed: number[] = [];
  app.server.prependListener('connection', (socket: net.Socket) => {
    const arm = socket.setTimeout.bind(socket);
    socket.setTimeout = (ms: number, cb?: () => void) => {
      if (ms > 0) armed.push(ms);
      return arm(ms, cb);
    };
  });
  let calls = 0;
  let slowSecond = false;
  app.get('/maybe-slow', async () => {
    calls++;
    // Past the nothing-sent deadline: were it armed during the request, it would cut it.
    if (slowSecond && calls === 2) await new Promise((r) => setTimeout(r, 2_000));
    return { ok: true };
  });
  const address = await app.listen({ port: 0, host: '127.0.0.1' });
  const port = Number(new URL(address).port);
  try {
    assert.deepEqual(await keptAlive(port, '/maybe-slow', 20), Array(20).fill(200));
    assert.equal(armed.filter((ms) => ms === 1_500).length, 1, `the nothing-sent deadline armed once for 20 requests (armed: ${armed.join(', ')})`);
    assert.equal(armed.filter((ms) => ms !== 1_500).length, 20, 'the keep-alive deadline after each answer');
    assert.equal(app.server.listeners('request').length, 1, 'one request listener: no second one to run per request');
    armed.length = 0;
    calls = 0;
    slowSecond = true;
    assert.deepEqual(await keptAlive(port, '/maybe-slow', 2), [200, 200]);
    assert.equal(armed.filter((ms) => ms === 1_500).length, 1);
  } finally {
    await app.close();
  }
});

test('guardConnections refuses a server that Node re-arms the inactivity deadline on at every kept-alive request (Fastify\'s own server, given connectionTimeout)', () => {
  const app = Fastify(serverTimeouts({ HTTP_CONNECTION_TIMEOUT_SECONDS: 10 }));
  assert.throws(() => guardConnections(app.server, {}, new LogCapture().logger), /FastLane\.serverFactory/);
  // The lane's server, given the same deadline, is accepted (guardedApp).
  assert.equal(guardedApp({ HTTP_CONNECTION_TIMEOUT_SECONDS: 10 }).server.timeout, 0);
});

test('60 idle connections against MAX_CONNECTIONS=20: 20 are held, 40 refused at once, /healthz answers again once they go, and the broker never exits', async () => {
  const b = spawnServe(await brokerEnv({ MAX_CONNECTIONS: '20', HTTP_CONNECTION_TIMEOUT_SECONDS: '600' }));
  await healthy(b);
  const fdsBefore = openFds(b.pid);
  const idle = await idleSockets(b.port, 60);
  await waitFor('40 connections refused', () => idle.closed() >= 40, 20_000, b.out);
  assert.equal(idle.closed(), 40, 'exactly the connections over the cap were refused');
  assert.equal(idle.open(), 20);
  assert.equal(await statusOf(b.port), 0, 'a fresh connection is refused while the cap is taken');
  const fdsFull = openFds(b.pid);
  await waitFor('the refusals logged', () => logEvents(b.out(), 'connections_refused').length > 0, 10_000, b.out);
  idle.destroy();
  await healthy(b);
  console.log(`# cap 20, 60 idle sockets: broker fds ${fdsBefore} before, ${fdsFull} while full (20 held, 40 refused)`);
  assertNoFatal(b);
  process.kill(b.pid, 'SIGTERM');
  assert.equal((await b.exited).code, 0);
});

test('idle connections that never send a byte are closed by the broker, and /healthz answers on a fresh connection afterwards', async () => {
  const b = spawnServe(await brokerEnv({ MAX_CONNECTIONS: '20', HTTP_CONNECTION_TIMEOUT_SECONDS: '1' }));
  await healthy(b);
  const started = Date.now();
  const idle = await idleSockets(b.port, 60);
  const ms = await waitFor('every idle connection closed by the broker', () => idle.closed() === 60, 30_000, b.out);
  assert.equal(idle.open(), 0);
  assert.equal(await statusOf(b.port), 200);
  console.log(`# HTTP_CONNECTION_TIMEOUT_SECONDS=1: 60 idle sockets (cap 20) all closed by the broker ${Date.now() - started} ms after opening (waited ${ms} ms)`);
  assertNoFatal(b);
  process.kill(b.pid, 'SIGTERM');
  assert.equal((await b.exited).code, 0);
});

test('under a low open-file limit, MAX_CONNECTIONS is lowered so that a flood of idle connections cannot exhaust descriptors', async () => {
  const OPEN_FILES = 160;
  const b = spawnServe(await brokerEnv({ HTTP_CONNECTION_TIMEOUT_SECONDS: '600' }), { openFiles: OPEN_FILES });
  await healthy(b);
  const capped = logEvents(b.out(), 'max_connections_capped');
  assert.equal(capped.length, 1, b.out());
  assert.equal(capped[0]?.['cap'], OPEN_FILES - FD_RESERVE);
  const idle = await idleSockets(b.port, 200);
  await waitFor('the connections over the cap refused', () => idle.closed() >= 200 - (OPEN_FILES - FD_RESERVE), 20_000, b.out);
  const fds = openFds(b.pid);
  assert.ok(fds < OPEN_FILES, `the broker holds ${fds} descriptors, under the limit of ${OPEN_FILES}`);
  assert.deepEqual(logEvents(b.out(), 'fd_exhausted'), [], 'never out of descriptors');
  idle.destroy();
  await healthy(b);
  console.log(`# ulimit -n ${OPEN_FILES}, 200 idle sockets: cap ${OPEN_FILES - FD_RESERVE}, ${idle.closed()} refused, broker at ${fds} fds`);
  assertNoFatal(b);
  process.kill(b.pid, 'SIGTERM');
  assert.equal((await b.exited).code, 0);
});

test('with every file descriptor taken, the broker logs it, keeps running, and answers /healthz once connections close', async () => {
  const b = spawnServe(await brokerEnv({ MAX_CONNECTIONS: '1000', HTTP_CONNECTION_TIMEOUT_SECONDS: '600' }));
  await healthy(b);
  // Lower the running broker's limit to just above what it holds: the flood then takes the
  // rest, as when something besides client sockets has eaten the reserve.
  const before = openFds(b.pid);
  const limit = before + 8;
  const original = execFileSync('prlimit', ['--pid', String(b.pid), '--nofile', '--output=SOFT', '--noheadings'], { encoding: 'utf8' }).trim();
  execFileSync('prlimit', ['--pid', String(b.pid), `--nofile=${limit}:`]);
  const idle = await idleSockets(b.port, 60);
  try {
    // The load-shedding sampler reads /proc once a second: it meets the exhaustion.
    await waitFor('the exhaustion logged', () => logEvents(b.out(), 'fd_exhausted').length > 0, 20_000, b.out);
    assert.ok(b.alive(), b.out().slice(-2000));
  } finally {
    execFileSync('prlimit', ['--pid', String(b.pid), `--nofile=${original}:`]);
    idle.destroy();
  }
  await healthy(b);
  const where = logEvents(b.out(), 'fd_exhausted').map((e) => e['where']);
  console.log(`# fds exhausted (limit ${limit}, ${before} held before the flood): reported in ${[...new Set(where)].join(', ')}; recovered`);
  assertNoFatal(b);
  process.kill(b.pid, 'SIGTERM');
  assert.equal((await b.exited).code, 0);
});
