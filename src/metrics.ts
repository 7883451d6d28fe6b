import { createRequire } from 'node:module';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

const requireHere = createRequire(import.meta.url);
type DefaultCollector = (registry: Registry, config: { prefix: string; eventLoopMonitoringPrecision: number }) => void;

/**
 * prom-client's default process metrics. With `gcDuration: false` every one of them but
 * nodejs_gc_duration_seconds: that histogram is fed by a PerformanceObserver on 'gc', and
 * Node builds each GC's entry with deprecated accessors (new functions, maps and a Map per
 * collection), about 0.1 ms per collection and a few KB that outlive two scavenges, so
 * at tens of thousands of requests a second it costs about 2 % of the CPU and grows the
 * old generation until a full GC (docs/performance.md, "The GC histogram").
 * collectDefaultMetrics has no way to leave one out, so the others are registered one by
 * one, from the list prom-client itself keeps (a collector added upstream comes along).
 */
function registerDefaultMetrics(registry: Registry, prefix: string, gcDuration: boolean): void {
  if (gcDuration) {
    collectDefaultMetrics({ register: registry, prefix });
    return;
  }
  for (const name of collectDefaultMetrics.metricsList) {
    if (name === 'gc') continue;
    // The same configuration collectDefaultMetrics hands each collector.
    (requireHere(`prom-client/lib/metrics/${name}`) as DefaultCollector)(registry, { prefix, eventLoopMonitoringPrecision: 10 });
  }
}

export const CREDENTIAL_STATES = ['absent', 'invalid', 'fresh', 'due', 'expired', 'latched'] as const;
export type CredentialState = (typeof CREDENTIAL_STATES)[number];
export const CHECK_RESULTS = ['fresh', 'due', 'inert', 'latched', 'locked_elsewhere', 'read_error'] as const;
export type CheckResult = (typeof CHECK_RESULTS)[number];
export const ATTEMPT_OUTCOMES = ['rotated', 'permanent_failure', 'transient_failure'] as const;
export type AttemptOutcome = (typeof ATTEMPT_OUTCOMES)[number];

/**
 * Every metric of DESIGN.md, in one registry per app instance (two brokers in one test
 * process must not share counters). No per-client label: thousands of workspaces would
 * explode the series count.
 */
