import { strict as assert } from 'node:assert';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { connect, type AddressInfo, type Socket } from 'node:net';
import { describe, test } from 'node:test';
import inject, { type InjectOptions, type Response } from 'light-my-request';
import { digits, FastLane, LANE_BODY_LIMIT } from '../src/http/lane.js';
import { WALL_CLOCK_WINDOW_MS } from '../src/lib/time.js';
import { ShimTokens } from '../src/serving.js';
import { ADMIN_TOKEN, injectUnshed, type TestApp } from './helpers/app.js';
import { findLeaks } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';
import { blockEventLoop, waitFor } from './helpers/wait.js';

const suite = useSuite();
const NODE_MAJOR = Number(process.versions.node.split('.')[0]);
const secrets: string[] = [];
const answers: string[] = [];

interface Setup extends TestApp {
  lane: FastLane;
  token: string;
  workspaceId: string;
  /** A client of another pool, which holds no credential. */
  orphanToken: string;
  /** The broker's clock, held still across the two answers of a comparison. */
  clock: ReturnType<typeof heldClock>;
  /** The refresh credentials the shim knows the two clients by. */
  refreshCredential: string;
  orphanRefresh: string;
}

async function setup(
  o: { platformTokens?: boolean; maxEventLoopDelayMs?: number; pressureSampleIntervalMs?: number; exposure?: 'proxy' | 'omit' | 'raw'; extra?: Record<string, unknown>; realClock?: boolean } = {},
): Promise<Setup> {
  const upstream = await suite.upstream();
  const lane = new FastLane();
  const clock = heldClock();
  const { extra, realClock, ...options } = o;
  // realClock: the app's own clock, as in production (no clock injected).
  const t = await suite.app({ databaseUrl: await suite.pg.newDatabase(), upstreamUrl: upstream.url, lane, clientReloadMs: 200, ...(realClock ? {} : { now: clock.now }), ...options });
  const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
  // One test sets a 100 ms event-loop-delay limit: its set-up is sent again if shed.
  const seeded = await injectUnshed(t.app, { method: 'PUT', url: '/admin/credential', headers: admin, payload: upstream.seed(extra ? { extra } : {}) });
  assert.equal(seeded.statusCode, 200, seeded.body);
  const workspaceId = randomUUID();
  const made = await injectUnshed(t.app, { method: 'POST', url: '/admin/clients', headers: admin, payload: { name: 'ws-1', workspaceId } });
  assert.equal(made.statusCode, 201, made.body);
  const orphan = await injectUnshed(t.app, { method: 'POST', url: '/admin/clients', headers: admin, payload: { name: 'ws-2', pool: 'empty' } });
  assert.equal(orphan.statusCode, 201, orphan.body);
  const token = made.json<{ token: string }>().token;
  const orphanToken = orphan.json<{ token: string }>().token;
  const refreshCredential = made.json<{ refreshCredential: string }>().refreshCredential;
  const orphanRefresh = orphan.json<{ refreshCredential: string }>().refreshCredential;
  secrets.push(token, orphanToken, refreshCredential, orphanRefresh);
  return { ...t, lane, clock, token, workspaceId, orphanToken, refreshCredential, orphanRefresh };
}

/**
 * The broker's clock: the real time, except while a comparison holds it. The shim's answer
 * carries expires_in, counted from now, so the two answers of one comparison must be made
 * at the same instant (a second boundary between them would change it).
 */
function heldClock() {
  let held: number | undefined;
  const clock = {
    /** How many times the broker has read this clock. */
    reads: 0,
    now: () => {
      clock.reads++;
      return held ?? Date.now();
    },
    hold: () => void (held = Date.now()),
    release: () => void (held = undefined),
  };
  return clock;
}

/** Through Fastify alone: its own request handler, as if the lane did not exist. */
const viaFastify = (t: TestApp, o: InjectOptions) => inject(t.app.routing, o);
/** Through the server's request listener: the lane first (test/helpers/app.ts routes inject there). */
const viaServer = (t: TestApp, o: InjectOptions) => t.app.inject(o as never) as unknown as Promise<Response>;

/**
 * What serving a request moves (tokens served, request durations: counts, not sums or
 * buckets, since durations differ) as name{labels} → value. The broker's timers (the
 * last-seen flush, refresh checks) move other metrics at any moment: leaving them out
 * keeps the comparison about the request.
 */
async function counts(t: TestApp): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for (const m of await t.metrics.registry.getMetricsAsJSON()) {
    if (!/token_served|http_request_duration/.test(m.name)) continue;
    for (const v of m.values as Array<{ value: number; labels: Record<string, unknown>; metricName?: string }>) {
      const name = v.metricName ?? m.name;
      if (m.type === ('histogram' as never) && !name.endsWith('_count')) continue;
      out.set(`${name}${JSON.stringify(v.labels)}`, v.value);
    }
  }
  return out;
}

function delta(before: Map<string, number>, after: Map<string, number>): Record<string, number> {
  const d: Record<string, number> = {};
  for (const [k, v] of after) if (v !== (before.get(k) ?? 0)) d[k] = v - (before.get(k) ?? 0);
  return d;
}

/** What a client can observe of an answer, less the Date header (and the uptime in /healthz, which may tick). */
function observable(res: Response) {
  answers.push(res.body, ...Object.values(res.headers).map(String));
  const headers = { ...res.headers };
  delete headers['date'];
  return { status: res.statusCode, headers, body: res.body.replace(/"uptimeSeconds":\d+/, '"uptimeSeconds":N') };
}

