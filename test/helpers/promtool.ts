/**
 * promtool (Debian's `prometheus` package, which .ci/run installs): the alert rules as
 * written, unit-tested against series a test supplies, here the broker's real scrapes.
 */
import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { TestContext } from 'node:test';
import { parse as parseYaml, stringify as stringifyYaml } from 'yaml';
import { tempDirs } from './tmp.js';

export const ALERTS = path.resolve(import.meta.dirname, '..', '..', 'deploy', 'prometheus', 'alerts.yml');
export const JOB = 'codex-auth-broker';

export function findBinary(name: string): string | undefined {
  const dirs = [...(process.env['PATH'] ?? '').split(path.delimiter), '/usr/bin', '/usr/local/bin'];
  for (const d of dirs) {
    const f = path.join(d, name);
    try {
      fs.accessSync(f, fs.constants.X_OK);
      return f;
    } catch {
      // next
    }
  }
  return undefined;
}

export const PROMTOOL = findBinary('promtool');

/** The binary is there, or: under CI a failure, elsewhere a loud skip. */
export function need(t: TestContext, bin: string | undefined, name: string): bin is string {
  if (bin) return true;
  const msg = `${name} not installed: apt-get install prometheus`;
  if (process.env['CI']) assert.fail(`${msg} (.ci/run installs it; CI must run these tests, not skip them)`);
  console.error(`\n*** SKIPPED: ${msg} ***\n`);
  t.skip(msg);
  return false;
}

export const promtoolOrSkip = (t: TestContext): boolean => need(t, PROMTOOL, 'promtool');

export function promtool(args: string[], input?: string): { code: number | null; out: string } {
  const r = spawnSync(PROMTOOL!, args, { input, encoding: 'utf8', timeout: 60_000 });
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}

interface Rule {
  alert: string;
  annotations?: Record<string, string>;
}
const tmpDir = tempDirs('cab-promtool-');

/** The rules as written, annotations aside (promtool would compare their rendered text), in a temporary dir. */
export function strippedRules(): { dir: string; rules: Rule[] } {
  const file = parseYaml(fs.readFileSync(ALERTS, 'utf8')) as { groups: Array<{ name: string; rules: Rule[] }> };
  const dir = tmpDir();
  const stripped = { groups: file.groups.map((g) => ({ ...g, rules: g.rules.map(({ annotations: _a, ...r }) => r) })) };
  fs.writeFileSync(path.join(dir, 'rules.yml'), stringifyYaml(stripped));
  return { dir, rules: file.groups.flatMap((g) => g.rules) };
}

/**
 * Run `promtool test rules` with each scrape (Prometheus text exposition) held constant for
 * 20 minutes as the series of one instance, and assert exactly these alerts at `evalTime`.
 */
export function expectAlerts(scrapes: string[], evalTime: string, expected: Array<{ alertname: string; exp: Array<Record<string, string>> }>): void {
  const series: Array<{ series: string; values: string }> = [];
  scrapes.forEach((text, i) => {
    for (const line of text.split('\n')) {
      const m = /^(codex_broker_[a-z_]+)(?:\{(.*)\})? (\S+)$/.exec(line);
      if (!m || !Number.isFinite(Number(m[3]))) continue;
      const labels = [`job="${JOB}"`, `instance="broker-${i}:8080"`, ...(m[2] ? [m[2]] : [])].join(',');
      series.push({ series: `${m[1]}{${labels}}`, values: `${m[3]}x20` });
    }
  });
  const { dir } = strippedRules();
  const tests = [
    {
      interval: '1m',
      input_series: series,
      alert_rule_test: expected.map((e) => ({ eval_time: evalTime, alertname: e.alertname, exp_alerts: e.exp.map((labels) => ({ exp_labels: { job: JOB, ...labels } })) })),
    },
  ];
  const file = path.join(dir, 'scrape.test.yml');
  fs.writeFileSync(file, stringifyYaml({ rule_files: ['rules.yml'], evaluation_interval: '1m', tests }));
  const r = promtool(['test', 'rules', file]);
  assert.equal(r.code, 0, r.out);
}
