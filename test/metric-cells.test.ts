/**
 * The serving path counts into plain-number cells that prom-client reads when scraped
 * (src/metrics.ts labelled): what a scrape shows must be exactly what prom-client's own
 * inc() and observe() would have shown.
 */
import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { Counter, Histogram, Registry } from 'prom-client';
import { labelled } from '../src/metrics.js';

function pair() {
  const make = () => {
    const registry = new Registry();
    const registers = [registry];
    return {
      registry,
      counter: new Counter({ name: 'served_total', help: 'h', labelNames: ['route', 'result'], registers }),
      // Same buckets as the broker's request duration.
      histogram: new Histogram({ name: 'duration_seconds', help: 'h', labelNames: ['method', 'route', 'status_code'], buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1], registers }),
    };
  };
  return { direct: make(), cells: make() };
}

// On, between and above the bucket bounds.
const VALUES = [0, 0.0001220703125, 0.0005, 0.0009765625, 0.001, 0.001953125, 0.125, 0.25, 0.5, 1, 2, 1024];

/**
 * The exposition with each _sum to 12 significant digits: a cell adds a scrape's values
 * up before adding them to the total, so the last bits of a sum of decimals may differ.
 */
async function exposition(registry: Registry): Promise<string> {
  return (await registry.metrics()).replace(/(_sum\{[^}]*\}) (\S+)/g, (_m, series: string, v: string) => `${series} ${Number(v).toPrecision(12)}`);
}

test('counts kept in cells scrape exactly as prom-client inc() and observe() expose them', async () => {
  const { direct, cells } = pair();
  const served = labelled(cells.counter);
  const duration = labelled(cells.histogram);
  for (let round = 0; round < 3; round++) {
    for (const [i, v] of VALUES.entries()) {
      const status = i % 3 === 0 ? 304 : 200;
      direct.histogram.observe({ method: 'GET', route: '/codex-auth', status_code: String(status) }, v);
      duration('GET', '/codex-auth', status).observe(v);
      direct.counter.inc({ route: '/codex-auth', result: status === 304 ? 'not_modified' : 'ok' });
      served('/codex-auth', status === 304 ? 'not_modified' : 'ok').inc();
    }
    direct.histogram.observe({ method: 'POST', route: '/oauth/token', status_code: '200' }, VALUES[round] ?? 0);
    duration('POST', '/oauth/token', 200).observe(VALUES[round] ?? 0);
    // A scrape between rounds: the cells hand over what they counted and start again.
    assert.equal(await exposition(cells.registry), await exposition(direct.registry));
  }
  served('/codex-auth', 'ok').inc();
  direct.counter.inc({ route: '/codex-auth', result: 'ok' });
  assert.deepEqual(await cells.counter.get(), await direct.counter.get(), 'a direct get() sees every count too');
});

test('a cell rejects a value that is not a number, as prom-client does', () => {
  const { cells } = pair();
  assert.throws(() => labelled(cells.histogram)('GET', '/x', 200).observe(Number.NaN), TypeError);
});
