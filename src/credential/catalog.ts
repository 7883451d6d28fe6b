import type { Pool, PoolClient } from '../db.js';
import { clearBackoff, clearLatch } from '../refresh-guards.js';
import type { SecretStore } from '../secret-store.js';
import { DEFAULT_CREDENTIAL, secretKeyOf } from './names.js';

/** Replicas reload the list of credentials when this is notified (a credential added, moved to another pool, removed). */
export const CREDENTIALS_CHANNEL = 'broker_credentials_changed';

export const DEFAULT_POOL = 'default';

export interface CredentialEntry {
  name: string;
  secretKey: string;
  pool: string;
}

type Db = Pool | PoolClient;

/** Every credential, `default` first and always present (a platform database has no row for it). */
export async function listCredentials(db: Db, defaultKey: string): Promise<CredentialEntry[]> {
  const r = await db.query<{ name: string; secret_key: string; pool: string }>('SELECT name, secret_key, pool FROM broker_credentials ORDER BY name');
  const rows = r.rows.map((x) => ({ name: x.name, secretKey: x.name === DEFAULT_CREDENTIAL ? defaultKey : x.secret_key, pool: x.pool }));
  const dflt = rows.find((x) => x.name === DEFAULT_CREDENTIAL) ?? { name: DEFAULT_CREDENTIAL, secretKey: defaultKey, pool: DEFAULT_POOL };
  return [dflt, ...rows.filter((x) => x.name !== DEFAULT_CREDENTIAL)];
}

/** Add a credential or move it to another pool (`pool` undefined keeps the current one); every replica hears of it. */
export async function registerCredential(db: Db, name: string, defaultKey: string, pool: string | undefined): Promise<CredentialEntry> {
  const r = await db.query<{ pool: string }>(
    `WITH up AS (
       INSERT INTO broker_credentials (name, secret_key, pool) VALUES ($1, $2, COALESCE($3, 'default'))
       ON CONFLICT (name) DO UPDATE SET pool = COALESCE($3, broker_credentials.pool), updated_at = now()
       RETURNING name, pool)
     SELECT pool, pg_notify($4, name) FROM up`,
    [name, secretKeyOf(name, defaultKey), pool ?? null, CREDENTIALS_CHANNEL],
  );
  return { name, secretKey: secretKeyOf(name, defaultKey), pool: r.rows[0]?.pool ?? DEFAULT_POOL };
}

/** Forget a credential (its stored login is removed separately); false when there was no such row. */
export async function unregisterCredential(db: Db, name: string): Promise<boolean> {
  const r = await db.query(`WITH del AS (DELETE FROM broker_credentials WHERE name = $1 RETURNING name) SELECT pg_notify($2, name) FROM del`, [name, CREDENTIALS_CHANNEL]);
  return r.rowCount === 1;
}

/** Live clients whose stored assignment is this credential. */
export async function assignedClients(db: Db, name: string): Promise<number> {
  const r = await db.query<{ n: string }>('SELECT count(*) AS n FROM broker_clients WHERE assigned_credential = $1 AND revoked_at IS NULL', [name]);
  return Number(r.rows[0]?.n ?? 0);
}

/**
 * Remove a named credential: its stored login, latch, backoff and list entry, in one
 * transaction under its refresh lock (never between a refresher's POST and its write-back),
 * so replicas hear of the login and the entry going together. Its clients move on every
 * replica's next rebalance (reason `removed`).
 */
export async function removeCredential(store: SecretStore, name: string, secretKey: string): Promise<void> {
  await store.withLock(secretKey, true, async (db) => {
    await db.query('BEGIN');
    try {
      await store.remove(secretKey, db);
      await clearLatch(db, secretKey);
      await clearBackoff(db, secretKey);
      await unregisterCredential(db, name);
      await db.query('COMMIT');
    } catch (err) {
      await db.query('ROLLBACK').catch(() => undefined);
      throw err;
    }
  });
}
