/**
 * The alert rules and the Prometheus config against the real thing: promtool (check
 * rules, check config, unit tests of every alert, check metrics on a live scrape) and a
 * real Prometheus scraping a running broker, evaluating every alert and panel query.
 *
 * Both binaries come from Debian's `prometheus` package, which .ci/run installs. Without
 * them the tests fail under CI and are skipped, loudly, elsewhere.
 */
import { strict as assert } from 'node:assert';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import type { AddressInfo } from 'node:net';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { parse as parseYaml, stringify as stringifyYaml } from 'yaml';
import { createMetrics } from '../src/metrics.js';
import { ADMIN_TOKEN, createTestApp, type TestApp } from './helpers/app.js';
import { findBinary, need, promtool, PROMTOOL, strippedRules } from './helpers/promtool.js';
import { tempDirs } from './helpers/tmp.js';
import { FakeUpstream } from './helpers/fake-upstream.js';
import { freePort, startTestPostgres, type TestPostgres } from './helpers/pg.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const ALERTS = path.join(ROOT, 'deploy', 'prometheus', 'alerts.yml');
const PROM_CONFIG = path.join(ROOT, 'deploy', 'prometheus', 'prometheus.yml');
const DASHBOARD = path.join(ROOT, 'deploy', 'grafana', 'dashboards', 'codex-auth-broker.json');
const JOB = 'codex-auth-broker';

const PROMETHEUS = findBinary('prometheus');

interface Rule {
  alert: string;
  expr: string;
  annotations?: Record<string, string>;
}
const ruleFile = parseYaml(fs.readFileSync(ALERTS, 'utf8')) as { groups: Array<{ name: string; rules: Rule[] }> };
const rules = ruleFile.groups.flatMap((g) => g.rules);

const tmpDir = tempDirs('cab-prom-');

