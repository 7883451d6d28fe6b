import { mergeRotation, type RotationResponse } from './auth-json.js';
import { recordIntent, recordOutcome, rotatedWithin, unfinishedIntents, type RefreshEvent } from './audit.js';
import { buildSnapshot, shortHash, stateOf, type Snapshot } from './credential.js';
import type { PoolClient } from './db.js';
import { isDue } from './due.js';
import { isoFromMs, isoFromSeconds } from './lib/time.js';
import { BrokerError, UpstreamError } from './errors.js';
import { clearBackoff, readBackoff, readLatch, writeBackoff, writeLatch, type Latch } from './refresh-guards.js';
import type { RotationJournal } from './journal.js';
import { RefreshLoop } from './refresh-loop.js';
import type { Logger } from './logger.js';
import { setCredentialState, type AttemptOutcome, type BrokerMetrics, type CheckResult, type CredentialState } from './metrics.js';
import type { SecretStore, StoredRow } from './secret-store.js';
import type { RefreshFn } from './upstream.js';
import { WriteBack, type Pending, type RecoveryResult } from './writeback.js';

export interface RefresherOptions {
  store: SecretStore;
  secretKey: string;
  refresh: RefreshFn;
  logger: Logger;
  metrics: BrokerMetrics;
  replicaId: string;
  marginSeconds: number;
  checkIntervalMs: number;
  permanentBackoffMs: number;
  transientBaseMs: number;
  now?: () => number;
  random?: () => number;
  /** Local encrypted copy of a rotation until its write-back lands (absent: no key to encrypt it with). */
  journal?: RotationJournal | undefined;
}

export interface SanitisedError {
  code: string;
  message: string;
  status?: number | undefined;
  upstreamCode?: string | undefined;
  at: string;
}

export interface CycleReport {
  check: CheckResult;
  attempt?: AttemptOutcome;
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
 * The one owner of the credential in this process. Single-flight inside the process
 * (one in-flight promise that concurrent callers share) and across replicas (an advisory
 * lock, a re-read under it, and a compare-and-set write), because the upstream refresh
 * token is single-use: a second POST of the same token logs the whole fleet out.
 */
export class Refresher {
  readonly #o: Required<Omit<RefresherOptions, 'now' | 'random' | 'journal'>>;
  readonly #writeBack: WriteBack;
  readonly #loop: RefreshLoop;
  readonly #now: () => number;
  readonly #random: () => number;
  #snapshot: Snapshot | undefined;
  #appliedSeq = 0;
  #readSeq = 0;
  #inflight: Promise<CycleReport> | undefined;
  #inflightForced = false;
  #latch: Latch | undefined;
  #consecutiveFailures = 0;
  #nextAttemptAt = 0;
  #lastOutcome: { outcome: AttemptOutcome | CheckResult; at: number } | undefined;
  #lastError: SanitisedError | undefined;
  #lastLoggedProblem: string | undefined;
  #lastRotationAt: number | undefined;
  #lockHeld = false;
  #readError: SanitisedError | undefined;
  /** The store could not be read or locked; cleared by the next successful read. */
  #storeError: SanitisedError | undefined;
  #unfinished: RefreshEvent[] = [];

  constructor(opts: RefresherOptions) {
    const { now, random, journal, ...rest } = opts;
    this.#o = rest;
    this.#now = now ?? Date.now;
    this.#random = random ?? Math.random;
    this.#writeBack = new WriteBack({ store: rest.store, secretKey: rest.secretKey, logger: rest.logger, metrics: rest.metrics, journal });
    this.#loop = new RefreshLoop({ run: () => this.#scheduledCycle(), inflight: () => this.#inflight, now: this.#now });
  }

  // ---- reading ---------------------------------------------------------------

  /** The credential to serve: a pending rotation first (it is the only valid one), else the last read. */
  current(): Snapshot | undefined {
    return this.#snapshot;
  }

  get latched(): boolean {
    return this.#latch !== undefined && this.#snapshot !== undefined && this.#latch.refreshTokenSha === this.#snapshot.refreshTokenSha;
  }

  get pending(): Pending | undefined {
    return this.#writeBack.pending;
  }

  get replicaId(): string {
    return this.#o.replicaId;
  }

  get lockHeld(): boolean {
    return this.#lockHeld;
  }

  get readError(): SanitisedError | undefined {
    return this.#readError;
  }

