import type { Pool } from '../db.js';
import type { UsageFetchResult } from './fetch.js';
import { storedUsage, type UsageSnapshot } from './parse.js';

/** Every replica LISTENs here and reloads the named credential's usage (payload: its secret key). */
export const USAGE_CHANNEL = 'codex_auth_usage_changed';

/** A credential's shared usage row, as read. Times are the database's clock. */
export interface UsageRow {
  secretKey: string;
  snapshot: UsageSnapshot | undefined;
  fetchedAtMs: number | undefined;
  /** Whether the last attempt succeeded (false: the snapshot is what an earlier one fetched). */
  ok: boolean;
  lastError: string | null;
  polledBy: string | null;
  createdAtMs: number;
  nextPollAtMs: number;
  /** The database's clock when this was read: ages are measured on one clock, not the replica's. */
  dbNowMs: number;
}

/**
 * Claim this interval's poll of one credential: true for exactly one caller per interval
 * across every replica. The row lock of the upsert serialises claimants; each re-checks
 * `next_poll_at <= now()` on the newest row, so the second finds it moved and gets nothing.
 * Returns the claim (its time, as the database's exact text: the guard for recordPoll), or
 * undefined when not claimed.
 */
export async function claimPoll(pool: Pool, secretKey: string, intervalMs: number, replicaId: string): Promise<string | undefined> {
  const r = await pool.query<{ at: string }>(
    `INSERT INTO broker_usage AS u (secret_key, next_poll_at, polled_by, last_attempt_at)
       VALUES ($1, now() + $2 * interval '1 millisecond', $3, now())
     ON CONFLICT (secret_key) DO UPDATE
       SET next_poll_at = EXCLUDED.next_poll_at, polled_by = EXCLUDED.polled_by, last_attempt_at = EXCLUDED.last_attempt_at
       WHERE u.next_poll_at <= now()
     RETURNING last_attempt_at::text AS at`,
    [secretKey, Math.round(intervalMs), replicaId],
  );
  return r.rows[0]?.at;
}

/**
 * Store a poll's outcome and NOTIFY in the same statement. A failure keeps the last good
 * snapshot. Only the claim it answers may write: a slow poll finishing after a newer
 * claim (another replica, the next interval) is dropped rather than overwrite newer facts.
 */
export async function recordPoll(pool: Pool, secretKey: string, claim: string, result: UsageFetchResult): Promise<boolean> {
  const r = await pool.query(
    `WITH up AS (
       UPDATE broker_usage
          SET snapshot = COALESCE($3::jsonb, snapshot),
              fetched_at = CASE WHEN $3::jsonb IS NULL THEN fetched_at ELSE now() END,
              ok = $4, last_error = $5
        WHERE secret_key = $1 AND last_attempt_at = $2::timestamptz
        RETURNING secret_key)
     SELECT pg_notify($6, secret_key) FROM up`,
    [secretKey, claim, result.ok ? JSON.stringify(result.snapshot) : null, result.ok, result.ok ? null : result.code, USAGE_CHANNEL],
  );
  return (r.rowCount ?? 0) > 0;
}

/** The stored usage of these credentials (absent keys: never polled). */
export async function readUsage(pool: Pool, secretKeys: string[]): Promise<Map<string, UsageRow>> {
  const r = await pool.query<{
    secret_key: string;
    snapshot: unknown;
    fetched_at: Date | null;
    ok: boolean;
    last_error: string | null;
    polled_by: string | null;
    created_at: Date;
    next_poll_at: Date;
    db_now: Date;
  }>(
    `SELECT secret_key, snapshot, fetched_at, ok, last_error, polled_by, created_at, next_poll_at, clock_timestamp() AS db_now
       FROM broker_usage WHERE secret_key = ANY($1::text[])`,
    [secretKeys],
  );
  return new Map(
    r.rows.map((row) => [
      row.secret_key,
      {
        secretKey: row.secret_key,
        snapshot: storedUsage(row.snapshot),
        fetchedAtMs: row.fetched_at?.getTime(),
        ok: row.ok,
        lastError: row.last_error,
        polledBy: row.polled_by,
        createdAtMs: row.created_at.getTime(),
        nextPollAtMs: row.next_poll_at.getTime(),
        dbNowMs: row.db_now.getTime(),
      },
    ]),
  );
}
