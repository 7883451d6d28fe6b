import type { PoolClient } from './db.js';

export interface Latch {
  refreshTokenSha: string;
  status: number | undefined;
  code: string | undefined;
  at: Date;
}

export async function readLatch(db: PoolClient, secretKey: string): Promise<Latch | undefined> {
  const r = await db.query<{ refresh_token_sha256: string; upstream_status: number | null; upstream_code: string | null; latched_at: Date }>(
    'SELECT refresh_token_sha256, upstream_status, upstream_code, latched_at FROM broker_latch WHERE secret_key = $1',
    [secretKey],
  );
  const row = r.rows[0];
  return row ? { refreshTokenSha: row.refresh_token_sha256, status: row.upstream_status ?? undefined, code: row.upstream_code ?? undefined, at: row.latched_at } : undefined;
}

export async function writeLatch(db: PoolClient, secretKey: string, latch: Latch, replicaId: string): Promise<void> {
  await db.query(
    `INSERT INTO broker_latch (secret_key, refresh_token_sha256, upstream_status, upstream_code, latched_by, latched_at)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (secret_key) DO UPDATE SET refresh_token_sha256 = EXCLUDED.refresh_token_sha256,
       upstream_status = EXCLUDED.upstream_status, upstream_code = EXCLUDED.upstream_code,
       latched_by = EXCLUDED.latched_by, latched_at = EXCLUDED.latched_at`,
    [secretKey, latch.refreshTokenSha, latch.status ?? null, latch.code ?? null, replicaId, latch.at],
  );
}

export interface Backoff {
  refreshTokenSha: string;
  notBefore: number;
  failures: number;
}

export async function readBackoff(db: PoolClient, secretKey: string): Promise<Backoff | undefined> {
  const r = await db.query<{ refresh_token_sha256: string; not_before: Date; consecutive_failures: number }>(
    'SELECT refresh_token_sha256, not_before, consecutive_failures FROM broker_backoff WHERE secret_key = $1',
    [secretKey],
  );
  const row = r.rows[0];
  return row ? { refreshTokenSha: row.refresh_token_sha256, notBefore: row.not_before.getTime(), failures: row.consecutive_failures } : undefined;
}

export async function writeBackoff(db: PoolClient, secretKey: string, b: Backoff, replicaId: string): Promise<void> {
  await db.query(
    `INSERT INTO broker_backoff (secret_key, refresh_token_sha256, not_before, consecutive_failures, updated_by)
     VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (secret_key) DO UPDATE SET refresh_token_sha256 = EXCLUDED.refresh_token_sha256,
       not_before = EXCLUDED.not_before, consecutive_failures = EXCLUDED.consecutive_failures,
       updated_by = EXCLUDED.updated_by, updated_at = now()`,
    [secretKey, b.refreshTokenSha, new Date(b.notBefore), b.failures, replicaId],
  );
}

export async function clearBackoff(db: PoolClient, secretKey: string): Promise<void> {
  await db.query('DELETE FROM broker_backoff WHERE secret_key = $1', [secretKey]);
}

/** A new login starts clean: no latch (it named the old token) for this credential. */
export async function clearLatch(db: PoolClient, secretKey: string): Promise<void> {
  await db.query('DELETE FROM broker_latch WHERE secret_key = $1', [secretKey]);
}