export function createMetrics(opts: { defaultMetrics?: boolean; gcDuration?: boolean } = {}) {
  const registry = new Registry();
  if (opts.defaultMetrics !== false) {
    registerDefaultMetrics(registry, 'codex_broker_', opts.gcDuration !== false);
    // Gauges named *_total break Prometheus conventions (promtool check metrics rejects them).
    for (const name of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total']) registry.removeSingleMetric(`codex_broker_${name}`);
  }
  const p = 'codex_broker_';
  const registers = [registry];
  // Ages are computed when scraped (they grow between polls): the usage monitors register here.
  const usageAgeCollectors = new Set<() => void>();
  const m = {
    registry,
    usageAgeCollectors,
    usageUsedPercent: new Gauge({
      name: `${p}usage_used_percent`,
      help: 'Percent of a usage window used, per credential and window (primary: 5 hours, secondary: weekly), as last fetched from /wham/usage.',
      labelNames: ['credential', 'window'],
      registers,
    }),
    usageResetAt: new Gauge({
      name: `${p}usage_reset_timestamp_seconds`,
      help: 'When a usage window resets (unix seconds), per credential and window.',
      labelNames: ['credential', 'window'],
      registers,
    }),
    usageSnapshotAge: new Gauge({
      name: `${p}usage_snapshot_age_seconds`,
      help: 'Seconds since the credential\'s usage was last fetched (since polling began, when it never succeeded).',
      labelNames: ['credential'],
      registers,
      collect() {
        for (const f of usageAgeCollectors) f();
      },
    }),
    refreshAttempts: new Counter({ name: `${p}refresh_attempts_total`, help: 'Upstream refresh POSTs by credential and outcome.', labelNames: ['credential', 'outcome'], registers }),
    refreshChecks: new Counter({ name: `${p}refresh_checks_total`, help: 'Refresh checks by credential and result.', labelNames: ['credential', 'result'], registers }),
    accessTokenExpiry: new Gauge({ name: `${p}access_token_expiry_timestamp_seconds`, help: 'exp of the held access token, per credential (0 when none).', labelNames: ['credential'], registers }),
    lastRotation: new Gauge({ name: `${p}last_rotation_timestamp_seconds`, help: 'When the credential was last rotated (its last_refresh; 0 when unknown).', labelNames: ['credential'], registers }),
    credentialState: new Gauge({ name: `${p}credential_state`, help: '1 for the current state of each credential, 0 for the others.', labelNames: ['credential', 'state'], registers }),
    upstreamDuration: new Histogram({
      name: `${p}upstream_request_duration_seconds`,
      help: 'Duration of upstream refresh POSTs, per credential.',
      labelNames: ['credential'],
      buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers,
    }),
    writebackPending: new Gauge({ name: `${p}writeback_pending`, help: '1 while a rotated credential is held in memory waiting to be written back.', labelNames: ['credential'], registers }),
    refreshLockHeld: new Gauge({ name: `${p}refresh_lock_held`, help: "1 while this replica holds a credential's cross-replica refresh lock.", labelNames: ['credential'], registers }),
    tokenServed: new Counter({ name: `${p}token_served_total`, help: 'Credentials served to workspaces by route and result.', labelNames: ['route', 'result'], registers }),
    tokenChecks: new Counter({
      name: `${p}token_checks_total`,
      help: 'Backend checks of the current access token before a forced refresh, by verdict (accepted, rejected, unknown).',
      labelNames: ['verdict'],
      registers,
    }),
    logins: new Counter({ name: `${p}logins_total`, help: 'Logins performed by the broker, by method (device, browser) and result (succeeded, failed, expired).', labelNames: ['method', 'result'], registers }),
    clients: new Gauge({ name: `${p}clients`, help: 'Workspace clients by state.', labelNames: ['state'], registers }),
    revocations: new Counter({ name: `${p}revocations_total`, help: 'Token revocations by source: client_logout (answered locally, never forwarded), admin (revoked upstream).', labelNames: ['source'], registers }),
    poolSwitches: new Counter({
      name: `${p}pool_switches_total`,
      help: 'Clients moved to another credential of their pool, by pool and reason (usage, latched, expired, unusable, removed, pool_changed).',
      labelNames: ['pool', 'reason'],
      registers,
    }),
    poolSwitchPercent: new Gauge({
      name: `${p}pool_switch_percent`,
      help: 'POOL_SWITCH_PERCENT: the used percent of a usage window at which clients move off a login (the usage alerts compare against it).',
      registers,
    }),
    poolAssignedClients: new Gauge({ name: `${p}pool_assigned_clients`, help: 'Clients assigned to each credential, by pool and credential.', labelNames: ['pool', 'credential'], registers }),
    buildInfo: new Gauge({ name: `${p}build_info`, help: 'Always 1, labelled by the running version and this replica.', labelNames: ['version', 'replica'], registers }),
    databaseUp: new Gauge({ name: `${p}database_up`, help: '1 while this replica is connected to the database (its change listener), 0 otherwise.', registers }),
    dbQueries: new Counter({ name: `${p}db_queries_total`, help: 'Queries sent to the database (the serving path sends none).', registers }),
    httpDuration: new Histogram({
      name: `${p}http_request_duration_seconds`,
      help: 'HTTP request duration by method, route and status code.',
      labelNames: ['method', 'route', 'status_code'],
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1],
      registers,
    }),
  };
  for (const v of ['accepted', 'rejected', 'unknown']) m.tokenChecks.inc({ verdict: v }, 0);
  for (const source of ['client_logout', 'admin']) m.revocations.inc({ source }, 0);
  return m;
}
export type BrokerMetrics = ReturnType<typeof createMetrics>;

/** One credential's series: a handful per login, never per client. */
export interface CredentialMetrics {
  attempt(outcome: AttemptOutcome): void;
  check(result: CheckResult): void;
  state(state: CredentialState): void;
  expiry(seconds: number): void;
  lastRotation(seconds: number): void;
  writebackPending(on: boolean): void;
  lockHeld(on: boolean): void;
  /** Starts timing an upstream POST; call the result when it answers. */
  upstreamTimer(): () => void;
  /** The credential was removed: drop its series, and ignore late writes (a reload still in flight would bring them back). */
  retire(): void;
}

