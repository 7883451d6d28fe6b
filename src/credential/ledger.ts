import { recordIntent, recordOutcome, rotatedWithin, unfinishedIntents, type RefreshEvent } from '../audit.js';
import type { Pool, PoolClient } from '../db.js';
import { clearBackoff, readBackoff, readLatch, writeBackoff, writeLatch, type Backoff, type Latch } from '../refresh-guards.js';

export type { Backoff, Latch };

export interface AttemptRecord {
  outcome: string;
  status?: number | undefined;
  code?: string | undefined;
  durationMs: number;
  newRefreshTokenSha8?: string | undefined;
}

/**
 * What one credential's refresh attempts leave for every replica: the latch, the backoff
 * step, and the audit (an intent before each POST, its outcome after). A seam, so the
 * attempt reads as the protocol and a test can see or fail each write.
 */
export interface Ledger {
  readonly secretKey: string;
  latch(db: PoolClient): Promise<Latch | undefined>;
  setLatch(db: PoolClient, latch: Latch, replicaId: string): Promise<void>;
  backoff(db: PoolClient): Promise<Backoff | undefined>;
  setBackoff(db: PoolClient, step: Backoff, replicaId: string): Promise<void>;
  clearBackoff(db: PoolClient): Promise<void>;
  /** Written before the POST: a store that cannot take it gets no POST. */
  intent(db: PoolClient, e: { replicaId: string; reason: string; refreshTokenSha256: string }): Promise<number>;
  outcome(db: PoolClient, id: number, o: AttemptRecord): Promise<void>;
  /** Whether a rotation landed within `ms`, by the database's clock (the shim's floor without last_refresh). */
  rotatedWithin(db: PoolClient, ms: number): Promise<boolean>;
  /** Intents older than `olderThanMs` with no outcome: a crash between a POST and its record. */
  unfinished(olderThanMs: number): Promise<RefreshEvent[]>;
}

/** The ledger in the broker's tables (broker_latch, broker_backoff, broker_refresh_events), keyed by the credential's secret key. */
export function databaseLedger(pool: Pool, secretKey: string): Ledger {
  return {
    secretKey,
    latch: (db) => readLatch(db, secretKey),
    setLatch: (db, latch, replicaId) => writeLatch(db, secretKey, latch, replicaId),
    backoff: (db) => readBackoff(db, secretKey),
    setBackoff: (db, step, replicaId) => writeBackoff(db, secretKey, step, replicaId),
    clearBackoff: (db) => clearBackoff(db, secretKey),
    intent: (db, e) => recordIntent(db, { secretKey, ...e }),
    outcome: (db, id, o) => recordOutcome(db, id, o),
    rotatedWithin: (db, ms) => rotatedWithin(db, secretKey, ms),
    unfinished: (olderThanMs) => unfinishedIntents(pool, secretKey, olderThanMs),
  };
}