describe('promtool', () => {
  test('check rules: the alert rules are valid', (t) => {
    if (!need(t, PROMTOOL, 'promtool')) return;
    const r = promtool(['check', 'rules', ALERTS]);
    assert.equal(r.code, 0, r.out);
    assert.match(r.out, new RegExp(`SUCCESS: ${rules.length} rules found`));
  });

  test('check config: prometheus.yml is valid (its rule file path pointed at the repository)', (t) => {
    if (!need(t, PROMTOOL, 'promtool')) return;
    const config = parseYaml(fs.readFileSync(PROM_CONFIG, 'utf8')) as { rule_files: string[] };
    assert.deepEqual(config.rule_files, ['/etc/prometheus/alerts.yml'], 'the path docker-compose.yml mounts the rules at');
    config.rule_files = [ALERTS];
    const file = path.join(tmpDir(), 'prometheus.yml');
    fs.writeFileSync(file, stringifyYaml(config));
    const r = promtool(['check', 'config', file]);
    assert.equal(r.code, 0, r.out);
    assert.match(r.out, /SUCCESS: 1 rule files found/);
  });

  test('test rules: every alert fires when it should and stays quiet when it should not', (t) => {
    if (!need(t, PROMTOOL, 'promtool')) return;
    const { dir } = strippedRules();
    const L = (labels: Record<string, string>) => `{${Object.entries({ job: JOB, ...labels }).map(([k, v]) => `${k}="${v}"`).join(',')}}`;
    const s = (metric: string, labels: Record<string, string>, values: string) => ({ series: `${metric}${L(labels)}`, values });
    const b1 = { instance: 'b1:8080' };
    const b2 = { instance: 'b2:8080' };
    const state = 'codex_broker_credential_state';
    const expiry = 'codex_broker_access_token_expiry_timestamp_seconds';
    const used = 'codex_broker_usage_used_percent';
    const age = 'codex_broker_usage_snapshot_age_seconds';
    const assignedTo = 'codex_broker_pool_assigned_clients';
    // POOL_SWITCH_PERCENT as every replica exposes it: the usage alerts' threshold.
    const threshold = [s('codex_broker_pool_switch_percent', b1, '90x20'), s('codex_broker_pool_switch_percent', b2, '90x20')];
    const alert = (eval_time: string, alertname: string, exp: Array<Record<string, string>>) => ({
      eval_time,
      alertname,
      exp_alerts: exp.map((labels) => ({ exp_labels: { job: JOB, ...labels } })),
    });
    const tests = [
      {
        name: 'latched on any replica: one alert for the login',
        input_series: [s(state, { ...b1, state: 'latched' }, '0 0 1 1 1 1'), s(state, { ...b2, state: 'latched' }, '0x5')],
        alert_rule_test: [alert('1m', 'CodexBrokerCredentialLatched', []), alert('3m', 'CodexBrokerCredentialLatched', [{ severity: 'critical', state: 'latched' }])],
      },
      {
        name: 'per credential (issue #12): a latched credential fires its own alert; the others do not',
        input_series: [
          s(state, { ...b1, credential: 'team-1', state: 'latched' }, '1x10'),
          s(state, { ...b2, credential: 'team-1', state: 'latched' }, '1x10'),
          s(state, { ...b1, credential: 'default', state: 'latched' }, '0x10'),
          s(expiry, { ...b1, credential: 'team-2' }, '5400x120'),
          s(expiry, { ...b1, credential: 'default' }, '1000000x120'),
        ],
        alert_rule_test: [
          alert('5m', 'CodexBrokerCredentialLatched', [{ severity: 'critical', state: 'latched', credential: 'team-1' }]),
          alert('10m', 'CodexBrokerAccessTokenExpiringSoon', [{ severity: 'critical', credential: 'team-2' }]),
        ],
      },
      {
        name: 'a token expiring at t=5400s; a replica holding none (0) is ignored',
        input_series: [s(expiry, b1, '5400x120'), s(expiry, b2, '0x120')],
        alert_rule_test: [
          alert('10m', 'CodexBrokerAccessTokenExpiringSoon', [{ severity: 'critical' }]),
          alert('10m', 'CodexBrokerAccessTokenExpired', []),
          alert('100m', 'CodexBrokerAccessTokenExpiringSoon', []),
          alert('100m', 'CodexBrokerAccessTokenExpired', [{ severity: 'critical' }]),
        ],
      },
      {
        name: 'a fresh token, and no token at all: neither expiry alert',
        input_series: [s(expiry, b1, '1000000x60'), s(expiry, { instance: 'b3:8080', job: 'other' }, '0x60')],
        alert_rule_test: [alert('30m', 'CodexBrokerAccessTokenExpiringSoon', []), alert('30m', 'CodexBrokerAccessTokenExpired', [])],
      },
      {
        name: 'credential_state expired',
        input_series: [s(state, { ...b1, state: 'expired' }, '1x10')],
        alert_rule_test: [alert('5m', 'CodexBrokerAccessTokenExpired', [{ severity: 'critical', state: 'expired' }])],
      },
      {
        name: 'due for over 30 minutes',
        input_series: [s(state, { ...b1, state: 'due' }, '1x60'), s(state, { ...b2, state: 'due' }, '1x60')],
        alert_rule_test: [alert('20m', 'CodexBrokerRotationOverdue', []), alert('40m', 'CodexBrokerRotationOverdue', [{ severity: 'warning', state: 'due' }])],
      },
      {
        name: 'write-back pending on one replica for over a minute',
        input_series: [s('codex_broker_writeback_pending', b1, '0 1 1 1 1'), s('codex_broker_writeback_pending', b2, '0x4')],
        alert_rule_test: [
          alert('1m', 'CodexBrokerWritebackPending', []),
          alert('3m', 'CodexBrokerWritebackPending', [{ severity: 'critical', ...b1 }]),
        ],
      },
      {
        name: 'transient failures: one a minute fires (rotations and a quiet replica do not count)',
        input_series: [
          s('codex_broker_refresh_attempts_total', { ...b1, outcome: 'transient_failure' }, '0+1x40'),
          s('codex_broker_refresh_attempts_total', { ...b1, outcome: 'rotated' }, '0+1x40'),
          s('codex_broker_refresh_attempts_total', { ...b2, outcome: 'transient_failure' }, '0x40'),
        ],
        alert_rule_test: [alert('30m', 'CodexBrokerRefreshErrorsRising', [{ severity: 'warning', outcome: 'transient_failure' }])],
      },
      {
        name: 'two transient failures in 30 minutes',
        input_series: [s('codex_broker_refresh_attempts_total', { ...b1, outcome: 'transient_failure' }, '0x5 1x10 2x25')],
        alert_rule_test: [alert('30m', 'CodexBrokerRefreshErrorsRising', [])],
      },
      {
        name: 'a replica down for over 2 minutes',
        input_series: [s('up', b1, '1 1 0 0 0 0 0'), s('up', b2, '1x6')],
        alert_rule_test: [alert('3m', 'CodexBrokerDown', []), alert('5m', 'CodexBrokerDown', [{ severity: 'critical', ...b1 }])],
      },
      {
        name: 'nothing stored for over 10 minutes',
        input_series: [s(state, { ...b1, state: 'absent' }, '1x20'), s(state, { ...b1, state: 'fresh' }, '0x20')],
        alert_rule_test: [alert('5m', 'CodexBrokerNoUsableCredential', []), alert('15m', 'CodexBrokerNoUsableCredential', [{ severity: 'warning', state: 'absent' }])],
      },
      {
        name: 'one login at 92% of its weekly window on both replicas, another with headroom: usage high, the pool not exhausted',
        input_series: [
          s(used, { ...b1, credential: 'default', window: 'primary' }, '50x20'),
          s(used, { ...b1, credential: 'default', window: 'secondary' }, '92x20'),
          s(used, { ...b2, credential: 'default', window: 'secondary' }, '92x20'),
          s(used, { ...b1, credential: 'spare', window: 'primary' }, '10x20'),
          s(used, { ...b1, credential: 'spare', window: 'secondary' }, '89x20'),
          s(assignedTo, { ...b1, pool: 'default', credential: 'default' }, '3x20'),
          s(assignedTo, { ...b1, pool: 'default', credential: 'spare' }, '0x20'),
          ...threshold,
        ],
        alert_rule_test: [
          alert('5m', 'CodexBrokerUsageHigh', [{ severity: 'warning', credential: 'default', window: 'secondary' }]),
          alert('5m', 'CodexBrokerPoolExhausted', []),
        ],
      },
      {
        name: 'every login of the pool over POOL_SWITCH_PERCENT in some window: the pool is exhausted (per pool, the pool taken from pool_assigned_clients)',
        input_series: [
          s(used, { ...b1, credential: 'a', window: 'primary' }, '95x20'),
          s(used, { ...b1, credential: 'a', window: 'secondary' }, '20x20'),
          s(used, { ...b2, credential: 'b', window: 'primary' }, '10x20'),
          s(used, { ...b2, credential: 'b', window: 'secondary' }, '90x20'),
          s(used, { ...b1, credential: 'c', window: 'primary' }, '99x20'),
          s(used, { ...b1, credential: 'd', window: 'primary' }, '30x20'),
          s(assignedTo, { ...b1, pool: 'team', credential: 'a' }, '5x20'),
          s(assignedTo, { ...b1, pool: 'team', credential: 'b' }, '5x20'),
          s(assignedTo, { ...b2, pool: 'team', credential: 'a' }, '5x20'),
          s(assignedTo, { ...b2, pool: 'team', credential: 'b' }, '5x20'),
          s(assignedTo, { ...b1, pool: 'other', credential: 'c' }, '9x20'),
          s(assignedTo, { ...b1, pool: 'other', credential: 'd' }, '0x20'),
          ...threshold,
        ],
        alert_rule_test: [
          alert('5m', 'CodexBrokerPoolExhausted', [{ severity: 'critical', pool: 'team' }]),
          alert('5m', 'CodexBrokerUsageHigh', [
            { severity: 'warning', credential: 'a', window: 'primary' },
            { severity: 'warning', credential: 'b', window: 'secondary' },
            { severity: 'warning', credential: 'c', window: 'primary' },
          ]),
        ],
      },
      {
        name: 'a lower POOL_SWITCH_PERCENT (80) moves the alerts with it',
        input_series: [
          s(used, { ...b1, credential: 'a', window: 'primary' }, '85x20'),
          s(assignedTo, { ...b1, pool: 'solo', credential: 'a' }, '5x20'),
          s('codex_broker_pool_switch_percent', b1, '80x20'),
        ],
        alert_rule_test: [
          alert('1m', 'CodexBrokerPoolExhausted', []),
          alert('5m', 'CodexBrokerPoolExhausted', [{ severity: 'critical', pool: 'solo' }]),
          alert('5m', 'CodexBrokerUsageHigh', [{ severity: 'warning', credential: 'a', window: 'primary' }]),
        ],
      },
      {
        name: 'usage figures older than 900 s on every replica (one fresh replica keeps it quiet)',
        input_series: [
          s(age, { ...b1, credential: 'default' }, '0+60x20'),
          s(age, { ...b2, credential: 'default' }, '0+60x20'),
          s(age, { ...b1, credential: 'fresh' }, '0+60x20'),
          s(age, { ...b2, credential: 'fresh' }, '30x20'),
        ],
        alert_rule_test: [alert('14m', 'CodexBrokerUsageStale', []), alert('16m', 'CodexBrokerUsageStale', [{ severity: 'warning', credential: 'default' }])],
      },
      {
        name: 'a healthy broker: no alert at all',
        input_series: [
          s(state, { ...b1, state: 'fresh' }, '1x60'),
          s(state, { ...b1, state: 'latched' }, '0x60'),
          s(state, { ...b1, state: 'due' }, '0x60'),
          s(expiry, b1, '800000x60'),
          s('codex_broker_writeback_pending', b1, '0x60'),
          s('codex_broker_refresh_attempts_total', { ...b1, outcome: 'transient_failure' }, '0x60'),
          s('up', b1, '1x60'),
        ],
        alert_rule_test: rules.map((r) => alert('45m', r.alert, [])),
      },
    ].map((x) => ({ interval: '1m', ...x }));
    const covered = new Set(tests.flatMap((x) => x.alert_rule_test.filter((a) => a.exp_alerts.length > 0).map((a) => a.alertname)));
    assert.deepEqual([...covered].sort(), rules.map((r) => r.alert).sort(), 'every alert has a unit test in which it fires');
    const file = path.join(dir, 'alerts.test.yml');
    fs.writeFileSync(file, stringifyYaml({ rule_files: ['rules.yml'], evaluation_interval: '1m', tests }));
    const r = promtool(['test', 'rules', file]);
    assert.equal(r.code, 0, r.out);
  });

  test('check metrics: the full registry that serve exposes (default process metrics included)', async (t) => {
    if (!need(t, PROMTOOL, 'promtool')) return;
    const text = await createMetrics().registry.metrics();
    const r = promtool(['check', 'metrics'], text);
    assert.equal(r.code, 0, r.out);
  });
});