/** The series of credential `name`, created at zero so dashboards and alerts see it at once. */
export function credentialMetrics(m: BrokerMetrics, name: string): CredentialMetrics {
  const credential = name;
  for (const outcome of ATTEMPT_OUTCOMES) m.refreshAttempts.inc({ credential, outcome }, 0);
  for (const result of CHECK_RESULTS) m.refreshChecks.inc({ credential, result }, 0);
  let retired = false;
  const state = (now: CredentialState) => {
    if (retired) return;
    for (const s of CREDENTIAL_STATES) m.credentialState.set({ credential, state: s }, s === now ? 1 : 0);
  };
  state('absent');
  const gauges = { expiry: m.accessTokenExpiry.labels({ credential }), last: m.lastRotation.labels({ credential }), pending: m.writebackPending.labels({ credential }), lock: m.refreshLockHeld.labels({ credential }) };
  for (const g of Object.values(gauges)) g.set(0);
  const upstream = m.upstreamDuration.labels({ credential });
  return {
    attempt: (outcome) => retired || m.refreshAttempts.inc({ credential, outcome }),
    check: (result) => retired || m.refreshChecks.inc({ credential, result }),
    state,
    expiry: (s) => retired || gauges.expiry.set(s),
    lastRotation: (s) => retired || gauges.last.set(s),
    writebackPending: (on) => retired || gauges.pending.set(on ? 1 : 0),
    lockHeld: (on) => retired || gauges.lock.set(on ? 1 : 0),
    upstreamTimer: () => (retired ? () => 0 : upstream.startTimer()),
    retire: () => {
      retired = true;
      dropCredentialMetrics(m, credential);
    },
  };
}

/** A credential was removed: its series go too (a gauge left behind would keep an alert firing). */
export function dropCredentialMetrics(m: BrokerMetrics, credential: string): void {
  for (const outcome of ATTEMPT_OUTCOMES) m.refreshAttempts.remove({ credential, outcome });
  for (const result of CHECK_RESULTS) m.refreshChecks.remove({ credential, result });
  for (const state of CREDENTIAL_STATES) m.credentialState.remove({ credential, state });
  for (const g of [m.accessTokenExpiry, m.lastRotation, m.writebackPending, m.refreshLockHeld, m.upstreamDuration]) g.remove({ credential });
}

type Label = string | number;

/** One labelled series as the serving path sees it: plain-number bookkeeping, handed to prom-client when scraped. */
interface Cell {
  flush(): void;
}

/** A counter series: inc() adds to a number; the scrape adds the sum to prom-client's child. */
export class CounterCell implements Cell {
  #n = 0;
  readonly #child: { inc(n: number): void };

  constructor(child: { inc(n: number): void }) {
    this.#child = child;
  }

  inc(): void {
    this.#n += 1;
  }

  flush(): void {
    if (this.#n === 0) return;
    const n = this.#n;
    this.#n = 0;
    this.#child.inc(n);
  }
}

/** prom-client's stored state of one histogram series (its hashMap entries). */
interface HistogramEntry {
  labels: Record<string, string>;
  bucketValues: Record<string, number>;
  sum: number;
  count: number;
}

/**
 * A histogram series: observe() counts into a plain array by bucket; the scrape adds the
 * counts, sum and count to prom-client's entry for these labels. prom-client has no bulk
 * observe, so this writes its entry (created by the public zero()); a test compares the
 * exposition with prom-client's own observe() so an upgrade that changes the entry's
 * shape fails there rather than in production.
 */
export class HistogramCell implements Cell {
  readonly #metric: Histogram<string>;
  readonly #labels: Record<string, string>;
  readonly #bounds: readonly number[];
  /** One per bucket, and one for values above the last (+Inf only). */
  readonly #counts: number[];
  #sum = 0;
  #count = 0;

  constructor(metric: Histogram<string>, labels: Record<string, string>) {
    this.#metric = metric;
    this.#labels = labels;
    this.#bounds = (metric as unknown as { upperBounds: number[] }).upperBounds;
    this.#counts = new Array<number>(this.#bounds.length + 1).fill(0);
  }