  state(): CredentialState {
    if (!this.#snapshot && this.#readError) return 'invalid';
    return stateOf(this.#snapshot, this.latched, this.#now(), this.#o.marginSeconds);
  }

  status() {
    const s = this.#snapshot;
    const iso = isoFromMs;
    return {
      state: this.state(),
      secretKey: this.#o.secretKey,
      accountId: s?.account.accountId ?? null,
      planType: s?.account.planType ?? null,
      accessTokenExpiresAt: isoFromSeconds(s?.claims.exp),
      lastRotationAt: iso(s?.lastRefreshMs ?? this.#lastRotationAt),
      lastOutcome: this.#lastOutcome ? { outcome: this.#lastOutcome.outcome, at: iso(this.#lastOutcome.at) } : null,
      lastError: this.#storeError ?? this.#lastError ?? this.#readError ?? null,
      consecutiveFailures: this.#consecutiveFailures,
      nextCheckAt: iso(this.#loop.nextCheckAt),
      nextAttemptNotBefore: this.#nextAttemptAt > this.#now() ? iso(this.#nextAttemptAt) : null,
      latch: this.latched && this.#latch ? { upstreamStatus: this.#latch.status ?? null, upstreamCode: this.#latch.code ?? null, at: this.#latch.at.toISOString() } : null,
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
    const seq = ++this.#readSeq;
    let row: StoredRow | null;
    try {
      row = await this.#o.store.read(this.#o.secretKey);
    } catch (err) {
      this.#storeError = this.#problem('read_error', 'STORE_UNAVAILABLE', `could not read the credential: ${(err as Error).message}`);
      throw err;
    }
    this.#adoptRow(row, seq);
  }

  #adoptRow(row: StoredRow | null, seq: number): Snapshot | undefined {
    if (seq < this.#appliedSeq) return this.#snapshot;
    this.#appliedSeq = seq;
    this.#storeError = undefined;
    const pending = this.#writeBack.pending;
    // A rotation the store does not hold yet is the only valid token; a row that still
    // holds what the pending write expects is simply older.
    if (pending && row && row.raw.equals(pending.expectedRaw)) return this.#snapshot;
    if (!row) {
      this.#setSnapshot(undefined);
      this.#readError = undefined;
      return undefined;
    }
    if (this.#snapshot && row.raw.equals(this.#snapshot.raw)) return this.#snapshot;
    let plaintext: string;
    try {
      plaintext = this.#o.store.decrypt(row);
    } catch (err) {
      const code = err instanceof BrokerError ? err.code : 'DECRYPT_FAILED';
      this.#setSnapshot(undefined);
      this.#readError = this.#problem('read_error', code, (err as Error).message);
      return undefined;
    }
    if (plaintext.trim() === '') {
      this.#setSnapshot(undefined);
      this.#readError = undefined;
      return undefined;
    }
    try {
      const snap = buildSnapshot(row.raw, plaintext);
      this.#readError = undefined;
      if (this.#snapshot && snap.refreshTokenSha !== this.#snapshot.refreshTokenSha) this.#newRefreshToken();
      this.#setSnapshot(snap);
      return snap;
    } catch (err) {
      this.#setSnapshot(undefined);
      this.#readError = this.#problem('read_error', 'AUTH_JSON_INVALID', `stored credential is unusable: ${(err as Error).message}`);
      return undefined;
    }
  }

  /**
   * Adopt a latch written outside a refresh cycle (an operator's upstream revocation), so
   * /status and the shim say so at once instead of at the next due check.
   */
  adoptLatch(latch: Latch): void {
    this.#latch = latch;
    this.#lastOutcome = { outcome: 'latched', at: this.#now() };
    this.#lastError = { code: 'revoked', message: 'the login was revoked upstream at an operator\'s request; log in again and seed a new login', at: latch.at.toISOString() };
    this.#publishState();
  }

  /** A different refresh token (rotated elsewhere, or re-seeded): old failures no longer apply. */
  #newRefreshToken(): void {
    this.#consecutiveFailures = 0;
    this.#nextAttemptAt = 0;
    this.#lastError = undefined;
  }

  #setSnapshot(snap: Snapshot | undefined): void {
    this.#snapshot = snap;
    const m = this.#o.metrics;
    m.accessTokenExpiry.set(snap?.claims.exp ?? 0);
    m.lastRotation.set(snap?.lastRefreshMs !== undefined ? snap.lastRefreshMs / 1000 : 0);
    this.#publishState();
  }

  #publishState(): void {
    setCredentialState(this.#o.metrics, this.state());
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

  async #cycle(opts: CycleOptions): Promise<CycleReport> {
    if (this.#writeBack.pending) {
      const flushed = await this.#writeBack.flush();
      if (!flushed.resolved) {
        this.#problem('writeback_pending', 'STORE_UNAVAILABLE', `write-back still failing: ${flushed.error.message}`);
        return this.#check('due', { error: this.#lastError });
      }
      await this.reload().catch(() => undefined);
    }
    const seq = ++this.#readSeq;
    let row: StoredRow | null;
    try {
      row = await this.#o.store.read(this.#o.secretKey);
    } catch (err) {
      const e = this.#problem('read_error', 'STORE_UNAVAILABLE', `could not read the credential: ${(err as Error).message}`);
      this.#storeError = e;
      return this.#check('read_error', { error: e });
    }
    const snap = this.#adoptRow(row, seq);
    if (!row || (!snap && !this.#readError)) {
      this.#note('inert', 'credential_absent', `no credential stored under ${this.#o.secretKey}: nothing to refresh; log in with \`npx codex-auth-broker login\` or seed one with \`npx codex-auth-broker seed auth.json\``, 'info');
      return this.#check('inert');
    }
    if (!snap || !snap.parsed.tokens.refresh_token) {
      // Unreadable or without a refresh token: never POST a guess.
      if (snap) this.#readError = this.#problem('read_error', 'AUTH_JSON_INVALID', 'stored credential has no refresh_token; re-seed it');
      return this.#check('read_error', { error: this.#readError });
    }
    if (this.latched) return this.#check('latched', { error: this.#lastError });
    const now = this.#now();
    if (!opts.force && !isDue(snap.claims, now, this.#o.marginSeconds)) return this.#check('fresh');
    if (opts.force && this.#rotatedWithin(snap, now, opts.onlyIfOlderThanMs)) return this.#check('fresh');
    this.#o.metrics.refreshChecks.inc({ result: 'due' });
    if (!opts.ignoreBackoff && now < this.#nextAttemptAt) {
      return { check: 'due', backoff: true, ...(this.#lastError ? { error: this.#lastError } : {}) };
    }
    const locked = await this.#withLock(opts.waitForLock === true, (db) => this.#refreshUnderLock(db, snap, opts));
    if (!locked) return this.#check('locked_elsewhere');
    return locked;
  }

  /** Known here, without a query: the stored last_refresh, or a rotation this process made. */
  #rotatedWithin(snap: Snapshot, now: number, ms: number | undefined): boolean {
    if (ms === undefined) return false;
    const last = Math.max(snap.lastRefreshMs ?? -Infinity, this.#lastRotationAt ?? -Infinity);
    return now - last < ms;
  }

  /**
   * Whether a forced refresh may still happen under the floor, as far as this process
   * knows (the shim asks before it spends a backend call verifying the caller's token).
   */
  forcedRefreshBlocked(floorMs: number): boolean {
    const snap = this.#snapshot;
    return snap !== undefined && this.#rotatedWithin(snap, this.#now(), floorMs);
  }

  #check(result: CheckResult, extra: Omit<CycleReport, 'check'> = {}): CycleReport {
    this.#o.metrics.refreshChecks.inc({ result });
    // Healthy again: the next problem, even one seen before, deserves a log line.
    if (result === 'fresh') this.#lastLoggedProblem = undefined;
    if (result !== 'fresh' || this.#lastOutcome === undefined) this.#lastOutcome = { outcome: result, at: this.#now() };
    this.#publishState();
    return { check: result, ...extra };
  }

  async #withLock(wait: boolean, fn: (db: PoolClient) => Promise<CycleReport>): Promise<CycleReport | undefined> {
    try {
      const r = await this.#o.store.withLock(this.#o.secretKey, wait, async (db) => {
        this.#lockHeld = true;
        this.#o.metrics.refreshLockHeld.set(1);
        try {
          return await fn(db);
        } finally {
          this.#lockHeld = false;
          this.#o.metrics.refreshLockHeld.set(0);
        }
      });
      return r?.value;
    } catch (err) {
      const e = this.#problem('read_error', 'STORE_UNAVAILABLE', `refresh lock unavailable: ${(err as Error).message}`);
      this.#storeError = e;
      return this.#check('read_error', { error: e });
    }
  }

  async #refreshUnderLock(db: PoolClient, before: Snapshot, opts: CycleOptions): Promise<CycleReport> {
    // Re-read under the lock: another replica may have rotated between our read and
    // the lock, and POSTing the token we read first would be a reuse.
    const seq = ++this.#readSeq;
    const row = await this.#o.store.read(this.#o.secretKey, db);
    const snap = this.#adoptRow(row, seq);
    if (!row) return this.#check('inert');
    if (!snap || !snap.parsed.tokens.refresh_token) return this.#check(this.#readError ? 'read_error' : 'inert', { error: this.#readError });
    const now = this.#now();
    const changed = !snap.raw.equals(before.raw);
    if (changed && (opts.force || !isDue(snap.claims, now, this.#o.marginSeconds))) {
      // Someone rotated (or re-seeded) while we waited: that is the outcome we wanted.
      return this.#check('fresh');
    }
    if (!opts.force && !isDue(snap.claims, now, this.#o.marginSeconds)) return this.#check('fresh');
    if (opts.force && this.#rotatedWithin(snap, now, opts.onlyIfOlderThanMs)) return this.#check('fresh');
    // The floor holds without last_refresh too (a document seeded without it, or one
    // whose last_refresh was edited back): the audit knows when a rotation last landed.
    if (opts.force && opts.onlyIfOlderThanMs !== undefined && (await rotatedWithin(db, this.#o.secretKey, opts.onlyIfOlderThanMs))) {
      return this.#check('fresh');
    }
    const shared = await readLatch(db, this.#o.secretKey);
    if (shared && shared.refreshTokenSha === snap.refreshTokenSha) {
      this.#latch = shared;
      this.#publishState();
      return this.#check('latched');
    }
    if (!opts.ignoreBackoff) {
      // Another replica's failed attempt counts here too: one POST per backoff step, fleet-wide.
      const step = await readBackoff(db, this.#o.secretKey);
      if (step && step.refreshTokenSha === snap.refreshTokenSha && step.notBefore > now) {
        this.#nextAttemptAt = Math.max(this.#nextAttemptAt, step.notBefore);
        this.#consecutiveFailures = Math.max(this.#consecutiveFailures, step.failures);
        return { check: 'due', backoff: true, ...(this.#lastError ? { error: this.#lastError } : {}) };
      }
      if (step && step.refreshTokenSha === snap.refreshTokenSha) this.#consecutiveFailures = Math.max(this.#consecutiveFailures, step.failures);
    }
    const refreshToken = snap.parsed.tokens.refresh_token;
    // The audit intent goes in before the POST; a store that cannot take it gets no POST.
    let eventId: number;
    try {
      eventId = await recordIntent(db, { secretKey: this.#o.secretKey, replicaId: this.#o.replicaId, reason: opts.reason ?? 'due', refreshTokenSha256: snap.refreshTokenSha });
    } catch (err) {
      this.#storeError = this.#problem('read_error', 'STORE_UNAVAILABLE', `could not record the refresh intent, not refreshing: ${(err as Error).message}`);
      return this.#check('read_error', { error: this.#storeError });
    }
    const started = Date.now();
    const timer = this.#o.metrics.upstreamDuration.startTimer();
    let answer: RotationResponse;
    try {
      answer = await this.#o.refresh(refreshToken);
    } catch (err) {
      timer();
      const report = await this.#failed(db, snap, err, started);
      const ue = err instanceof UpstreamError ? err : undefined;
      await this.#audit(db, eventId, { outcome: report.attempt ?? 'transient_failure', status: ue?.status, code: ue?.upstreamCode, durationMs: Date.now() - started });
      return report;
    }
    timer();
    const report = await this.#rotated(db, snap, answer, opts.reason);
    await this.#audit(db, eventId, {
      outcome: this.#writeBack.pending ? 'rotated_writeback_pending' : 'rotated',
      status: 200,
      durationMs: Date.now() - started,
      newRefreshTokenSha8: answer.refresh_token ? shortHash(answer.refresh_token) : undefined,
    });
    return report;
  }

  async #audit(db: PoolClient, id: number, o: Parameters<typeof recordOutcome>[2]): Promise<void> {
    await recordOutcome(db, id, o).catch((err: Error) =>
      this.#o.logger.warn({ event: 'audit_outcome_lost', eventId: id, err: { message: err.message } }, 'could not record the outcome of a refresh in broker_refresh_events'),
    );
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
    const found = await unfinishedIntents(this.#o.store.pool, this.#o.secretKey, olderThanMs);
    this.#unfinished = found;
    for (const e of found) {
      this.#o.logger.error(
        { event: 'unfinished_refresh', eventId: e.id, replicaId: e.replicaId, startedAt: e.startedAt, refreshTokenSha8: e.refreshTokenSha8 },
        'a refresh POST has no recorded outcome (a crash mid-refresh?): if the broker now gets refresh_token_reused, log in again and re-seed; see GET /admin/events',
      );
    }
    return found;
  }

  async #rotated(db: PoolClient, snap: Snapshot, answer: RotationResponse, reason: string | undefined): Promise<CycleReport> {
    const now = this.#now();
    const merged = mergeRotation(snap.parsed, answer, new Date(now));
    const plaintext = JSON.stringify(merged);
    this.#o.metrics.refreshAttempts.inc({ outcome: 'rotated' });
    this.#consecutiveFailures = 0;
    this.#nextAttemptAt = 0;
    this.#lastError = undefined;
    this.#lastRotationAt = now;
    this.#lastOutcome = { outcome: 'rotated', at: now };
    // Durable before anything else: the upstream has already burned the old token.
    const landed = await this.#writeBack.land(snap.raw, plaintext, now, db);
    if (landed === 'pending') {
      this.#applyLocal(snap.raw, plaintext);
      return { check: 'due', attempt: 'rotated' };
    }
    if (landed === 'discarded') {
      await this.reload().catch(() => undefined);
      return { check: 'due', attempt: 'rotated' };
    }
    await clearBackoff(db, this.#o.secretKey).catch(() => undefined);
    const fresh = this.#applyLocal(undefined, plaintext, await this.#o.store.read(this.#o.secretKey, db).catch(() => null));
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

  /** Adopt what we just wrote (or hold pending) without waiting for our own NOTIFY. */
  #applyLocal(expectedRaw: Buffer | undefined, plaintext: string, row?: StoredRow | null): Snapshot | undefined {
    const seq = ++this.#readSeq;
    this.#appliedSeq = seq;
    const raw = row ? row.raw : Buffer.concat([Buffer.from('pending:'), expectedRaw ?? Buffer.alloc(0)]);
    try {
      const snap = buildSnapshot(raw, plaintext);
      this.#setSnapshot(snap);
      return snap;
    } catch {
      return undefined;
    }
  }

  async #failed(db: PoolClient, snap: Snapshot, err: unknown, started: number): Promise<CycleReport> {
    const now = this.#now();
    const ue = err instanceof UpstreamError ? err : new UpstreamError('transient', `refresh failed: ${(err as Error).message}`);
    const e: SanitisedError = {
      code: ue.kind === 'permanent' ? 'upstream_permanent' : 'upstream_transient',
      message: ue.message,
      status: ue.status,
      upstreamCode: ue.upstreamCode,
      at: new Date(now).toISOString(),
    };
    this.#lastError = e;
    this.#consecutiveFailures += 1;
    if (ue.kind === 'permanent') {
      this.#latch = { refreshTokenSha: snap.refreshTokenSha, status: ue.status, code: ue.upstreamCode, at: new Date(now) };
      await writeLatch(db, this.#o.secretKey, this.#latch, this.#o.replicaId).catch((werr: Error) =>
        this.#o.logger.warn({ event: 'latch_not_shared', err: { message: werr.message } }, 'could not record the latch for other replicas'),
      );
      this.#o.metrics.refreshAttempts.inc({ outcome: 'permanent_failure' });
      this.#lastOutcome = { outcome: 'permanent_failure', at: now };
      this.#o.logger.error(
        { event: 'latched', secretKey: this.#o.secretKey, status: ue.status, upstreamCode: ue.upstreamCode, durationMs: now - started },
        `the upstream refused the refresh token for good (${ue.upstreamCode ?? ue.status}); it will not be sent again. Log in again: \`npx codex-auth-broker login\` (or seed a fresh auth.json, or POST /admin/credentials/default/login)`,
      );
      this.#publishState();
      return { check: 'due', attempt: 'permanent_failure', error: e };
    }
    const step = this.#backoffMs(this.#consecutiveFailures, ue.retryAfterMs);
    this.#nextAttemptAt = now + step;
    await writeBackoff(db, this.#o.secretKey, { refreshTokenSha: snap.refreshTokenSha, notBefore: now + step, failures: this.#consecutiveFailures }, this.#o.replicaId).catch(
      (werr: Error) => this.#o.logger.warn({ event: 'backoff_not_shared', err: { message: werr.message } }, 'could not record the backoff step for other replicas'),
    );
    this.#o.metrics.refreshAttempts.inc({ outcome: 'transient_failure' });
    this.#lastOutcome = { outcome: 'transient_failure', at: now };
    this.#o.logger.warn(
      { event: 'transient_failure', secretKey: this.#o.secretKey, status: ue.status, upstreamCode: ue.upstreamCode, retryInMs: step, consecutiveFailures: this.#consecutiveFailures },
      `refresh failed, will retry: ${ue.message}`,
    );
    this.#publishState();
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
