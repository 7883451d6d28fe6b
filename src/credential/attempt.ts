import { mergeRotation, type RotationResponse } from '../auth-json.js';
import { shortHash, type Snapshot } from '../credential.js';
import type { PoolClient } from '../db.js';
import { isDue } from '../due.js';
import { UpstreamError } from '../errors.js';
import type { Logger } from '../logger.js';
import type { CredentialMetrics } from '../metrics.js';
import type { SecretStore, StoredRow } from '../secret-store.js';
import type { RefreshFn } from '../upstream.js';
import type { LandResult, WriteBack } from '../writeback.js';
import type { CredentialHolder } from './holder.js';
import type { Latch, Ledger } from './ledger.js';

export interface AttemptContext {
  holder: CredentialHolder;
  ledger: Ledger;
  store: SecretStore;
  writeBack: WriteBack;
  refresh: RefreshFn;
  logger: Logger;
  metrics: CredentialMetrics;
  replicaId: string;
  marginSeconds: number;
  now: () => number;
}

export interface AttemptRequest {
  /** What was read before the lock: a different row under it means someone else acted. */
  before: Snapshot;
  force: boolean;
  ignoreBackoff: boolean;
  onlyIfOlderThanMs: number | undefined;
  reason: string;
  /** Consecutive failures this process knows of for this refresh token. */
  failures: number;
  /** Whether this process knows of a rotation within `ms` (last_refresh or its own). */
  rotatedWithin: (snap: Snapshot, ms: number | undefined) => boolean;
  /** The next transient backoff step for this many failures. */
  backoffMs: (failures: number, retryAfterMs: number | undefined) => number;
}

/** What an attempt under the lock came to. Only `rotated`, `refused` and `failed` POSTed. */
export type AttemptOutcome =
  | { kind: 'absent' }
  | { kind: 'unreadable' }
  /** Not due, within the floor, or rotated by someone else while we waited. */
  | { kind: 'fresh' }
  /** Another replica latched this refresh token. */
  | { kind: 'latched'; latch: Latch }
  /** Another replica's backoff step has not elapsed. */
  | { kind: 'backing_off'; notBefore: number; failures: number }
  /** The audit intent could not be written, so no POST. */
  | { kind: 'no_intent'; message: string; failures: number }
  | { kind: 'rotated'; at: number; landed: LandResult; plaintext: string; expectedRaw: Buffer; row: StoredRow | null }
  /** The upstream refused the token for good: latched. */
  | { kind: 'refused'; at: number; error: UpstreamError; latch: Latch; failures: number; durationMs: number }
  /** A transient failure: one more backoff step, shared. */
  | { kind: 'failed'; at: number; error: UpstreamError; notBefore: number; stepMs: number; failures: number };

/**
 * One refresh attempt, run while holding the credential's cross-replica lock: re-read,
 * re-check, consult the shared latch and backoff, record the intent, POST once, and make
 * the answer durable (journal, compare-and-set) before anything else. The upstream refresh
 * token is single-use: every early return here is a POST that would have been a reuse.
 */
