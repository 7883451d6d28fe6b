import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import type { LightMyRequestResponse } from 'fastify';
import { ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import { findLeaks } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';

const KEY = 'CODEX_AUTH_JSON';
const MAX_DELAY_MS = 50;
// Above the plugin's 10 ms histogram resolution: a window with no sample reads as an infinite delay.
const SAMPLE_MS = 25;
const BLOCK_MS = 500;

const suite = useSuite();
const bodies: string[] = [];

const nowSec = () => Math.floor(Date.now() / 1000);

/** Hold the event loop synchronously, as a CPU-bound handler or a GC storm would. */
function busyWait(ms: number): void {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    // spin
  }
}

const turn = () => new Promise<void>((r) => setImmediate(r));

async function inject(t: TestApp, url: string, token: string): Promise<LightMyRequestResponse> {
  const res = await t.app.inject({ method: 'GET', url, headers: { authorization: `Bearer ${token}` } });
  bodies.push(res.body);
  return res;
}

/**
 * under-pressure samples the loop delay every SAMPLE_MS (a timer, so only once the loop is
 * free again) and sheds until the next sample: poll a few loop turns for that window.
 */
async function pollShed(t: TestApp, clientToken: string): Promise<{ auth: LightMyRequestResponse; health: LightMyRequestResponse } | undefined> {
  const started = performance.now();
  while (performance.now() - started < 300) {
    const [auth, health] = await Promise.all([inject(t, '/codex-auth', clientToken), inject(t, '/healthz', clientToken)]);
    if (auth.statusCode === 503 && health.statusCode === 503) return { auth, health };
    await turn();
  }
  return undefined;
}

/** Startup work (migrations, the first connections) can itself exceed a 50 ms limit: wait for calm. */
async function calm(t: TestApp): Promise<void> {
  const started = Date.now();
  let quiet = 0;
  while (quiet < 3) {
    if (Date.now() - started > 5_000) throw new Error('the app stayed under pressure for 5 s with nothing to do');
    quiet = t.app.isUnderPressure() ? 0 : quiet + 1;
    await new Promise((r) => setTimeout(r, SAMPLE_MS));
  }
}

/**
 * POST /admin/clients is shed like every other route. With a 25 ms sample window a loaded
 * machine (CI runs two test files at once on two cores) can leave a window with no histogram
 * sample, which under-pressure reads as an infinite delay: retry a shed creation until calm.
 */
async function createClient(t: TestApp, name: string): Promise<string> {
  const started = Date.now();
  for (;;) {
    const res = await t.app.inject({ method: 'POST', url: '/admin/clients', headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, payload: { name } });
    if (res.statusCode === 201) return res.json<{ token: string }>().token;
    const shed = res.statusCode === 503 && res.json<{ code?: string }>().code === 'overloaded';
    if (!shed || Date.now() - started > 10_000) assert.fail(`POST /admin/clients: ${res.statusCode} ${res.body}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function waitFor200(t: TestApp, clientToken: string, ms = 10_000): Promise<number> {
  const started = Date.now();
  for (;;) {
    const res = await inject(t, '/codex-auth', clientToken);
    if (res.statusCode === 200) return Date.now() - started;
    if (Date.now() - started > ms) throw new Error(`GET /codex-auth still ${res.statusCode} after ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test('a blocked event loop gets 503 + Retry-After on GET /codex-auth, and a due refresh still completes once the loop is free', async () => {
  const upstream = await suite.upstream();
  const t = await suite.app({
    databaseUrl: await suite.pg.newDatabase(),
    upstreamUrl: upstream.url,
    // The refresh loop is driven explicitly below, so the only refresh is the one we ask for.
    start: false,
    maxEventLoopDelayMs: MAX_DELAY_MS,
    pressureSampleIntervalMs: SAMPLE_MS,
  });
  // Due: 1 h left of a 10-day token.
  const seeded = upstream.seed({ iatSec: nowSec() - 10 * 86_400 + 3_600, expSec: nowSec() + 3_600 });
  await t.core.store.put(KEY, JSON.stringify(seeded));
  await t.core.refresher.reload();
  assert.equal(t.core.refresher.state(), 'due');
  await calm(t);
  const clientToken = await createClient(t, 'overload-1');
  // Served before the overload. With a 50 ms limit a loaded machine's own hiccups can shed
  // a request here too: wait for the loop to be calm rather than take one sample.
  await waitFor200(t, clientToken, 10_000);

  // 1. Block the loop past the limit: the client route and /healthz shed instead of queueing.
  let shed: Awaited<ReturnType<typeof pollShed>>;
  for (let attempt = 1; attempt <= 3 && !shed; attempt++) {
    busyWait(BLOCK_MS);
    shed = await pollShed(t, clientToken);
    if (!shed) console.log(`overload: no shed window caught on attempt ${attempt}`);
  }
  assert.ok(shed, 'a blocked loop must be shed with 503');
  for (const [name, res] of Object.entries(shed)) {
    assert.equal(res.statusCode, 503, name);
    assert.equal(res.headers['retry-after'], '5', `${name}: Retry-After`);
    assert.match(String(res.headers['content-type']), /^application\/problem\+json/, name);
    const body = res.json<{ code: string; status: number; detail: string }>();
    assert.equal(body.code, 'overloaded', name);
    assert.equal(body.status, 503, name);
    assert.match(body.detail, /eventLoopDelay/, name);
  }

  // 2. The loop recovers: served again.
  const recoveredMs = await waitFor200(t, clientToken);
  console.log(`overload: served again ${recoveredMs} ms after the shed`);

  // 3. Block again and run the due refresh while requests are being shed: it completes.
  await calm(t);
  const postsBefore = upstream.requests.filter((r) => r.method === 'POST').length;
  busyWait(BLOCK_MS);
  const [report, shedAgain] = await Promise.all([t.core.refresher.runCycle({ reason: 'overload-test' }), pollShed(t, clientToken)]);
  assert.equal(report.attempt, 'rotated', `the due refresh completes under request shedding: ${JSON.stringify({ check: report.check, attempt: report.attempt })}`);
  console.log(`overload: the refresh rotated; requests ${shedAgain ? 'were' : 'were not caught being'} shed meanwhile`);
  assert.equal(upstream.requests.filter((r) => r.method === 'POST').length - postsBefore, 1, 'exactly one upstream POST');
  assert.equal(t.core.refresher.state(), 'fresh');
  await waitFor200(t, clientToken);
  const after = await inject(t, '/codex-auth', clientToken);
  assert.equal(after.statusCode, 200);

  // No shed reply was sent twice (a pressure handler that both sends and lets the request go on).
  const warnings = t.logs.events().filter((e) => typeof e['msg'] === 'string' && /already sent/i.test(e['msg']));
  assert.deepEqual(warnings, []);
  assert.deepEqual(findLeaks(t.logs.lines, [upstream.currentRefreshToken() ?? '', ADMIN_TOKEN, clientToken]), []);
});