/** The same request through the lane and through Fastify alone: the same answer and the same metrics. */
async function sameAnswer(t: Setup, o: InjectOptions, lane: 'answers' | 'declines'): Promise<Response> {
  // The same id both ways (each path draws its own from the generator otherwise).
  o = { ...o, headers: { 'x-request-id': 'same-id', ...(o.headers as Record<string, string> | undefined) } };
  const before = t.lane.answered;
  const m0 = await counts(t);
  t.clock.hold();
  let a: Response, b: Response, m1: Map<string, number>;
  try {
    a = await viaServer(t, o);
    assert.equal(t.lane.answered - before, lane === 'answers' ? 1 : 0, `the lane ${lane} ${o.method ?? 'GET'} ${String(o.url)}`);
    m1 = await counts(t);
    b = await viaFastify(t, o);
  } finally {
    t.clock.release();
  }
  assert.equal(t.lane.answered - before, lane === 'answers' ? 1 : 0, 'Fastify alone never reaches the lane');
  const m2 = await counts(t);
  assert.deepEqual(observable(a), observable(b), `${o.method ?? 'GET'} ${String(o.url)}`);
  const moved = delta(m0, m1);
  assert.ok(Object.keys(moved).length > 0, 'a request moves the serving metrics');
  assert.deepEqual(moved, delta(m1, m2), `the same metrics move: ${o.method ?? 'GET'} ${String(o.url)}`);
  return a;
}

