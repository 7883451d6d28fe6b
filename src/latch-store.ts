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