  observe(value: number): void {
    if (!Number.isFinite(value)) throw new TypeError(`Value is not a valid number: ${value}`);
    const bounds = this.#bounds;
    let i = 0;
    while (i < bounds.length && value > (bounds[i] as number)) i++;
    this.#counts[i] = (this.#counts[i] as number) + 1;
    this.#sum += value;
    this.#count += 1;
  }

  flush(): void {
    if (this.#count === 0) return;
    const entry = this.#entry();
    for (let i = 0; i < this.#bounds.length; i++) {
      const n = this.#counts[i] as number;
      if (n === 0) continue;
      const key = String(this.#bounds[i]);
      entry.bucketValues[key] = (entry.bucketValues[key] ?? 0) + n;
      this.#counts[i] = 0;
    }
    this.#counts[this.#bounds.length] = 0;
    entry.sum += this.#sum;
    entry.count += this.#count;
    this.#sum = 0;
    this.#count = 0;
  }

  #entry(): HistogramEntry {
    const find = () => Object.values((this.#metric as unknown as { hashMap: Record<string, HistogramEntry> }).hashMap).find((e) => e.labels === this.#labels);
    let entry = find();
    if (!entry) {
      this.#metric.zero(this.#labels);
      entry = find();
    }
    if (!entry) throw new Error("prom-client kept no series for a histogram's labels");
    return entry;
  }
}

/** Cells of each metric, flushed by its collect hook (prom-client calls it on every read: scrape, get()). */
const cellsOf = new WeakMap<object, Cell[]>();
function register<M extends Counter<string> | Histogram<string>>(metric: M, cell: Cell): void {
  let cells = cellsOf.get(metric);
  if (!cells) {
    const list: Cell[] = [];
    cells = list;
    cellsOf.set(metric, list);
    const m = metric as unknown as { collect?: (this: M) => unknown };
    const previous = m.collect;
    m.collect = function (this: M) {
      for (const c of list) c.flush();
      return previous?.call(this);
    };
  }
  cells.push(cell);
}

/**
 * A metric's series as cells, kept in nested maps keyed by the label values. The serving
 * path pays a few Map lookups and a number increment per request; prom-client's labels
 * object, label validation and hash are paid once per series, and its bookkeeping once per
 * scrape. Label values here come from bounded sets (methods, routes, status codes,
 * results), and the route strings are the same objects every time.
 */
export function labelled(metric: Counter<string>): (a: Label, b?: Label, c?: Label) => CounterCell;
export function labelled(metric: Histogram<string>): (a: Label, b?: Label, c?: Label) => HistogramCell;
export function labelled(metric: Counter<string> | Histogram<string>): (a: Label, b?: Label, c?: Label) => CounterCell | HistogramCell {
  type AnyCell = CounterCell | HistogramCell;
  const names = (metric as unknown as { labelNames: string[] }).labelNames;
  // Fixed arity, no rest array per call: the broker's serving metrics have two or three labels.
  if (names.length < 1 || names.length > 3) throw new Error('labelled() takes a metric with one to three labels');
  const add = (level: Map<Label, unknown>, key: Label, values: Label[]): AnyCell => {
    const labels: Record<string, string> = {};
    names.forEach((n, i) => (labels[n] = String(values[i])));
    const cell = metric instanceof Histogram ? new HistogramCell(metric, labels) : new CounterCell(metric.labels(labels));
    register(metric, cell);
    level.set(key, cell);
    return cell;
  };
  const below = (level: Map<Label, unknown>, key: Label): Map<Label, unknown> => {
    let next = level.get(key) as Map<Label, unknown> | undefined;
    if (!next) {
      next = new Map();
      level.set(key, next);
    }
    return next;
  };
  const root = new Map<Label, unknown>();
  const depth = names.length;
  return (a, b = '', c = '') => {
    if (depth === 1) return (root.get(a) as AnyCell | undefined) ?? add(root, a, [a]);
    const l1 = below(root, a);
    if (depth === 2) return (l1.get(b) as AnyCell | undefined) ?? add(l1, b, [a, b]);
    const l2 = below(l1, b);
    return (l2.get(c) as AnyCell | undefined) ?? add(l2, c, [a, b, c]);
  };
}
