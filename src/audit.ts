import type { Pool, PoolClient } from './db.js';

export interface RefreshEvent {
  id: number;
  replicaId: string;
  reason: string;
  refreshTokenSha8: string;
  startedAt: string;
  finishedAt: string | null;
  outcome: string | null;
  upstreamStatus: number | null;
  upstreamCode: string | null;
  durationMs: number | null;
  newRefreshTokenSha8: string | null;
}

type Db = Pool | PoolClient;

/** Written before the POST: if it cannot be written, the POST does not happen. */
export async function recordIntent(db: Db, e: { secretKey: string; replicaId: string; reason: string; refreshTokenSha8: string }): Promise<number> {
  const r = await db.query<{ id: string }>(
    'INSERT INTO broker_refresh_events (secret_key, replica_id, reason, refresh_token_sha8) VALUES ($1, $2, $3, $4) RETURNING id',
    [e.secretKey, e.replicaId, e.reason, e.refreshTokenSha8],
  );
  return Number(r.rows[0]?.id);
}

export async function recordOutcome(
  db: Db,
  id: number,
  o: { outcome: string; status?: number | undefined; code?: string | undefined; durationMs: number; newRefreshTokenSha8?: string | undefined },
): Promise<void> {
  await db.query(
    `UPDATE broker_refresh_events SET finished_at = now(), outcome = $2, upstream_status = $3, upstream_code = $4,
       duration_ms = $5, new_refresh_token_sha8 = $6 WHERE id = $1`,
    [id, o.outcome, o.status ?? null, o.code ?? null, Math.round(o.durationMs), o.newRefreshTokenSha8 ?? null],
  );
}

/**
 * A login performed by the broker, recorded finished (an intent without an outcome would
 * read as a crashed POST). `refresh_token_sha8` is the token the login brought: the one
 * the next rotation will send.
 */
export async function recordLogin(db: Db, e: { secretKey: string; replicaId: string; refreshTokenSha8: string; outcome: string; durationMs: number }): Promise<void> {
  await db.query(
    `INSERT INTO broker_refresh_events (secret_key, replica_id, reason, refresh_token_sha8, finished_at, outcome, duration_ms, new_refresh_token_sha8)
     VALUES ($1, $2, 'login', $3, now(), $4, $5, $3)`,
    [e.secretKey, e.replicaId, e.refreshTokenSha8, e.outcome, Math.round(e.durationMs)],
  );
}

/**
 * Whether a rotation of this credential landed within the last `withinMs`, by the
 * database's clock (every replica's audit rows share it). This is the forced-refresh floor
 * that holds even when the stored document carries no `last_refresh`.
 */
export async function rotatedWithin(db: Db, secretKey: string, withinMs: number): Promise<boolean> {
  const r = await db.query<{ recent: boolean }>(
    `SELECT EXISTS (SELECT 1 FROM broker_refresh_events
       WHERE secret_key = $1 AND outcome LIKE 'rotated%' AND finished_at > now() - make_interval(secs => $2)) AS recent`,
    [secretKey, withinMs / 1000],
  );
  return r.rows[0]?.recent === true;
}

const COLUMNS = `id, replica_id, reason, refresh_token_sha8, started_at, finished_at, outcome, upstream_status, upstream_code, duration_ms, new_refresh_token_sha8`;

function toEvent(r: Record<string, unknown>): RefreshEvent {
  const iso = (d: unknown) => (d instanceof Date ? d.toISOString() : null);
  return {
    id: Number(r['id']),
    replicaId: String(r['replica_id']),
    reason: String(r['reason']),
    refreshTokenSha8: String(r['refresh_token_sha8']),
    startedAt: iso(r['started_at']) ?? '',
    finishedAt: iso(r['finished_at']),
    outcome: (r['outcome'] as string | null) ?? null,
    upstreamStatus: (r['upstream_status'] as number | null) ?? null,
    upstreamCode: (r['upstream_code'] as string | null) ?? null,
    durationMs: (r['duration_ms'] as number | null) ?? null,
    newRefreshTokenSha8: (r['new_refresh_token_sha8'] as string | null) ?? null,
  };
}

export async function latestEvents(db: Db, secretKey: string, limit: number): Promise<RefreshEvent[]> {
  const r = await db.query(`SELECT ${COLUMNS} FROM broker_refresh_events WHERE secret_key = $1 ORDER BY id DESC LIMIT $2`, [secretKey, limit]);
  return r.rows.map(toEvent);
}

/**
 * Intents with no outcome, older than any POST could still be running: each is a crash
 * between the POST and its record, where the upstream may have rotated the token.
 */
export async function unfinishedIntents(db: Db, secretKey: string, olderThanMs: number): Promise<RefreshEvent[]> {
  const r = await db.query(
    `SELECT ${COLUMNS} FROM broker_refresh_events
     WHERE secret_key = $1 AND finished_at IS NULL AND acknowledged_at IS NULL AND started_at < now() - make_interval(secs => $2)
     ORDER BY id DESC LIMIT 20`,
    [secretKey, olderThanMs / 1000],
  );
  return r.rows.map(toEvent);
}
