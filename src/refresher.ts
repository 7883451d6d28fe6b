import type { RefreshEvent } from './audit.js';
import type { Snapshot } from './credential.js';
import { attemptRefresh, type AttemptOutcome } from './credential/attempt.js';
import { describeLogin } from './credential/describe.js';
import { CredentialHolder, type SanitisedError } from './credential/holder.js';
import { databaseLedger, type Latch, type Ledger } from './credential/ledger.js';
import { isDue } from './due.js';
import type { RotationJournal } from './journal.js';
import { isoFromMs } from './lib/time.js';
import type { Logger } from './logger.js';
import type { AttemptOutcome as AttemptMetric, CheckResult, CredentialMetrics, CredentialState } from './metrics.js';
import { RefreshLoop } from './refresh-loop.js';
import type { SecretStore, StoredRow } from './secret-store.js';
import type { RefreshFn } from './upstream.js';
import { WriteBack, type Pending, type RecoveryResult } from './writeback.js';

export type { SanitisedError };

export interface RefresherOptions {
  /** The credential's name: its metrics label and what its log lines carry. */
  name: string;
  store: SecretStore;
  secretKey: string;
  refresh: RefreshFn;
  logger: Logger;
  metrics: CredentialMetrics;
  replicaId: string;
  marginSeconds: number;
  checkIntervalMs: number;
  permanentBackoffMs: number;
  transientBaseMs: number;
  now?: () => number;
  random?: () => number;
  /** Local encrypted copy of a rotation until its write-back lands (absent: no key to encrypt it with). */
  journal?: RotationJournal | undefined;
  /** Where latch, backoff and audit live (default: the broker's tables). */
  ledger?: Ledger;
  /** The credential's state changed (fresh, due, expired, latched...): pools re-check assignments. */
  onStateChange?: (state: CredentialState) => void;
}

export interface CycleReport {
  check: CheckResult;
  attempt?: AttemptMetric;
  /** The cycle ran while another was in flight and shared its result. */
  joined?: boolean;
  /** Due, but a transient backoff step has not elapsed: no POST. */
  backoff?: boolean;
  error?: SanitisedError;
}

export interface CycleOptions {
  /** Refresh even if the token is fresh (admin refresh, shim forced refresh). */
  force?: boolean;
  /** Wait for another replica's lock instead of giving up (callers that need the outcome). */
  waitForLock?: boolean;
  /** Ignore a transient backoff step (an operator's explicit refresh). */
  ignoreBackoff?: boolean;
  /** With force: only when the stored credential's last rotation is older than this (the shim's floor). */
  onlyIfOlderThanMs?: number;
  reason?: string;
}

/**
 * The one owner of a credential in this process. Single-flight inside the process (one
 * in-flight promise that concurrent callers share) and across replicas (an advisory lock,
 * a re-read under it, and a compare-and-set write: see credential/attempt.ts), because the
 * upstream refresh token is single-use: a second POST of the same token logs the whole
 * fleet out. What it holds is in credential/holder.ts; what it shares, in the ledger.
 */
export class Refresher {
  readonly #o: Required<Omit<RefresherOptions, 'now' | 'random' | 'journal' | 'ledger' | 'onStateChange'>>;
  readonly #onStateChange: ((state: CredentialState) => void) | undefined;
  #publishedState: CredentialState | undefined;
  readonly #holder: CredentialHolder;
  readonly #ledger: Ledger;
  readonly #writeBack: WriteBack;
  readonly #loop: RefreshLoop;
  readonly #now: () => number;
  readonly #random: () => number;
  #inflight: Promise<CycleReport> | undefined;
  #inflightForced = false;
  #consecutiveFailures = 0;
  #nextAttemptAt = 0;
  #lastOutcome: { outcome: AttemptMetric | CheckResult; at: number } | undefined;
  #lastLoggedProblem: string | undefined;
  #lastRotationAt: number | undefined;
  #lockHeld = false;
  #unfinished: RefreshEvent[] = [];

