import type { Pool, PoolClient } from './db.js';

/** refresh: an upstream refresh POST; seed: a seed, stored or refused; revoke: an operator's upstream revocation. */
export type EventKind = 'refresh' | 'seed' | 'revoke' | 'login';

export interface RefreshEvent {
  id: number;
  kind: EventKind;
  /** Who asked, for seeds and revocations (cli, admin_api, admin); null for refreshes. */
  source: string | null;
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

/**
 * Written before the POST: if it cannot be written, the POST does not happen. The full
 * SHA-256 is what lets a later seed of the same (now spent) token be refused.
 */
export async function recordIntent(
  db: Db,
  e: { secretKey: string; replicaId: string; reason: string; refreshTokenSha256: string; kind?: 'refresh' | 'revoke'; source?: string },
): Promise<number> {
  const r = await db.query<{ id: string }>(
    `INSERT INTO broker_refresh_events (secret_key, replica_id, reason, refresh_token_sha8, refresh_token_sha256, kind, source)
     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id`,
    [e.secretKey, e.replicaId, e.reason, e.refreshTokenSha256.slice(0, 8), e.refreshTokenSha256, e.kind ?? 'refresh', e.source ?? null],
  );
  return Number(r.rows[0]?.id);
}

/**
 * A seed, stored or refused, written complete (with its outcome) in one statement: a seed
 * row never looks like a crashed POST. Only 8-hex prefixes: the seeded token, and what the
 * credential holds afterwards (null when nothing was stored).
 */
export async function recordSeed(
  db: Db,
  e: { secretKey: string; replicaId: string; source: string; outcome: string; refreshTokenSha8: string; storedRefreshTokenSha8: string | undefined },
): Promise<void> {
  await db.query(
    `INSERT INTO broker_refresh_events (secret_key, replica_id, reason, kind, source, refresh_token_sha8, finished_at, outcome, new_refresh_token_sha8)
     VALUES ($1, $2, 'seed', 'seed', $3, $4, now(), $5, $6)`,
    [e.secretKey, e.replicaId, e.source, e.refreshTokenSha8, e.outcome, e.storedRefreshTokenSha8 ?? null],
  );
}

/** Outcomes after which the upstream may still honour the token: the broker keeps (or keeps retrying) it. */
const NOT_SPENT = ['transient_failure', 'revoke_failed'];

/**
 * When the broker last sent this refresh token upstream in a way that used it up (a
 * rotation, a refusal, a revocation, or a POST whose outcome a crash lost), for any key.
 * Seeds are not spending: only rows the broker POSTed. Rows from before the full hash
 * was kept match by their 8-hex prefix.
 */
export async function spentAt(db: Db, refreshTokenSha256: string): Promise<{ at: Date; kind: 'refresh' | 'revoke'; outcome: string | null } | undefined> {
  const r = await db.query<{ started_at: Date; kind: 'refresh' | 'revoke'; outcome: string | null }>(
    `SELECT started_at, kind, outcome FROM broker_refresh_events
     WHERE kind IN ('refresh', 'revoke')
       AND (refresh_token_sha256 = $1 OR (refresh_token_sha256 IS NULL AND refresh_token_sha8 = $2))
       AND (outcome IS NULL OR NOT (outcome = ANY($3::text[])))
     ORDER BY id DESC LIMIT 1`,
    [refreshTokenSha256, refreshTokenSha256.slice(0, 8), NOT_SPENT],
  );
  const row = r.rows[0];
  return row ? { at: row.started_at, kind: row.kind, outcome: row.outcome } : undefined;
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
/** A login performed by the broker, stored or refused: always written with its outcome (kind 'login', never a POST the crash check or the spent-token guard reads). */
export async function recordLogin(
  db: Db,
  e: { secretKey: string; replicaId: string; source: string; refreshTokenSha8: string; outcome: string; durationMs: number; stored: boolean },
): Promise<void> {
  await db.query(
    `INSERT INTO broker_refresh_events (secret_key, replica_id, reason, kind, source, refresh_token_sha8, finished_at, outcome, duration_ms, new_refresh_token_sha8)
     VALUES ($1, $2, 'login', 'login', $3, $4, now(), $5, $6, $7)`,
    [e.secretKey, e.replicaId, e.source, e.refreshTokenSha8, e.outcome, Math.round(e.durationMs), e.stored ? e.refreshTokenSha8 : null],
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
       WHERE secret_key = $1 AND kind = 'refresh' AND outcome LIKE 'rotated%' AND finished_at > now() - make_interval(secs => $2)) AS recent`,
    [secretKey, withinMs / 1000],
  );
  return r.rows[0]?.recent === true;
}

const COLUMNS = `id, kind, source, replica_id, reason, refresh_token_sha8, started_at, finished_at, outcome, upstream_status, upstream_code, duration_ms, new_refresh_token_sha8`;

function toEvent(r: Record<string, unknown>): RefreshEvent {
  const iso = (d: unknown) => (d instanceof Date ? d.toISOString() : null);
  return {
    id: Number(r['id']),
    kind: String(r['kind']) as EventKind,
    source: (r['source'] as string | null) ?? null,
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
 * Refresh intents with no outcome, older than any POST could still be running: each is a
 * crash between the POST and its record, where the upstream may have rotated the token.
 * Seeds are written with their outcome and revocations cannot rotate anything: neither counts.
 */
export async function unfinishedIntents(db: Db, secretKey: string, olderThanMs: number): Promise<RefreshEvent[]> {
  const r = await db.query(
    `SELECT ${COLUMNS} FROM broker_refresh_events
     WHERE secret_key = $1 AND kind = 'refresh' AND finished_at IS NULL AND acknowledged_at IS NULL AND started_at < now() - make_interval(secs => $2)
     ORDER BY id DESC LIMIT 20`,
    [secretKey, olderThanMs / 1000],
  );
  return r.rows.map(toEvent);
}
