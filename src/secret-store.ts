import type { Pool, PoolClient } from './db.js';
import { open, seal } from './lib/secret-crypto.js';

export const CHANGE_CHANNEL = 'codex_auth_changed';

export interface StoredRow {
  /** The row's bytes exactly as stored: the compare-and-set guard. */
  raw: Buffer;
  version: number;
  updatedAt: Date;
}

type Queryable = Pool | PoolClient;

/**
 * The platform's `global_secrets`, one key at a time. Every write that changes the
 * credential also NOTIFYs in the same statement, so replicas never miss a change that
 * committed and never hear of one that did not.
 */
export class SecretStore {
  readonly pool: Pool;
  readonly #key: Buffer | undefined;

  constructor(pool: Pool, encryptionKey: Buffer | undefined) {
    this.pool = pool;
    this.#key = encryptionKey;
  }

  async read(name: string, db: Queryable = this.pool): Promise<StoredRow | null> {
    const res = await db.query<{ encrypted_value: Buffer; encryption_version: number; updated_at: Date }>(
      'SELECT encrypted_value, encryption_version, updated_at FROM global_secrets WHERE key = $1',
      [name],
    );
    const row = res.rows[0];
    return row ? { raw: row.encrypted_value, version: row.encryption_version, updatedAt: row.updated_at } : null;
  }

  /** Decrypt a row; throws BrokerError (version unknown, key missing, wrong key). */
  decrypt(row: StoredRow): string {
    return open(row.raw, row.version, this.#key).toString('utf8');
  }

  /** Seed or replace: the platform's upsert, then notify. */
  async put(name: string, plaintext: string, db: Queryable = this.pool): Promise<void> {
    const sealed = seal(Buffer.from(plaintext, 'utf8'), this.#key);
    await db.query(
      `WITH up AS (
         INSERT INTO global_secrets (key, encrypted_value, encryption_version) VALUES ($1, $2, $3)
         ON CONFLICT (key) DO UPDATE SET encrypted_value = EXCLUDED.encrypted_value,
           encryption_version = EXCLUDED.encryption_version, updated_at = now()
         RETURNING key)
       SELECT pg_notify($4, key) FROM up`,
      [name, sealed.bytes, sealed.version, CHANGE_CHANNEL],
    );
  }

  /**
   * Write only if the row still holds exactly what was read before the upstream POST.
   * A false return means someone else changed it (a re-seed): their write wins.
   */
  async compareAndSet(name: string, expectedRaw: Buffer, plaintext: string, db: Queryable = this.pool): Promise<boolean> {
    const sealed = seal(Buffer.from(plaintext, 'utf8'), this.#key);
    const res = await db.query(
      `WITH up AS (
         UPDATE global_secrets SET encrypted_value = $2, encryption_version = $3, updated_at = now()
         WHERE key = $1 AND encrypted_value = $4 RETURNING key)
       SELECT pg_notify($5, key) FROM up`,
      [name, sealed.bytes, sealed.version, expectedRaw, CHANGE_CHANNEL],
    );
    return res.rowCount === 1;
  }

  async remove(name: string, db: Queryable = this.pool): Promise<boolean> {
    const res = await db.query(
      `WITH del AS (DELETE FROM global_secrets WHERE key = $1 RETURNING key) SELECT pg_notify($2, key) FROM del`,
      [name, CHANGE_CHANNEL],
    );
    return res.rowCount === 1;
  }

  /**
   * Run fn while holding the cross-replica refresh lock for this key (a session-level
   * advisory lock on a dedicated connection). Returns undefined without calling fn when
   * another replica holds it and `wait` is false.
   */
  async withLock<T>(name: string, wait: boolean, fn: (db: PoolClient) => Promise<T>): Promise<{ value: T } | undefined> {
    const client = await this.pool.connect();
    let locked = false;
    try {
      const lockKey = `codex-auth-broker:refresh:${name}`;
      if (wait) {
        await client.query('SELECT pg_advisory_lock(hashtextextended($1, 0))', [lockKey]);
        locked = true;
      } else {
        const r = await client.query<{ ok: boolean }>('SELECT pg_try_advisory_lock(hashtextextended($1, 0)) AS ok', [lockKey]);
        locked = r.rows[0]?.ok === true;
      }
      if (!locked) return undefined;
      return { value: await fn(client) };
    } finally {
      let broken = false;
      if (locked) {
        await client.query('SELECT pg_advisory_unlock(hashtextextended($1, 0))', [`codex-auth-broker:refresh:${name}`]).catch(() => {
          broken = true;
        });
      }
      // A connection that could not unlock must not go back to the pool still holding the lock.
      client.release(broken ? true : undefined);
    }
  }
}