export async function attemptRefresh(c: AttemptContext, db: PoolClient, r: AttemptRequest): Promise<AttemptOutcome> {
  // Re-read under the lock: another replica may have rotated between our read and the
  // lock, and POSTing the token we read first would be a reuse.
  const seq = c.holder.nextRead();
  const row = await c.store.read(c.ledger.secretKey, db);
  const snap = c.holder.adopt(row, seq);
  if (!row) return { kind: 'absent' };
  if (!snap || !snap.parsed.tokens.refresh_token) return c.holder.problems.document ? { kind: 'unreadable' } : { kind: 'absent' };
  const now = c.now();
  const changed = !snap.raw.equals(r.before.raw);
  // Someone rotated (or re-seeded) while we waited: that is the outcome we wanted.
  if (changed && (r.force || !isDue(snap.claims, now, c.marginSeconds))) return { kind: 'fresh' };
  if (!r.force && !isDue(snap.claims, now, c.marginSeconds)) return { kind: 'fresh' };
  if (r.force && r.rotatedWithin(snap, r.onlyIfOlderThanMs)) return { kind: 'fresh' };
  // The floor holds without last_refresh too (a document seeded without it, or one whose
  // last_refresh was edited back): the audit knows when a rotation last landed.
  if (r.force && r.onlyIfOlderThanMs !== undefined && (await c.ledger.rotatedWithin(db, r.onlyIfOlderThanMs))) return { kind: 'fresh' };
  const shared = await c.ledger.latch(db);
  if (shared && shared.refreshTokenSha === snap.refreshTokenSha) return { kind: 'latched', latch: shared };
  let failures = r.failures;
  if (!r.ignoreBackoff) {
    // Another replica's failed attempt counts here too: one POST per backoff step, fleet-wide.
    const step = await c.ledger.backoff(db);
    if (step && step.refreshTokenSha === snap.refreshTokenSha) {
      failures = Math.max(failures, step.failures);
      if (step.notBefore > now) return { kind: 'backing_off', notBefore: step.notBefore, failures };
    }
  }
  let eventId: number;
  try {
    eventId = await c.ledger.intent(db, { replicaId: c.replicaId, reason: r.reason, refreshTokenSha256: snap.refreshTokenSha });
  } catch (err) {
    return { kind: 'no_intent', message: (err as Error).message, failures };
  }
  const started = Date.now();
  const timer = c.metrics.upstreamTimer();
  let answer: RotationResponse;
  try {
    answer = await c.refresh(snap.parsed.tokens.refresh_token);
  } catch (err) {
    timer();
    const outcome = await failed(c, db, r, snap, err, failures + 1, started);
    const ue = outcome.error;
    await record(c, db, eventId, { outcome: outcome.kind === 'refused' ? 'permanent_failure' : 'transient_failure', status: ue.status, code: ue.upstreamCode, durationMs: Date.now() - started });
    return outcome;
  }
  timer();
  const at = c.now();
  const plaintext = JSON.stringify(mergeRotation(snap.parsed, answer, new Date(at)));
  // Durable before anything else: the upstream has already burned the old token.
  const landed = await c.writeBack.land(snap.raw, plaintext, at, db);
  let stored: StoredRow | null = null;
  if (landed === 'written') {
    await c.ledger.clearBackoff(db).catch(() => undefined);
    stored = await c.store.read(c.ledger.secretKey, db).catch(() => null);
  }
  await record(c, db, eventId, {
    outcome: landed === 'pending' ? 'rotated_writeback_pending' : 'rotated',
    status: 200,
    durationMs: Date.now() - started,
    newRefreshTokenSha8: answer.refresh_token ? shortHash(answer.refresh_token) : undefined,
  });
  return { kind: 'rotated', at, landed, plaintext, expectedRaw: snap.raw, row: stored };
}

async function failed(
  c: AttemptContext,
  db: PoolClient,
  r: AttemptRequest,
  snap: Snapshot,
  err: unknown,
  failures: number,
  started: number,
): Promise<Extract<AttemptOutcome, { kind: 'refused' | 'failed' }>> {
  const at = c.now();
  const error = err instanceof UpstreamError ? err : new UpstreamError('transient', `refresh failed: ${(err as Error).message}`);
  if (error.kind === 'permanent') {
    const latch: Latch = { refreshTokenSha: snap.refreshTokenSha, status: error.status, code: error.upstreamCode, at: new Date(at) };
    await c.ledger.setLatch(db, latch, c.replicaId).catch((werr: Error) =>
      c.logger.warn({ event: 'latch_not_shared', err: { message: werr.message } }, 'could not record the latch for other replicas'),
    );
    return { kind: 'refused', at, error, latch, failures, durationMs: Date.now() - started };
  }
  const stepMs = r.backoffMs(failures, error.retryAfterMs);
  await c.ledger.setBackoff(db, { refreshTokenSha: snap.refreshTokenSha, notBefore: at + stepMs, failures }, c.replicaId).catch((werr: Error) =>
    c.logger.warn({ event: 'backoff_not_shared', err: { message: werr.message } }, 'could not record the backoff step for other replicas'),
  );
  return { kind: 'failed', at, error, notBefore: at + stepMs, stepMs, failures };
}

async function record(c: AttemptContext, db: PoolClient, id: number, o: Parameters<Ledger['outcome']>[2]): Promise<void> {
  await c.ledger.outcome(db, id, o).catch((err: Error) =>
    c.logger.warn({ event: 'audit_outcome_lost', eventId: id, err: { message: err.message } }, 'could not record the outcome of a refresh in broker_refresh_events'),
  );
}