  constructor(opts: RefresherOptions) {
    const { now, random, journal, ledger, onStateChange, ...rest } = opts;
    this.#o = rest;
    this.#onStateChange = onStateChange;
    this.#now = now ?? Date.now;
    this.#random = random ?? Math.random;
    this.#ledger = ledger ?? databaseLedger(rest.store.pool, rest.secretKey);
    this.#holder = new CredentialHolder({
      decrypt: (row) => rest.store.decrypt(row),
      marginSeconds: rest.marginSeconds,
      now: this.#now,
      onChange: () => this.#publish(),
      onNewRefreshToken: () => {
        this.#consecutiveFailures = 0;
        this.#nextAttemptAt = 0;
        this.#holder.problems.refresh = undefined;
      },
      onUnreadable: (code, message) => this.#note('read_error', code, message, 'error'),
    });
    this.#writeBack = new WriteBack({ store: rest.store, secretKey: rest.secretKey, logger: rest.logger, metrics: rest.metrics, journal });
    this.#loop = new RefreshLoop({ run: () => this.#scheduledCycle(), inflight: () => this.#inflight, now: this.#now });
  }

  // ---- reading ---------------------------------------------------------------

  /** The credential to serve: a pending rotation first (it is the only valid one), else the last read. */
  current(): Snapshot | undefined {
    return this.#holder.current();
  }

  get holder(): CredentialHolder {
    return this.#holder;
  }

  get latched(): boolean {
    return this.#holder.latched;
  }

  get latch(): Latch | undefined {
    return this.#holder.latch;
  }

  get pending(): Pending | undefined {
    return this.#writeBack.pending;
  }

  get replicaId(): string {
    return this.#o.replicaId;
  }

  get name(): string {
    return this.#o.name;
  }

  get secretKey(): string {
    return this.#o.secretKey;
  }

  get lockHeld(): boolean {
    return this.#lockHeld;
  }

  get readError(): SanitisedError | undefined {
    return this.#holder.problems.document;
  }

  /** At `now` when given (a caller that already read the clock), else by this refresher's clock. */
  state(now?: number): CredentialState {
    return this.#holder.state(now);
  }

  /** What /status, the CLI and the admin API say about this credential. No secret. */
  status() {
    const s = this.current();
    const iso = isoFromMs;
    const { latch, ...login } = describeLogin(s, this.#holder.latch);
    return {
      state: this.state(),
      secretKey: this.#o.secretKey,
      ...login,
      lastRotationAt: iso(s?.lastRefreshMs ?? this.#lastRotationAt),
      lastOutcome: this.#lastOutcome ? { outcome: this.#lastOutcome.outcome, at: iso(this.#lastOutcome.at) } : null,
      lastError: this.#holder.lastError ?? null,
      consecutiveFailures: this.#consecutiveFailures,
      nextCheckAt: iso(this.#loop.nextCheckAt),
      nextAttemptNotBefore: this.#nextAttemptAt > this.#now() ? iso(this.#nextAttemptAt) : null,
      latch,
      writebackPending: this.#writeBack.pending !== undefined,
      unfinishedRefreshes: this.#unfinished.map((e) => ({ id: e.id, replicaId: e.replicaId, startedAt: e.startedAt })),
      replicaId: this.#o.replicaId,
      refreshLockHeld: this.#lockHeld,
    };
  }

  /**
   * Re-read the stored credential and adopt it (NOTIFY from another replica, a re-seed,
   * start-up). Reads are sequenced so an older read never overwrites a newer one.
   */
  async reload(): Promise<void> {
    await this.#read();
  }

  /** Read and adopt; a store that cannot be read is recorded (and rethrown). */
  async #read(): Promise<{ row: StoredRow | null; snap: Snapshot | undefined }> {
    const seq = this.#holder.nextRead();
    let row: StoredRow | null;
    try {
      row = await this.#o.store.read(this.#o.secretKey);
    } catch (err) {
      this.#holder.problems.store = this.#problem('read_error', 'STORE_UNAVAILABLE', `could not read the credential: ${(err as Error).message}`);
      throw err;
    }
    return { row, snap: this.#holder.adopt(row, seq) };
  }

  /**
   * Adopt a latch written outside a refresh cycle (an operator's upstream revocation), so
   * /status and the shim say so at once instead of at the next due check.
   */
  adoptLatch(latch: Latch): void {
    this.#lastOutcome = { outcome: 'latched', at: this.#now() };
    this.#holder.problems.refresh = { code: 'revoked', message: 'the login was revoked upstream at an operator\'s request; log in again and seed a new login', at: latch.at.toISOString() };
    this.#holder.setLatch(latch);
  }

  #publish(): void {
    const m = this.#o.metrics;
    const snap = this.current();
    m.expiry(snap?.claims.exp ?? 0);
    m.lastRotation(snap?.lastRefreshMs !== undefined ? snap.lastRefreshMs / 1000 : 0);
    const state = this.state();
    m.state(state);
    if (state !== this.#publishedState) {
      this.#publishedState = state;
      this.#onStateChange?.(state);
    }
  }

  // ---- the cycle -------------------------------------------------------------

  /**
   * One refresh check. Concurrent callers share the cycle in flight: a caller that
   * waited sees the rotated token instead of POSTing again.
   */
  runCycle(opts: CycleOptions = {}): Promise<CycleReport> {
    if (this.#inflight) {
      // A forced caller does not settle for a plain check's answer: it queues behind it,
      // and the forced callers queued together share one forced cycle.
      if (opts.force && !this.#inflightForced) return this.#inflight.then(() => this.runCycle(opts));
      return this.#inflight.then((r) => ({ ...r, joined: true }));
    }
    const p = this.#cycle(opts).finally(() => {
      this.#inflight = undefined;
      this.#inflightForced = false;
    });
    this.#inflight = p;
    this.#inflightForced = opts.force === true;
    return p;
  }

  get inflight(): Promise<CycleReport> | undefined {
    return this.#inflight;
  }

  /** The checks that need no lock, then the attempt under it. */
  async #cycle(opts: CycleOptions): Promise<CycleReport> {
    if (this.#writeBack.pending) {
      const flushed = await this.#writeBack.flush();
      if (!flushed.resolved) {
        this.#problem('writeback_pending', 'STORE_UNAVAILABLE', `write-back still failing: ${flushed.error.message}`);
        return this.#check('due', { error: this.#holder.problems.refresh });
      }
      await this.reload().catch(() => undefined);
    }
    let read: { row: StoredRow | null; snap: Snapshot | undefined };
    try {
      read = await this.#read();
    } catch {
      return this.#check('read_error', { error: this.#holder.problems.store });
    }
    const { row, snap } = read;
    const documentProblem = this.#holder.problems.document;
    if (!row || (!snap && !documentProblem)) {
      this.#note('inert', 'credential_absent', `no credential stored under ${this.#o.secretKey}: nothing to refresh; log in with \`npx codex-auth-broker login\` or seed one with \`npx codex-auth-broker seed auth.json\``, 'info');
      return this.#check('inert');
    }
    if (!snap || !snap.parsed.tokens.refresh_token) {
      // Unreadable or without a refresh token: never POST a guess.
      if (snap) this.#holder.problems.document = this.#problem('read_error', 'AUTH_JSON_INVALID', 'stored credential has no refresh_token; re-seed it');
      return this.#check('read_error', { error: this.#holder.problems.document });
    }
    if (this.latched) return this.#check('latched', { error: this.#holder.problems.refresh });
    const now = this.#now();
    if (!opts.force && !isDue(snap.claims, now, this.#o.marginSeconds)) return this.#check('fresh');
    if (opts.force && this.#rotatedWithin(snap, opts.onlyIfOlderThanMs)) return this.#check('fresh');
    this.#o.metrics.check('due');
    if (!opts.ignoreBackoff && now < this.#nextAttemptAt) return this.#backingOff();
    return this.#underLock(opts.waitForLock === true, snap, opts);
  }

  async #underLock(wait: boolean, before: Snapshot, opts: CycleOptions): Promise<CycleReport> {
    let outcome: AttemptOutcome | undefined;
    try {
      const r = await this.#o.store.withLock(this.#o.secretKey, wait, async (db) => {
        this.#lockHeld = true;
        this.#o.metrics.lockHeld(true);
        try {
          return await attemptRefresh(this.#attemptContext(), db, {
            before,
            force: opts.force === true,
            ignoreBackoff: opts.ignoreBackoff === true,
            onlyIfOlderThanMs: opts.onlyIfOlderThanMs,
            reason: opts.reason ?? 'due',
            failures: this.#consecutiveFailures,
            rotatedWithin: (snap, ms) => this.#rotatedWithin(snap, ms),
            backoffMs: (failures, retryAfterMs) => this.#backoffMs(failures, retryAfterMs),
          });
        } finally {
          this.#lockHeld = false;
          this.#o.metrics.lockHeld(false);
        }
      });
      if (!r) return this.#check('locked_elsewhere');
      outcome = r.value;
    } catch (err) {
      this.#holder.problems.store = this.#problem('read_error', 'STORE_UNAVAILABLE', `refresh lock unavailable: ${(err as Error).message}`);
      return this.#check('read_error', { error: this.#holder.problems.store });
    }
    return this.#apply(outcome, opts);
  }

  #attemptContext() {
    const o = this.#o;
    return { holder: this.#holder, ledger: this.#ledger, store: o.store, writeBack: this.#writeBack, refresh: o.refresh, logger: o.logger, metrics: o.metrics, replicaId: o.replicaId, marginSeconds: o.marginSeconds, now: this.#now };
  }

  /** What this process learns from an attempt: counters, backoff, latch, logs, the report. */
  async #apply(a: AttemptOutcome, opts: CycleOptions): Promise<CycleReport> {
    switch (a.kind) {
      case 'absent':
        return this.#check('inert');
      case 'unreadable':
        return this.#check('read_error', { error: this.#holder.problems.document });
      case 'fresh':
        return this.#check('fresh');
      case 'latched':
        this.#holder.setLatch(a.latch);
        return this.#check('latched');
      case 'backing_off':
        this.#nextAttemptAt = Math.max(this.#nextAttemptAt, a.notBefore);
        this.#consecutiveFailures = Math.max(this.#consecutiveFailures, a.failures);
        return this.#backingOff();
      case 'no_intent':
        this.#consecutiveFailures = Math.max(this.#consecutiveFailures, a.failures);
        this.#holder.problems.store = this.#problem('read_error', 'STORE_UNAVAILABLE', `could not record the refresh intent, not refreshing: ${a.message}`);
        return this.#check('read_error', { error: this.#holder.problems.store });
      case 'rotated':
        return this.#rotated(a, opts.reason);
      case 'refused':
      case 'failed':
        return this.#failed(a);
    }
  }

  #backingOff(): CycleReport {
    const error = this.#holder.problems.refresh;
    return { check: 'due', backoff: true, ...(error ? { error } : {}) };
  }

  /** Known here, without a query: the stored last_refresh, or a rotation this process made. */
  #rotatedWithin(snap: Snapshot, ms: number | undefined): boolean {
    if (ms === undefined) return false;
    const last = Math.max(snap.lastRefreshMs ?? -Infinity, this.#lastRotationAt ?? -Infinity);
    return this.#now() - last < ms;
  }

  /**
   * Whether a forced refresh may still happen under the floor, as far as this process
   * knows (the shim asks before it spends a backend call verifying the caller's token).
   */
  forcedRefreshBlocked(floorMs: number): boolean {
    const snap = this.current();
    return snap !== undefined && this.#rotatedWithin(snap, floorMs);
  }

  #check(result: CheckResult, extra: Omit<CycleReport, 'check'> = {}): CycleReport {
    this.#o.metrics.check(result);
    // Healthy again: the next problem, even one seen before, deserves a log line.
    if (result === 'fresh') this.#lastLoggedProblem = undefined;
    if (result !== 'fresh' || this.#lastOutcome === undefined) this.#lastOutcome = { outcome: result, at: this.#now() };
    this.#publish();
    return { check: result, ...extra };
  }

  /** At start, before any refresh and before the first reload: finish a write-back a crash left in the journal. */
  recoverJournal(): Promise<RecoveryResult> {
    return this.#writeBack.recover();
  }

  /**
   * Report refresh intents that never got an outcome: a crash between an upstream POST
   * and its record, where the upstream may have rotated a token nobody kept.
   */
  async checkUnfinished(olderThanMs = 120_000): Promise<RefreshEvent[]> {
    const found = await this.#ledger.unfinished(olderThanMs);
    this.#unfinished = found;
    for (const e of found) {
      this.#o.logger.error(
        { event: 'unfinished_refresh', eventId: e.id, replicaId: e.replicaId, startedAt: e.startedAt, refreshTokenSha8: e.refreshTokenSha8 },
        'a refresh POST has no recorded outcome (a crash mid-refresh?): if the broker now gets refresh_token_reused, log in again and re-seed; see GET /admin/events',
      );
    }
    return found;
  }

  async #rotated(a: Extract<AttemptOutcome, { kind: 'rotated' }>, reason: string | undefined): Promise<CycleReport> {
    this.#o.metrics.attempt('rotated');
    this.#consecutiveFailures = 0;
    this.#nextAttemptAt = 0;
    this.#holder.problems.refresh = undefined;
    this.#lastRotationAt = a.at;
    this.#lastOutcome = { outcome: 'rotated', at: a.at };
    if (a.landed === 'pending') {
      this.#holder.holdPending(a.expectedRaw, a.plaintext);
      return { check: 'due', attempt: 'rotated' };
    }
    if (a.landed === 'discarded') {
      await this.reload().catch(() => undefined);
      return { check: 'due', attempt: 'rotated' };
    }
    const fresh = this.#holder.adoptWritten(a.plaintext, a.row);
    this.#o.logger.info(
      {
        event: 'rotation',
        secretKey: this.#o.secretKey,
        reason: reason ?? 'due',
        accessTokenExpiresAt: fresh?.claims.exp !== undefined ? new Date(fresh.claims.exp * 1000).toISOString() : null,
      },
      'rotated the credential',
    );
    this.#lastLoggedProblem = undefined;
    return { check: 'due', attempt: 'rotated' };
  }

  #failed(a: Extract<AttemptOutcome, { kind: 'refused' | 'failed' }>): CycleReport {
    const ue = a.error;
    const e: SanitisedError = {
      code: a.kind === 'refused' ? 'upstream_permanent' : 'upstream_transient',
      message: ue.message,
      status: ue.status,
      upstreamCode: ue.upstreamCode,
      at: new Date(a.at).toISOString(),
    };
    this.#holder.problems.refresh = e;
    this.#consecutiveFailures = a.failures;
    if (a.kind === 'refused') {
      this.#o.metrics.attempt('permanent_failure');
      this.#lastOutcome = { outcome: 'permanent_failure', at: a.at };
      this.#o.logger.error(
        { event: 'latched', secretKey: this.#o.secretKey, status: ue.status, upstreamCode: ue.upstreamCode, durationMs: a.durationMs },
        `the upstream refused the refresh token for good (${ue.upstreamCode ?? ue.status}); it will not be sent again. Log in again: \`npx codex-auth-broker login${this.#o.name === 'default' ? '' : ` --credential ${this.#o.name}`}\` (or seed a fresh auth.json, or POST /admin/credentials/${this.#o.name}/login)`,
      );
      this.#holder.setLatch(a.latch);
      return { check: 'due', attempt: 'permanent_failure', error: e };
    }
    this.#nextAttemptAt = a.notBefore;
    this.#o.metrics.attempt('transient_failure');
    this.#lastOutcome = { outcome: 'transient_failure', at: a.at };
    this.#o.logger.warn(
      { event: 'transient_failure', secretKey: this.#o.secretKey, status: ue.status, upstreamCode: ue.upstreamCode, retryInMs: a.stepMs, consecutiveFailures: a.failures },
      `refresh failed, will retry: ${ue.message}`,
    );
    this.#publish();
    return { check: 'due', attempt: 'transient_failure', error: e };
  }

  /**
   * Exponential from the base up to the check interval, with jitter so replicas and
   * restarts do not retry in step, and never sooner than the upstream's Retry-After.
   */
  #backoffMs(failures: number, retryAfterMs: number | undefined): number {
    const floor = Math.min(this.#o.transientBaseMs, this.#o.checkIntervalMs);
    const ceiling = Math.max(floor, this.#o.checkIntervalMs);
    const exp = Math.min(ceiling, floor * 2 ** Math.min(failures - 1, 30));
    const jittered = Math.min(ceiling, Math.max(floor, exp * (0.8 + 0.4 * this.#random())));
    return Math.max(jittered, retryAfterMs ?? 0);
  }

  // ---- logging helpers -------------------------------------------------------

  /** Log a problem once per distinct kind; repeats go to debug so a 3 a.m. log stays readable. */
  #problem(event: string, code: string, message: string): SanitisedError {
    const e = { code, message, at: new Date(this.#now()).toISOString() };
    this.#note(event, code, message, 'error');
    return e;
  }

  #note(event: string, kind: string, message: string, level: 'info' | 'error'): void {
    const key = `${event}:${kind}`;
    if (this.#lastLoggedProblem === key) {
      this.#o.logger.debug({ event, code: kind, secretKey: this.#o.secretKey }, message);
      return;
    }
    this.#lastLoggedProblem = key;
    this.#o.logger[level]({ event, code: kind, secretKey: this.#o.secretKey }, message);
  }

  // ---- the loop --------------------------------------------------------------

  start(): void {
    this.#loop.start();
  }

  /** Trigger a check soon (a NOTIFY that may have changed due-ness or cleared a latch). */
  poke(): void {
    this.#loop.poke();
  }

  /** The credential was removed: its metric series go, and stay gone. */
  retire(): void {
    this.#o.metrics.retire();
  }

  /** Stop scheduling and wait (bounded) for a refresh in flight to finish its write-back. */
  stop(timeoutMs: number): Promise<boolean> {
    return this.#loop.stop(timeoutMs);
  }

  /** A scheduled check, and how long until the next: sooner while a write-back is pending or a backoff step ends. */
  async #scheduledCycle(): Promise<number> {
    let report: CycleReport | undefined;
    try {
      report = await this.runCycle({ reason: 'scheduled' });
    } catch (err) {
      this.#problem('cycle_failed', 'INTERNAL', `refresh cycle failed unexpectedly: ${(err as Error).message}`);
    }
    const now = this.#now();
    if (report?.check === 'latched' || report?.attempt === 'permanent_failure') return this.#o.permanentBackoffMs;
    if (this.#writeBack.pending) return Math.min(this.#o.checkIntervalMs, this.#o.transientBaseMs);
    if (this.#nextAttemptAt > now) return Math.min(this.#o.checkIntervalMs, this.#nextAttemptAt - now);
    return this.#o.checkIntervalMs;
  }
}