describe('fast lane', () => {
  test('the fast lane answers a plain GET /codex-auth, drop-in or /healthz exactly as Fastify would: status, headers, body, request id and metrics', async () => {
    const t = await setup();
    const auth = { authorization: `Bearer ${t.token}`, 'x-request-id': 'proxy-id-1' };
    const ok = await sameAnswer(t, { method: 'GET', url: '/codex-auth', headers: auth }, 'answers');
    assert.equal(ok.statusCode, 200);
    assert.equal(ok.headers['x-request-id'], 'proxy-id-1');
    assert.equal(ok.headers['content-length'], String(Buffer.byteLength(ok.body)));
    const etag = String(ok.headers['etag']);
    for (const inm of [etag, `W/${etag}`, `"other", ${etag}`, '*']) {
      const res = await sameAnswer(t, { method: 'GET', url: '/codex-auth', headers: { ...auth, 'if-none-match': inm } }, 'answers');
      assert.equal(res.statusCode, 304, inm);
      assert.equal(res.body, '');
    }
    assert.equal((await sameAnswer(t, { method: 'GET', url: '/codex-auth', headers: { ...auth, 'if-none-match': '"stale"' } }, 'answers')).statusCode, 200);

    const dropIn = `/workspaces/${t.workspaceId}/secrets/values`;
    const platform = await sameAnswer(t, { method: 'GET', url: dropIn, headers: auth }, 'answers');
    assert.equal(platform.statusCode, 200);
    assert.deepEqual(Object.keys(platform.json()), ['CODEX_AUTH_JSON']);
    await sameAnswer(t, { method: 'GET', url: dropIn.toUpperCase().replace('/WORKSPACES/', '/workspaces/').replace('/SECRETS/VALUES', '/secrets/values'), headers: auth }, 'answers');
    const p304 = await sameAnswer(t, { method: 'GET', url: dropIn, headers: { ...auth, 'if-none-match': String(platform.headers['etag']) } }, 'answers');
    assert.equal(p304.statusCode, 304);

    const health = await sameAnswer(t, { method: 'GET', url: '/healthz', headers: { 'x-request-id': 'probe-7' } }, 'answers');
    assert.equal(health.statusCode, 200);
    assert.equal(health.json<{ status: string }>().status, 'ok');

    // Without a caller's id, the lane draws from the same generator as Fastify: ids stay distinct.
    const ids = new Set<string>();
    for (let i = 0; i < 20; i++) {
      ids.add(String((await viaServer(t, { method: 'GET', url: '/healthz' })).headers['x-request-id']));
      ids.add(String((await viaFastify(t, { method: 'GET', url: '/healthz' })).headers['x-request-id']));
    }
    assert.equal(ids.size, 40);
  });

  test('the fast lane\'s content-length is the body\'s UTF-8 length, counted without measuring the body, for documents with multi-byte characters and escapes under every exposure', async () => {
    const awkward = 'quote " backslash \\ newline \n nul \u0000 ls \u2028 é ü 🔑 </script>';
    for (const exposure of ['proxy', 'omit', 'raw'] as const) {
      const t = await setup({ exposure, extra: { auth_mode: 'chatgpt', note: awkward, nested: { list: [awkward, 'ß'] } } });
      const auth = { authorization: `Bearer ${t.token}` };
      for (const url of ['/codex-auth', `/workspaces/${t.workspaceId}/secrets/values`]) {
        // Twice: the second answer reads what the first one built (a shared document's lengths are kept).
        for (let i = 0; i < 2; i++) {
          const res = await sameAnswer(t, { method: 'GET', url, headers: auth }, 'answers');
          assert.equal(res.statusCode, 200);
          assert.equal(res.headers['content-length'], String(Buffer.byteLength(res.body)), `${exposure} ${url}`);
          assert.ok(Buffer.byteLength(res.body) > res.body.length, 'the body has multi-byte characters');
        }
      }
      // Over a real socket, where a wrong content-length would cut the body or hang the connection.
      await t.app.listen({ port: 0, host: '127.0.0.1' });
      const port = (t.app.server.address() as AddressInfo).port;
      const res = await fetch(`http://127.0.0.1:${port}/codex-auth`, { headers: auth });
      const bytes = Buffer.from(await res.arrayBuffer());
      assert.equal(res.status, 200);
      assert.equal(res.headers.get('content-length'), String(bytes.length));
      assert.equal(JSON.parse(bytes.toString('utf8')).note, awkward);
    }
  });

  test('the fast lane writes an ASCII body as Latin-1 and any other as UTF-8: over a real socket the bytes are the body\'s UTF-8 bytes either way (documents, drop-in, shim answers)', async () => {
    assert.equal(new ShimTokens('a.b.c', 'd.e.f', 1, 'gen').ascii, true);
    assert.equal(new ShimTokens('a.b.c', 'd.é.f', 1, 'gen').ascii, false);
    for (const note of ['plain ascii', 'é ü 🔑 \u2028']) {
      const t = await setup({ extra: { note } });
      await t.app.listen({ port: 0, host: '127.0.0.1' });
      const base = `http://127.0.0.1:${(t.app.server.address() as AddressInfo).port}`;
      const auth = { authorization: `Bearer ${t.token}` };
      for (const url of ['/codex-auth', `/workspaces/${t.workspaceId}/secrets/values`]) {
        const before = t.lane.answered;
        const res = await fetch(`${base}${url}`, { headers: auth });
        const bytes = Buffer.from(await res.arrayBuffer());
        assert.equal(t.lane.answered, before + 1, 'the lane answered');
        const expected = await viaFastify(t, { method: 'GET', url, headers: auth });
        assert.deepEqual(bytes, Buffer.from(expected.body, 'utf8'), `${note}: ${url}`);
        assert.equal(res.headers.get('content-length'), String(bytes.length));
        answers.push(expected.body);
      }
      const shim = { grant_type: 'refresh_token', refresh_token: `${t.refreshCredential}.AAAAAAAAAAAA` };
      t.clock.hold();
      try {
        const before = t.lane.answered;
        const res = await fetch(`${base}/oauth/token`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(shim) });
        const bytes = Buffer.from(await res.arrayBuffer());
        assert.equal(t.lane.answered, before + 1, 'the lane answered the shim');
        const expected = await viaFastify(t, { method: 'POST', url: '/oauth/token', headers: { 'content-type': 'application/json' }, payload: JSON.stringify(shim) });
        assert.deepEqual(bytes, Buffer.from(expected.body, 'utf8'));
        answers.push(expected.body);
      } finally {
        t.clock.release();
      }
    }
  });

  test('the fast lane sends an ASCII answer in one write of one string (header lines and body), and any other with Node\'s end(body) as before: the same bytes either way', async () => {
    for (const note of ['plain ascii', 'é ü 🔑 \u2028']) {
      const t = await setup({ extra: { note } });
      // What each answer's socket was asked to write: a plain write (one chunk) or a writev (several).
      const writes: string[] = [];
      t.app.server.on('connection', (socket: Socket) => {
        const s = socket as Socket & { _write: (...a: unknown[]) => unknown; _writev: (...a: unknown[]) => unknown };
        const write = s._write.bind(s);
        const writev = s._writev.bind(s);
        s._write = (...a: unknown[]) => (writes.push('write'), write(...a));
        s._writev = (...a: unknown[]) => (writes.push(`writev of ${(a[0] as unknown[]).length}`), writev(...a));
      });
      await t.app.listen({ port: 0, host: '127.0.0.1' });
      const base = `http://127.0.0.1:${(t.app.server.address() as AddressInfo).port}`;
      const auth = { authorization: `Bearer ${t.token}` };
      const shim = JSON.stringify({ grant_type: 'refresh_token', refresh_token: `${t.refreshCredential}.AAAAAAAAAAAA` });
      const asks: Array<[string, RequestInit, InjectOptions]> = [
        ['/codex-auth', { headers: auth }, { method: 'GET', url: '/codex-auth', headers: auth }],
        [`/workspaces/${t.workspaceId}/secrets/values`, { headers: auth }, { method: 'GET', url: `/workspaces/${t.workspaceId}/secrets/values`, headers: auth }],
        ['/oauth/token', { method: 'POST', headers: { 'content-type': 'application/json' }, body: shim }, { method: 'POST', url: '/oauth/token', headers: { 'content-type': 'application/json' }, payload: shim }],
        ['/healthz', {}, { method: 'GET', url: '/healthz' }],
      ];
      // Each app closed before the next opens: the file's apps share one Postgres.
      try {
        for (const [url, init, same] of asks) {
          writes.length = 0;
          const before = t.lane.answered;
          let ascii = true;
          t.clock.hold();
          try {
            const res = await fetch(`${base}${url}`, init);
            const bytes = Buffer.from(await res.arrayBuffer());
            assert.equal(t.lane.answered, before + 1, `the lane answered ${url}`);
            const expected = await viaFastify(t, same);
            answers.push(expected.body);
            const text = (b: string) => b.replace(/"uptimeSeconds":\d+/, '');
            assert.equal(text(bytes.toString('utf8')), text(expected.body), `${note}: ${url}`);
            assert.equal(res.headers.get('content-length'), String(bytes.length));
            ascii = bytes.every((b) => b < 0x80);
          } finally {
            t.clock.release();
          }
          // The note is in the documents only (/healthz and the shim's answer never carry it).
          if (note !== 'plain ascii' && !['/healthz', '/oauth/token'].includes(url)) assert.equal(ascii, false, `${url} carries the note`);
          // Any other body is Node's end(body) as before: on Node 20 and 22 a writev of the two
          // (Node 24 and later send end(body) as one write themselves).
          if (ascii) assert.deepEqual(writes, ['write'], `${note}: ${url}`);
          else if (NODE_MAJOR < 24) assert.deepEqual(writes, ['writev of 2'], `${note}: ${url}`);
        }
      } finally {
        await t.close();
      }
    }
  });

  test('pipelined requests on one connection get whole answers, in order: an answer in one write waits behind the one before it', async () => {
    const t = await setup();
    try {
      await t.app.listen({ port: 0, host: '127.0.0.1' });
      const port = (t.app.server.address() as AddressInfo).port;
      const auth = `authorization: Bearer ${t.token}\r\n`;
      // The first goes to Fastify (an unknown token): the lane's answers queue behind it too.
      const asks = [
        { path: '/codex-auth', head: 'authorization: Bearer cab_unknown\r\n' },
        { path: '/codex-auth', head: auth },
        { path: '/healthz', head: '' },
        { path: `/workspaces/${t.workspaceId}/secrets/values`, head: auth },
        { path: '/codex-auth', head: `${auth}x-request-id: fifth\r\n` },
      ];
      const before = t.lane.answered;
      const raw = await new Promise<Buffer>((resolve, reject) => {
        const chunks: Buffer[] = [];
        const s = connect(port, '127.0.0.1', () => {
          // Every request in one packet; the last asks the server to close, which ends the read.
          s.write(asks.map((a, i) => `GET ${a.path} HTTP/1.1\r\nhost: x\r\n${a.head}${i === asks.length - 1 ? 'connection: close\r\n' : ''}\r\n`).join(''));
        });
        s.on('data', (d: Buffer) => chunks.push(d));
        s.on('end', () => resolve(Buffer.concat(chunks)));
        s.on('error', reject);
      });
      assert.equal(t.lane.answered - before, 4, 'the lane answered the four it serves; Fastify the unknown token');
      const answersRead: Array<{ status: number; headers: Record<string, string>; body: string }> = [];
      let at = 0;
      while (at < raw.length) {
        const end = raw.indexOf('\r\n\r\n', at);
        assert.ok(end > at, 'a whole header block');
        const [statusLine = '', ...lines] = raw.subarray(at, end).toString('latin1').split('\r\n');
        const headers = Object.fromEntries(lines.map((l) => [l.slice(0, l.indexOf(':')).toLowerCase(), l.slice(l.indexOf(':') + 1).trim()]));
        const length = Number(headers['content-length']);
        const body = raw.subarray(end + 4, end + 4 + length).toString('utf8');
        answersRead.push({ status: Number(statusLine.split(' ')[1]), headers, body });
        answers.push(body);
        at = end + 4 + length;
      }
      assert.deepEqual(
        answersRead.map((a) => a.status),
        [401, 200, 200, 200, 200],
      );
      for (const [i, a] of asks.entries()) {
        if (i === 0) continue;
        const expected = await viaFastify(t, { method: 'GET', url: a.path, headers: a.path === '/healthz' ? {} : { authorization: `Bearer ${t.token}` } });
        const text = (b: string) => b.replace(/"uptimeSeconds":\d+/, '');
        assert.equal(text(answersRead[i]?.body ?? ''), text(expected.body), a.path);
      }
      assert.equal(answersRead[4]?.headers['x-request-id'], 'fifth');
    } finally {
      await t.close();
    }
  });

  test('the fast lane declines everything but the plain success, and Fastify answers it as before', async () => {
    const t = await setup();
    const auth = { authorization: `Bearer ${t.token}` };
    const dropIn = `/workspaces/${t.workspaceId}/secrets/values`;
    const declined: Array<[InjectOptions, number]> = [
      [{ method: 'GET', url: '/codex-auth' }, 401],
      [{ method: 'GET', url: '/codex-auth', headers: { authorization: `Bearer ${randomBytes(32).toString('base64url')}` } }, 401],
      [{ method: 'GET', url: '/codex-auth', headers: { authorization: `Basic ${t.token}` } }, 401],
      [{ method: 'GET', url: '/codex-auth', headers: { authorization: `Bearer ${t.orphanToken}` } }, 503],
      [{ method: 'GET', url: '/codex-auth?x=1', headers: auth }, 200],
      [{ method: 'HEAD', url: '/codex-auth', headers: auth }, 200],
      [{ method: 'POST', url: '/codex-auth', headers: auth }, 404],
      [{ method: 'GET', url: '/codex-auth/', headers: auth }, 404],
      [{ method: 'GET', url: '/Codex-Auth', headers: auth }, 404],
      [{ method: 'GET', url: '/healthz?verbose', headers: {} }, 200],
      [{ method: 'GET', url: '/workspaces/not-a-uuid/secrets/values', headers: auth }, 400],
      [{ method: 'GET', url: `/workspaces/${randomUUID()}/secrets/values`, headers: auth }, 404],
      [{ method: 'GET', url: `/workspaces/${t.workspaceId}%2F/secrets/values`, headers: auth }, 400],
      [{ method: 'GET', url: `/workspaces/${t.workspaceId}/x/secrets/values`, headers: auth }, 404],
      [{ method: 'GET', url: '/workspaces//secrets/values', headers: auth }, 400],
      [{ method: 'GET', url: `${dropIn}?a=b`, headers: auth }, 200],
      [{ method: 'GET', url: dropIn, headers: { authorization: `Bearer ${t.orphanToken}` } }, 503],
    ];
    for (const [o, status] of declined) {
      const res = await sameAnswer(t, o, 'declines');
      assert.equal(res.statusCode, status, `${o.method} ${String(o.url)}`);
    }
  });

  test('the fast lane answers a stale caller of POST /oauth/token exactly as Fastify would, and declines every other shim request to it with the body it read', async () => {
    const t = await setup();
    const json = { 'content-type': 'application/json' };
    const stale = `${t.refreshCredential}.AAAAAAAAAAAA`;
    const shim = (payload: string | Buffer, headers: Record<string, string> = json, url = '/oauth/token'): InjectOptions => ({ method: 'POST', url, headers, payload });
    const body = (o: Record<string, unknown>) => JSON.stringify({ grant_type: 'refresh_token', refresh_token: stale, client_id: 'app_test', ...o });

    const ok = await sameAnswer(t, shim(body({})), 'answers');
    assert.equal(ok.statusCode, 200);
    assert.equal(ok.headers['x-request-id'], 'same-id');
    assert.equal(ok.headers['cache-control'], 'no-store');
    const answer = ok.json<{ access_token: string; refresh_token: string; token_type: string; expires_in: number }>();
    assert.equal(answer.token_type, 'Bearer');
    assert.ok(answer.refresh_token.startsWith(`${t.refreshCredential}.`) && answer.refresh_token !== stale);
    answers.push(answer.access_token);
    // A stale caller's reason is not a rejection of the current token: the same answer.
    assert.equal((await sameAnswer(t, shim(body({ refresh_reason: 'unauthorized_recovery' })), 'answers')).statusCode, 200);

    const current = answer.refresh_token;
    const declined: Array<[InjectOptions, number]> = [
      // The caller holds the current token (Fastify decides whether to refresh first).
      [shim(body({ refresh_token: current })), 200],
      // Not the one content type the lane reads: Fastify reads the body from the socket.
      [shim(body({}), { 'content-type': 'application/json; charset=utf-8' }), 200],
      [shim(new URLSearchParams({ grant_type: 'refresh_token', refresh_token: stale }).toString(), { 'content-type': 'application/x-www-form-urlencoded' }), 200],
      [shim(body({}), { 'content-type': 'text/plain' }), 400],
      [shim(body({}), json, '/oauth/token?x=1'), 200],
      // Larger than the lane reads.
      [shim(body({ padding: 'p'.repeat(LANE_BODY_LIMIT) })), 200],
      // Read by the lane, declined, parsed by Fastify from the same bytes.
      [shim(body({}).replace('"grant_type"', '"grant\\u005ftype"')), 200],
      [shim(Buffer.concat([Buffer.from(body({}).slice(0, -1)), Buffer.from(',"x":"\xff"}', 'latin1')])), 200],
      [shim('{'), 400],
      [shim(''), 400],
      [shim('[]'), 400],
      [shim('null'), 400],
      [shim(`{"__proto__":{"polluted":true},"grant_type":"refresh_token","refresh_token":"${stale}"}`), 400],
      [shim(`{"constructor":{"prototype":{"polluted":true}},"grant_type":"refresh_token","refresh_token":"${stale}"}`), 400],
      [shim(body({ grant_type: 'authorization_code' })), 400],
      [shim(body({ refresh_token: '' })), 400],
      [shim(body({ refresh_token: 42 })), 400],
      [shim(body({ refresh_token: `cabrt_${randomBytes(24).toString('base64url')}.AAAAAAAAAAAA` })), 401],
      [shim(body({ refresh_token: `${t.orphanRefresh}.AAAAAAAAAAAA` })), 503],
    ];
    for (const [o, status] of declined) {
      const res = await sameAnswer(t, o, 'declines');
      assert.equal(res.statusCode, status, `${String(o.url)} ${String(o.payload).slice(0, 80)}`);
    }
    assert.equal(({} as Record<string, unknown>)['polluted'], undefined);
  });

  test('a POST whose body the fast lane is reading: a client that aborts gets what Fastify gives it, and a close that begins meanwhile still answers the stale caller', async () => {
    const t = await setup();
    await t.app.listen({ port: 0, host: '127.0.0.1' });
    const port = (t.app.server.address() as AddressInfo).port;
    const body = JSON.stringify({ grant_type: 'refresh_token', refresh_token: `${t.refreshCredential}.AAAAAAAAAAAA` });
    const head = (contentType: string) => `POST /oauth/token HTTP/1.1\r\nhost: x\r\ncontent-type: ${contentType}\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n`;
    /** Headers and half the body, then the connection drops. */
    const abort = async (contentType: string) => {
      const sock = connect(port, '127.0.0.1');
      await new Promise((r) => sock.once('connect', r));
      sock.write(head(contentType) + body.slice(0, 20));
      await new Promise((r) => setTimeout(r, 100));
      sock.destroy();
      await new Promise((r) => setTimeout(r, 200));
    };
    const before = t.lane.answered;
    // The lane reads application/json; Fastify alone reads it with a charset.
    const m0 = await counts(t);
    await abort('application/json');
    const m1 = await counts(t);
    await abort('application/json; charset=utf-8');
    const m2 = await counts(t);
    assert.deepEqual(delta(m0, m1), delta(m1, m2), 'the same metrics move either way');
    assert.equal(t.lane.answered, before);

    // Half a body each, then close() begins, then the rest. Fastify, reading a body itself,
    // answers a request that arrived before close began; so does the lane, for what it
    // answers (a stale caller). One it declines after close began meets Fastify's closing
    // 503: Fastify decides that when it gets the request, and it gets it after the body.
    const half = async (contentType: string, payload: string) => {
      const sock = connect(port, '127.0.0.1');
      await new Promise((r) => sock.once('connect', r));
      let reply = '';
      sock.on('data', (d: Buffer) => (reply += d.toString('utf8')));
      const closed = new Promise((r) => sock.once('close', r));
      const head2 = `POST /oauth/token HTTP/1.1\r\nhost: x\r\ncontent-type: ${contentType}\r\ncontent-length: ${Buffer.byteLength(payload)}\r\n\r\n`;
      sock.write(head2 + payload.slice(0, 20));
      return { rest: () => sock.write(payload.slice(20)), closed, reply: () => reply, destroy: () => sock.destroy() };
    };
    // The three must have arrived (their heads parsed) before close() begins: a connection
    // with nothing parsed yet is idle, and close() drops idle connections unanswered.
    let arrived = 0;
    const onRequest = () => void arrived++;
    t.app.server.on('request', onRequest);
    const viaLane = await half('application/json', body);
    const alone = await half('application/json; charset=utf-8', body);
    const declined = await half('application/json', JSON.stringify({ grant_type: 'password', refresh_token: 'x' }));
    await waitFor('the three requests to arrive', () => arrived === 3, 5_000);
    t.app.server.off('request', onRequest);
    const closing = t.app.close();
    await new Promise((r) => setTimeout(r, 100));
    for (const c of [viaLane, alone, declined]) c.rest();
    await Promise.race([
      Promise.all([viaLane.closed, alone.closed, declined.closed]),
      new Promise((_, reject) => setTimeout(() => reject(new Error(`a connection stayed open after close(): ${[viaLane, alone, declined].map((c) => c.reply().split('\r\n')[0]).join(' / ')}`)), 20_000)),
    ]).catch((err: unknown) => {
      // Never leave a socket open: the app's close would wait on it for ever.
      for (const c of [viaLane, alone, declined]) c.destroy();
      throw err;
    });
    await closing;
    const shape = (raw: string) =>
      raw
        .split('\r\n\r\n')[0]
        ?.split('\r\n')
        .filter((l) => !/^(date|x-request-id):/i.test(l))
        .sort();
    assert.match(alone.reply(), /^HTTP\/1\.1 200 /);
    assert.deepEqual(shape(viaLane.reply()), shape(alone.reply()), 'the stale caller whose body was in flight is answered as Fastify alone answers it');
    answers.push(viaLane.reply(), alone.reply());
    assert.equal(t.lane.answered, before + 1, 'the lane answered the stale caller');
    assert.match(declined.reply(), /^HTTP\/1\.1 503 /);
    assert.match(declined.reply(), /\r\nconnection: close\r\n/i);
    // And the served answer before any of this went through the lane over the same kind of socket.
  });

  test('a POST the fast lane declines after its body keeps its arrival: the request id in arrival order, the duration from arrival, and no shedding for pressure that began during the body', async () => {
    const t = await setup({ maxEventLoopDelayMs: 100, pressureSampleIntervalMs: 50 });
    await t.app.listen({ port: 0, host: '127.0.0.1' });
    const port = (t.app.server.address() as AddressInfo).port;
    const payload = JSON.stringify({ grant_type: 'password', refresh_token: 'x' });
    const durations = async () => (await counts(t)).get('codex_broker_http_request_duration_seconds_count{"method":"POST","route":"/oauth/token","status_code":"400"}') ?? 0;
    const sums = async () => {
      for (const m of await t.metrics.registry.getMetricsAsJSON()) {
        if (m.name !== 'codex_broker_http_request_duration_seconds') continue;
        const v = (m.values as Array<{ value: number; labels: Record<string, unknown>; metricName?: string }>).find((x) => x.metricName?.endsWith('_sum') && x.labels['method'] === 'POST' && String(x.labels['status_code']) === '400');
        return v?.value ?? 0;
      }
      return 0;
    };
    for (const contentType of ['application/json', 'application/json; charset=utf-8']) {
      // Wait for a calm loop (start-up work can exceed 100 ms).
      await waitFor('a calm event loop', async () => !(t.app as unknown as { isUnderPressure: () => boolean }).isUnderPressure(), 5_000);
      const sock = connect(port, '127.0.0.1');
      await new Promise((r) => sock.once('connect', r));
      let reply = '';
      sock.on('data', (d: Buffer) => (reply += d.toString('utf8')));
      const n0 = await durations();
      const s0 = await sums();
      sock.write(`POST /oauth/token HTTP/1.1\r\nhost: x\r\ncontent-type: ${contentType}\r\ncontent-length: ${Buffer.byteLength(payload)}\r\n\r\n${payload.slice(0, 5)}`);
      await new Promise((r) => setTimeout(r, 50));
      // A request that arrives later, while the first one's body is still coming.
      const later = await viaServer(t, { method: 'GET', url: '/healthz' });
      // Block the loop past the limit until under-pressure says so (blockEventLoop: a block
      // it always records; up to three in case the machine itself stalls), then finish the body.
      const pressured = () => (t.app as unknown as { isUnderPressure: () => boolean }).isUnderPressure();
      let caught = false;
      for (let attempt = 0; attempt < 3 && !caught; attempt++) {
        await blockEventLoop(1_000);
        caught = await waitFor('pressure', pressured, 500).then(
          () => true,
          () => false,
        );
      }
      if (!caught) sock.destroy();
      assert.ok(caught, 'the blocked loop is under pressure');
      sock.write(payload.slice(5));
      await waitFor('the answer', async () => reply.includes('\r\n\r\n') && reply.endsWith('}'), 5_000).finally(() => sock.destroy());
      answers.push(reply);
      assert.match(reply, /^HTTP\/1\.1 400 /, `${contentType}: checked for pressure when it arrived, as Fastify alone does: ${reply.split('\r\n')[0]}`);
      const postId = /\r\nx-request-id: ([^\r]+)/i.exec(reply)?.[1] ?? '';
      const getId = String(later.headers['x-request-id']);
      const seq = (id: string) => Number(id.slice(id.lastIndexOf('-') + 1));
      assert.ok(seq(postId) < seq(getId), `${contentType}: ids in arrival order (${postId}, then ${getId})`);
      assert.equal((await durations()) - n0, 1);
      assert.ok((await sums()) - s0 >= 0.4, `${contentType}: the duration runs from arrival (${((await sums()) - s0).toFixed(3)} s)`);
    }
  });

  test('a fault in the fast lane\'s shim route before it answers counts nothing twice: the same metrics move as through Fastify alone', async () => {
    const t = await setup();
    const original = Object.getOwnPropertyDescriptor(ShimTokens.prototype, 'answer') as PropertyDescriptor;
    ShimTokens.prototype.answer = () => {
      throw new Error('a fault for the test');
    };
    try {
      const res = await sameAnswer(
        t,
        { method: 'POST', url: '/oauth/token', headers: { 'content-type': 'application/json' }, payload: JSON.stringify({ grant_type: 'refresh_token', refresh_token: `${t.refreshCredential}.AAAAAAAAAAAA` }) },
        'declines',
      );
      assert.equal(res.statusCode, 500);
    } finally {
      Object.defineProperty(ShimTokens.prototype, 'answer', original);
    }
  });

  test('the fast lane does not serve a platform token on GET /codex-auth, and serves it on its own workspace\'s drop-in route', async () => {
    const t = await setup({ platformTokens: true });
    await t.core.pool.query(`CREATE TABLE IF NOT EXISTS workspace_auth_tokens (
      id uuid PRIMARY KEY DEFAULT gen_random_uuid(), workspace_id uuid NOT NULL, token_hash bytea NOT NULL,
      prefix text, created_at timestamptz DEFAULT now(), last_used_at timestamptz, revoked_at timestamptz)`);
    const ws = randomUUID();
    const token = randomBytes(32).toString('base64url');
    secrets.push(token);
    await t.core.pool.query('INSERT INTO workspace_auth_tokens (workspace_id, token_hash, prefix) VALUES ($1, $2, $3)', [ws, createHash('sha256').update(token).digest(), token.slice(0, 8)]);
    const auth = { authorization: `Bearer ${token}` };
    await waitFor('the platform token to be loaded', async () => (await viaFastify(t, { method: 'GET', url: `/workspaces/${ws}/secrets/values`, headers: auth })).statusCode === 200, 5_000);
    assert.equal((await sameAnswer(t, { method: 'GET', url: `/workspaces/${ws}/secrets/values`, headers: auth }, 'answers')).statusCode, 200);
    assert.equal((await sameAnswer(t, { method: 'GET', url: '/codex-auth', headers: auth }, 'declines')).statusCode, 401);
    assert.equal((await sameAnswer(t, { method: 'GET', url: `/workspaces/${randomUUID()}/secrets/values`, headers: auth }, 'declines')).statusCode, 404);
  });

  test('the fast lane serves a real socket, and stands aside once the app is closing: Fastify answers its 503', async () => {
    const t = await setup();
    await t.app.listen({ port: 0, host: '127.0.0.1' });
    const port = (t.app.server.address() as AddressInfo).port;
    const before = t.lane.answered;
    const res = await fetch(`http://127.0.0.1:${port}/codex-auth`, { headers: { authorization: `Bearer ${t.token}` } });
    assert.equal(res.status, 200);
    answers.push(await res.text());
    assert.equal(t.lane.answered, before + 1, 'served by the lane over a real socket');
    // A request that reaches the server after close() began (one already on an open
    // connection): Fastify's closing answer, not the lane's.
    await t.app.close();
    const late = await viaServer(t, { method: 'GET', url: '/codex-auth', headers: { authorization: `Bearer ${t.token}` } });
    assert.equal(late.statusCode, 503);
    assert.equal(late.headers['connection'], 'close');
    assert.equal(t.lane.answered, before + 1, "a closing app's lane answers nothing");
  });

  test('a fault inside the fast lane goes to Fastify, which answers 500 problem+json: the process keeps serving', async () => {
    const t = await setup();
    const auth = { authorization: `Bearer ${t.token}` };
    const markServed = t.core.clients.markServed.bind(t.core.clients);
    t.core.clients.markServed = () => {
      throw new Error('a fault for the test');
    };
    const before = t.lane.answered;
    const res = await viaServer(t, { method: 'GET', url: '/codex-auth', headers: auth });
    assert.equal(res.statusCode, 500);
    assert.match(String(res.headers['content-type']), /^application\/problem\+json/);
    assert.equal(t.lane.answered, before);
    // The same fault in the shim's lane route: Fastify meets it again (with the body the
    // lane read) and answers as the shim answers faults.
    const shim: InjectOptions = { method: 'POST', url: '/oauth/token', headers: { 'content-type': 'application/json' }, payload: JSON.stringify({ grant_type: 'refresh_token', refresh_token: `${t.refreshCredential}.AAAAAAAAAAAA` }) };
    const failed = await viaServer(t, shim);
    assert.equal(failed.statusCode, 500);
    assert.equal(failed.json<{ error: { code: string } }>().error.code, 'server_error');
    assert.equal(t.lane.answered, before);
    t.core.clients.markServed = markServed;
    assert.equal((await viaServer(t, { method: 'GET', url: '/codex-auth', headers: auth })).statusCode, 200);
    assert.equal((await viaServer(t, shim)).statusCode, 200);
    assert.equal(t.lane.answered, before + 2);
  });

  test('the fast lane finds a token matched before from the header\'s tail, answers every spelling of the Bearer header that Fastify accepts as Fastify does, and refuses a revoked token at once', async () => {
    const t = await setup();
    assert.equal(t.core.clients.matchedBefore(t.token), undefined, 'nothing is matched before its first use');
    const at = (authorization: string): InjectOptions => ({ method: 'GET', url: '/codex-auth', headers: { authorization } });
    assert.equal((await sameAnswer(t, at(`Bearer ${t.token}`), 'answers')).statusCode, 200);
    assert.equal(t.core.clients.matchedBefore(t.token)?.name, 'ws-1');
    // Spellings the header's tail is not the token of: bearerOf reads them, as before.
    for (const h of [`bearer ${t.token}`, `BEARER ${t.token}`, `Bearer  ${t.token}`, `Bearer\t${t.token}`, `Bearer ${t.token} `]) {
      assert.equal((await sameAnswer(t, at(h), 'answers')).statusCode, 200, JSON.stringify(h));
    }
    for (const h of [`Bearer ${t.token}x`, `Bearer x${t.token}`, `Bearer ${t.token} x`, `Bearer ${t.token.slice(0, -1)}`, `Basic ${t.token}`, t.token]) {
      assert.equal((await sameAnswer(t, at(h), 'declines')).statusCode, 401, JSON.stringify(h));
    }
    const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
    assert.equal((await viaFastify(t, { method: 'DELETE', url: '/admin/clients/ws-1', headers: admin })).statusCode, 204);
    assert.equal(t.core.clients.matchedBefore(t.token), undefined, 'a revocation forgets the match');
    assert.equal((await sameAnswer(t, at(`Bearer ${t.token}`), 'declines')).statusCode, 401);
  });

  test('the fast lane reads the broker\'s clock once per answer: the credential\'s state, the availability check and the last-seen time share it', async () => {
    const t = await setup();
    const serve = t.lane.serve.bind(t.lane);
    const reads: number[] = [];
    t.lane.serve = (req, res) => {
      const before = t.clock.reads;
      const taken = serve(req, res);
      if (taken) reads.push(t.clock.reads - before);
      return taken;
    };
    const auth = { authorization: `Bearer ${t.token}` };
    const ok = await viaServer(t, { method: 'GET', url: '/codex-auth', headers: auth });
    assert.equal(ok.statusCode, 200);
    assert.equal((await viaServer(t, { method: 'GET', url: '/codex-auth', headers: { ...auth, 'if-none-match': String(ok.headers['etag']) } })).statusCode, 304);
    assert.equal((await viaServer(t, { method: 'GET', url: `/workspaces/${t.workspaceId}/secrets/values`, headers: auth })).statusCode, 200);
    // The state of the client's credential (whether its assignment keeps it), the
    // availability check and the last-seen time took one read each before.
    assert.deepEqual(reads, [1, 1, 1]);
    const seen = [...t.core.clients.all()].find((c) => c.name === 'ws-1');
    assert.ok(seen && seen.lastSeenAt > 0);
  });

  test('the fast lane takes the wall time from its own clock reading: Date.now() once per 100 ms, not once per answer, and the last-seen time it writes is the wall time', async () => {
    const realNow = Date.now;
    let calls = 0;
    // Counted from before the app is made, so whatever keeps a reference to Date.now counts too.
    Date.now = () => {
      calls++;
      return realNow();
    };
    try {
      const t = await setup({ realClock: true });
      // Steady state: the client holds its stored assignment (until it lands, each answer
      // picks a credential for it, and picking reads the clock).
      await waitFor('the client to be assigned', () => [...t.core.clients.all()].find((c) => c.name === 'ws-1')?.assigned !== undefined);
      // Only what the lane itself does while answering counts (not the background reloads).
      const serve = t.lane.serve.bind(t.lane);
      const reads: number[] = [];
      t.lane.serve = (req, res) => {
        const before = calls;
        const taken = serve(req, res);
        if (taken) reads.push(calls - before);
        return taken;
      };
      const auth = { authorization: `Bearer ${t.token}` };
      const started = performance.now();
      const wallStart = realNow();
      for (let i = 0; i < 300; i++) {
        const url = i % 2 ? '/codex-auth' : `/workspaces/${t.workspaceId}/secrets/values`;
        assert.equal((await viaServer(t, { method: 'GET', url, headers: auth })).statusCode, 200);
      }
      const elapsed = performance.now() - started;
      const wallEnd = realNow();
      assert.equal(reads.length, 300, 'every answer came from the lane');
      // At most one answer per 100 ms window reads Date.now() (once); every other reads none.
      const reading = reads.filter((n) => n > 0);
      assert.ok(
        reading.every((n) => n === 1) && reading.length <= Math.ceil(elapsed / WALL_CLOCK_WINDOW_MS) + 1,
        `${reading.length} of 300 answers read Date.now() (${reads.reduce((a, b) => a + b, 0)} reads) in ${elapsed.toFixed(0)} ms`,
      );
      const seen = [...t.core.clients.all()].find((c) => c.name === 'ws-1');
      assert.ok(seen && seen.lastSeenAt >= wallStart - 1 && seen.lastSeenAt <= wallEnd + 1, `last seen ${seen?.lastSeenAt} within [${wallStart}, ${wallEnd}]`);
      assert.ok(Number.isInteger(seen.lastSeenAt), 'whole milliseconds, as Date.now() gives');
    } finally {
      Date.now = realNow;
    }
  });

  test('/healthz through the fast lane says at once what changed (the listener, the uptime), as Fastify does, with its body\'s length', async () => {
    const t = await setup();
    await waitFor('the listener connected', () => t.core.listener.connected);
    const probe = async (listener: string) => {
      const res = await sameAnswer(t, { method: 'GET', url: '/healthz' }, 'answers');
      assert.equal(res.json<{ listener: string }>().listener, listener);
      assert.equal(res.headers['content-length'], String(Buffer.byteLength(res.body)));
      assert.equal(res.body, JSON.stringify(res.json()));
      return res.json<{ uptimeSeconds: number }>().uptimeSeconds;
    };
    const first = await probe('connected');
    await probe('connected');
    await t.core.listener.close();
    await probe('disconnected');
    await new Promise((r) => setTimeout(r, 1_100));
    assert.ok((await probe('disconnected')) > first, 'the uptime moves on');
  });

  test('/healthz through the fast lane writes a replica id outside ASCII as UTF-8, and an ASCII one as Latin-1: the same bytes over a real socket', async () => {
    for (const replicaId of ['replica-a', 'réplica-ü-🔑']) {
      const lane = new FastLane();
      const t = await suite.app({ databaseUrl: await suite.pg.newDatabase(), upstreamUrl: (await suite.upstream()).url, lane, config: { replicaId } });
      await t.app.listen({ port: 0, host: '127.0.0.1' });
      const res = await fetch(`http://127.0.0.1:${(t.app.server.address() as AddressInfo).port}/healthz`);
      const bytes = Buffer.from(await res.arrayBuffer());
      assert.equal(lane.answered, 1);
      assert.equal(JSON.parse(bytes.toString('utf8')).replicaId, replicaId);
      assert.equal(res.headers.get('content-length'), String(bytes.length));
    }
  });

  test('digits() gives a number\'s decimal text, converted again only when the number changes', () => {
    const d = digits();
    const out = [1167, 1167, 0, 99999, 1167, 5].map((n) => d(n));
    assert.deepEqual(out, ['1167', '1167', '0', '99999', '1167', '5']);
    const e = digits();
    assert.equal(e(42), '42');
    assert.equal(d(5), '5', 'each memo keeps its own number');
  });

  test('the fast lane never puts a token in a log line', async () => {
    const lines = suite.logLines();
    assert.ok(secrets.length > 0 && answers.length > 0);
    assert.deepEqual(findLeaks(lines, [...secrets, ...suite.issuedTokens()]), []);
  });
});
