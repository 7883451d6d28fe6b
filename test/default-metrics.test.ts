/**
 * prom-client's default process metrics, and METRICS_GC_DURATION: with false, every one of
 * them but nodejs_gc_duration_seconds, and no PerformanceObserver on 'gc' at all (that
 * observer is what the histogram costs; docs/performance.md, "The GC histogram").
 */
import { strict as assert } from 'node:assert';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as path from 'node:path';
import { PerformanceObserver } from 'node:perf_hooks';
import { test } from 'node:test';
import { collectDefaultMetrics, Registry } from 'prom-client';
import { createMetrics } from '../src/metrics.js';
import { cliArgs } from './helpers/cli.js';
import { freePort } from './helpers/pg.js';
import { useSuite } from './helpers/suite.js';
import { waitFor } from './helpers/wait.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const GC = 'codex_broker_nodejs_gc_duration_seconds';
const suite = useSuite();

async function names(registry: Registry): Promise<string[]> {
  return (await registry.getMetricsAsJSON()).map((m) => m.name).sort();
}

/** What collectDefaultMetrics registers with the broker's prefix, less the three *_total gauges the broker drops. */
async function promClientDefaults(): Promise<string[]> {
  const scratch = new Registry();
  collectDefaultMetrics({ register: scratch, prefix: 'codex_broker_' });
  return (await names(scratch)).filter((n) => !/^codex_broker_nodejs_active_(handles|requests|resources)_total$/.test(n));
}

/** The entry types every PerformanceObserver created while fn runs observes. */
function observedTypes(fn: () => void): string[] {
  const seen: string[] = [];
  const original = PerformanceObserver.prototype.observe;
  PerformanceObserver.prototype.observe = function (this: PerformanceObserver, options: Parameters<PerformanceObserver['observe']>[0]) {
    if ('entryTypes' in options) seen.push(...options.entryTypes);
    else seen.push(options.type);
    return original.call(this, options);
  };
  try {
    fn();
  } finally {
    PerformanceObserver.prototype.observe = original;
  }
  return seen;
}

test('default process metrics: every one prom-client registers, the GC histogram included', async () => {
  const defaults = await promClientDefaults();
  assert.ok(defaults.includes(GC), 'prom-client still has the GC histogram');
  const exposed = new Set(await names(createMetrics().registry));
  for (const n of defaults) assert.ok(exposed.has(n), `${n} is missing`);
});

test('METRICS_GC_DURATION=false: every default process metric but nodejs_gc_duration_seconds', async () => {
  const all = await names(createMetrics().registry);
  const without = await names(createMetrics({ gcDuration: false }).registry);
  assert.deepEqual(without, all.filter((n) => n !== GC));
  // Each collector is registered one by one from prom-client's own list: one it adds comes along.
  const exposed = new Set(without);
  for (const n of await promClientDefaults()) if (n !== GC) assert.ok(exposed.has(n), `${n} is missing`);
});

test('METRICS_GC_DURATION=false observes no GC: no PerformanceObserver on gc is created', () => {
  assert.deepEqual(observedTypes(() => createMetrics({ gcDuration: false })).filter((t) => t === 'gc'), []);
  assert.deepEqual(observedTypes(() => createMetrics()).filter((t) => t === 'gc'), ['gc'], 'by default the histogram observes GC');
});

test('serve: the GC histogram is in /metrics by default and absent with METRICS_GC_DURATION=false, the other process metrics in both', async () => {
  for (const setting of [undefined, 'false']) {
    const port = await freePort();
    const env: NodeJS.ProcessEnv = {
      PATH: process.env['PATH'],
      HOME: process.env['HOME'],
      DATABASE_URL: await suite.pg.newDatabase(),
      SECRETS_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
      HOST: '127.0.0.1',
      PORT: String(port),
      LOG_LEVEL: 'warn',
      ...(setting === undefined ? {} : { METRICS_GC_DURATION: setting }),
    };
    const child = spawn(process.execPath, cliArgs(['serve']), { cwd: ROOT, env, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise((resolve) => child.once('close', resolve));
    try {
      await waitFor(`serve on ${port} (${stderr})`, async () => (await fetch(`http://127.0.0.1:${port}/healthz`).catch(() => undefined))?.ok === true, 60_000);
      const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      assert.match(text, /^codex_broker_process_cpu_seconds_total /m);
      assert.match(text, /^codex_broker_nodejs_heap_size_used_bytes /m);
      assert.match(text, /^codex_broker_nodejs_eventloop_lag_seconds /m);
      if (setting === undefined) assert.match(text, /^# TYPE codex_broker_nodejs_gc_duration_seconds histogram$/m);
      else assert.doesNotMatch(text, /nodejs_gc_duration_seconds/);
    } finally {
      child.kill('SIGTERM');
      await exited;
    }
  }
});