// ---- a live broker, scraped by promtool and by a real Prometheus ------------------------

describe('a live broker', () => {
  let pg: TestPostgres | undefined;
  let upstream: FakeUpstream | undefined;
  let broker: TestApp | undefined;
  let brokerUrl = '';
  let seededExp = 0;

  before(async () => {
    if (!PROMTOOL && !PROMETHEUS) return;
    pg = await startTestPostgres();
    upstream = await FakeUpstream.start();
    broker = await createTestApp({ databaseUrl: await pg.newDatabase(), upstreamUrl: upstream.url });
    const doc = upstream.seed();
    seededExp = JSON.parse(Buffer.from(String((doc['tokens'] as Record<string, string>)['access_token']).split('.')[1]!, 'base64url').toString()).exp as number;
    await broker.core.store.put('CODEX_AUTH_JSON', JSON.stringify(doc));
    await broker.core.refresher.reload();
    await broker.app.listen({ port: 0, host: '127.0.0.1' });
    brokerUrl = `http://127.0.0.1:${(broker.app.server.address() as AddressInfo).port}`;
    // Traffic, so that the served, client and HTTP series exist: a client, a 200, a 304.
    const created = await fetch(`${brokerUrl}/admin/clients`, {
      method: 'POST',
      headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' },
      body: JSON.stringify({ name: 'prometheus-test' }),
    });
    assert.equal(created.status, 201, await created.clone().text());
    const { token } = (await created.json()) as { token: string };
    const first = await fetch(`${brokerUrl}/codex-auth`, { headers: { authorization: `Bearer ${token}` } });
    assert.equal(first.status, 200);
    await first.text();
    const again = await fetch(`${brokerUrl}/codex-auth`, { headers: { authorization: `Bearer ${token}`, 'if-none-match': first.headers.get('etag') ?? '' } });
    assert.equal(again.status, 304);
    await (await fetch(`${brokerUrl}/healthz`)).text();
  });
  after(async () => {
    await broker?.close();
    await upstream?.close();
    await pg?.stop();
  });

  test('promtool check metrics passes on its /metrics', async (t) => {
    if (!need(t, PROMTOOL, 'promtool')) return;
    const res = await fetch(`${brokerUrl}/metrics`);
    assert.equal(res.status, 200);
    const text = await res.text();
    assert.match(text, /^codex_broker_token_served_total\{route="\/codex-auth",result="not_modified"\} 1$/m);
    assert.match(text, /^codex_broker_clients\{state="active"\} 1$/m);
    const r = promtool(['check', 'metrics'], text);
    assert.equal(r.code, 0, r.out);
    assert.equal(r.out.trim(), '', r.out);
  });

  test('a real Prometheus scrapes it, loads the alert rules and evaluates every alert and panel query', async (t) => {
    if (!need(t, PROMETHEUS, 'prometheus')) return;
    const started = Date.now();
    const dir = tmpDir();
    const promPort = await freePort();
    const api = `http://127.0.0.1:${promPort}`;
    const config = {
      global: { scrape_interval: '1s', evaluation_interval: '1s' },
      rule_files: [ALERTS],
      scrape_configs: [{ job_name: JOB, static_configs: [{ targets: [new URL(brokerUrl).host] }] }],
    };
    fs.writeFileSync(path.join(dir, 'prometheus.yml'), stringifyYaml(config));
    let log = '';
    const prom: ChildProcess = spawn(
      PROMETHEUS!,
      [`--config.file=${path.join(dir, 'prometheus.yml')}`, `--storage.tsdb.path=${path.join(dir, 'data')}`, `--web.listen-address=127.0.0.1:${promPort}`],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    prom.stdout!.on('data', (d: Buffer) => (log += d.toString()));
    prom.stderr!.on('data', (d: Buffer) => (log += d.toString()));
    const exited = new Promise<void>((resolve) => prom.on('exit', () => resolve()));

    const get = async <T>(p: string): Promise<T> => {
      const res = await fetch(`${api}${p}`);
      const body = (await res.json()) as { status: string; data: T; error?: string };
      assert.equal(body.status, 'success', `${p}: ${body.error ?? res.status}`);
      return body.data;
    };
    const until = async <T>(what: string, fn: () => Promise<T | undefined>, ms = 30_000): Promise<T> => {
      const deadline = Date.now() + ms;
      for (;;) {
        const v = await fn().catch(() => undefined);
        if (v !== undefined) return v;
        if (Date.now() > deadline || prom.exitCode !== null) assert.fail(`${what} within ${ms} ms; prometheus log:\n${log}`);
        await new Promise((r) => setTimeout(r, 200));
      }
    };
    const query = (q: string) => get<{ resultType: string; result: Array<{ metric: Record<string, string>; value: [number, string] }> }>(`/api/v1/query?query=${encodeURIComponent(q)}`);

    try {
      await until('prometheus ready', async () => ((await fetch(`${api}/-/ready`)).ok ? true : undefined));
      const target = await until('the broker target up', async () => {
        const d = await get<{ activeTargets: Array<{ health: string; labels: Record<string, string>; lastError: string }> }>('/api/v1/targets');
        return d.activeTargets.find((x) => x.labels['job'] === JOB && x.health === 'up');
      });
      assert.equal(target.lastError, '');
      const up = await query(`up{job="${JOB}"}`);
      assert.equal(up.result[0]?.value[1], '1');
      const expiry = await until('codex_broker_access_token_expiry_timestamp_seconds', async () => {
        const r = await query('codex_broker_access_token_expiry_timestamp_seconds');
        return r.result.length > 0 ? r.result : undefined;
      });
      assert.equal(Number(expiry[0]!.value[1]), seededExp, 'Prometheus sees the seeded token expiry');

      // Every rule loaded and evaluated without error.
      const groups = await until('every rule evaluated', async () => {
        const d = await get<{ groups: Array<{ rules: Array<{ name: string; health: string; lastError?: string; lastEvaluation: string }> }> }>('/api/v1/rules?type=alert');
        const all = d.groups.flatMap((g) => g.rules);
        return all.length === rules.length && all.every((r) => !r.lastEvaluation.startsWith('0001')) ? all : undefined;
      });
      for (const r of groups) assert.equal(r.health, 'ok', `${r.name}: ${r.lastError ?? ''}`);
      assert.deepEqual(groups.map((r) => r.name).sort(), rules.map((r) => r.alert).sort());

      // Each alert expression, queried directly.
      for (const r of rules) await query(r.expr);
      // Each dashboard query, with Grafana's variables filled in.
      const dashboard = JSON.parse(fs.readFileSync(DASHBOARD, 'utf8')) as { panels: Array<{ title: string; targets?: Array<{ expr: string }> }> };
      let panelQueries = 0;
      for (const p of dashboard.panels) {
        for (const q of p.targets ?? []) {
          await query(q.expr.replace(/\$__rate_interval|\$__interval|\$__range/g, '1m'));
          panelQueries++;
        }
      }
      // Live data behind the panels: the 304 ratio is 1/2 after one 200 and one 304.
      const ratio = await query(
        'sum(codex_broker_token_served_total{result="not_modified"}) / sum(codex_broker_token_served_total{result=~"ok|not_modified"})',
      );
      assert.equal(ratio.result[0]?.value[1], '0.5');

      // A healthy, freshly seeded broker raises no alert.
      const quiet = await get<{ alerts: Array<{ labels: Record<string, string>; state: string }> }>('/api/v1/alerts');
      assert.deepEqual(
        quiet.alerts.map((a) => `${a.labels['alertname']} ${a.state}`),
        [],
      );

      // End to end: the upstream rejects the refresh token, the broker latches, the alert fires.
      upstream!.fault({ kind: 'status', status: 401, body: { error: { message: 'invalidated', type: 'invalid_request_error', code: 'refresh_token_invalidated' } } });
      const report = await broker!.core.refresher.runCycle({ force: true, ignoreBackoff: true, waitForLock: true });
      assert.equal(broker!.core.refresher.state(), 'latched', JSON.stringify(report));
      const fired = await until('CodexBrokerCredentialLatched firing', async () => {
        const d = await get<{ alerts: Array<{ labels: Record<string, string>; annotations: Record<string, string>; state: string }> }>('/api/v1/alerts');
        return d.alerts.find((a) => a.labels['alertname'] === 'CodexBrokerCredentialLatched' && a.state === 'firing');
      });
      assert.equal(fired.labels['severity'], 'critical');
      assert.match(fired.annotations['description'] ?? '', /codex-auth-broker seed auth\.json/);
      t.diagnostic(`prometheus: ${rules.length} rules and ${panelQueries} panel queries evaluated; alert fired; ${Date.now() - started} ms`);
    } finally {
      prom.kill('SIGTERM');
      const kill = setTimeout(() => prom.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(kill);
    }
  });
});
