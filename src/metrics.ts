import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

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
export function createMetrics(opts: { defaultMetrics?: boolean } = {}) {
  const registry = new Registry();
  if (opts.defaultMetrics !== false) {
    collectDefaultMetrics({ register: registry, prefix: 'codex_broker_' });
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
/**
 * A metric's labelled children, kept in nested maps keyed by the label values: prom-client
 * builds and hashes a key from a labels object on every inc()/observe(), which the serving
 * path would pay per request. Label values here come from bounded sets (methods, routes,
 * status codes, results), and the route strings are the same objects every time.
 */
export function labelled<C>(metric: { labels(...values: string[]): C }): (...values: Label[]) => C {
  const root = new Map<Label, unknown>();
  return (...values) => {
    let level = root;
    const last = values.length - 1;
    for (let i = 0; i < last; i++) {
      const v = values[i] as Label;
      let next = level.get(v) as Map<Label, unknown> | undefined;
      if (!next) {
        next = new Map();
        level.set(v, next);
      }
      level = next;
    }
    const leaf = values[last] as Label;
    let child = level.get(leaf) as C | undefined;
    if (child === undefined) {
      child = metric.labels(...values.map(String));
      level.set(leaf, child);
    }
    return child;
  };
}
