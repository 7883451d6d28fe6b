import { readdir, readFile } from 'node:fs/promises';
import { pg, type Pool as PgPool, type PoolClient as PgPoolClient } from './lib/pg.js';
import type { Logger } from './logger.js';

export type Pool = PgPool;
export type PoolClient = PgPoolClient;

const MIGRATIONS_DIR = new URL('../migrations/', import.meta.url);
// Any fixed number works as long as every replica uses the same one: it serialises
// concurrent migrators at start.
const MIGRATION_LOCK = 727_274_101;

/**
 * A pool that counts every query it (or a client checked out of it) sends: the proof
 * that serving a workspace costs no database round-trip. `onQuery` is the seam the
 * metrics and the tests read.
 */
export function createPool(connectionString: string, logger: Logger, max = 10, onQuery?: () => void): Pool {
  const pool = new pg.Pool({ connectionString, max, connectionTimeoutMillis: 5_000, idleTimeoutMillis: 30_000 });
  // An idle client losing its connection (database restart) must not crash the process.
  pool.on('error', (err) => logger.warn({ event: 'db_idle_client_error', err: { message: err.message } }, 'idle database connection failed; the pool will reconnect'));
  // A checked-out client (the refresh lock is held across the upstream POST) losing its
  // connection emits 'error' with no pool listener attached: without this the process
  // crashes between the upstream answer and the write-back. The failed query rejects anyway.
  pool.on('connect', (client) => {
    client.on('error', (err: Error) => logger.warn({ event: 'db_client_error', err: { message: err.message } }, 'a database connection in use failed'));
  });
  if (onQuery) {
    // Pool.query checks a client out and calls client.query, so counting at the client counts both paths once.
    pool.on('connect', (client) => {
      const original = client.query.bind(client) as (...args: unknown[]) => unknown;
      (client as unknown as { query: (...args: unknown[]) => unknown }).query = (...args: unknown[]) => {
        onQuery();
        return original(...args);
      };
    });
  }
  return pool;
}

type RowDescriptionHandler = { handleRowDescription(this: unknown, msg: unknown): void };
const baseRowDescription = (pg.Query.prototype as unknown as RowDescriptionHandler).handleRowDescription;

/**
 * A query whose rows go to its 'row' listeners only. pg keeps every row of a result until
 * the last one arrives when the query has a callback (and `query_timeout` gives every query
 * one); for 10,000 clients that is several MB alive across scavenges, promoted into the old
 * generation by every reload (BENCHMARKS.md, session 21). pg decides per result, when the
 * row description arrives, whether to keep rows; this says no after it has.
 */
export class RowsNotKept extends pg.Query {
  // Not in pg's types: the handler pg's connection calls when a result's columns arrive.
  handleRowDescription(msg: unknown): void {
    baseRowDescription.call(this, msg);
    (this as unknown as { _accumulateRows: boolean })._accumulateRows = false;
  }
}

/**
 * Every row of one query, handed to `take` as it arrives and then dropped. One statement,
 * so one snapshot, as a plain query. If `take` throws, the remaining rows are skipped and the
 * call rejects with that error once the query has ended. A query that has not ended after
 * `timeoutMs` (a connection that went silent) rejects and its connection is closed: a caller
 * that waits for it (the client registry's reloads, one at a time) is never stuck behind it.
 */
export async function eachRow<R>(pool: Pool, text: string, take: (row: R) => void, timeoutMs = 60_000): Promise<void> {
  const client = await pool.connect();
  // A failed query hands its connection back to be closed, as Pool.query does; one whose
  // rows a `take` refused ended normally and goes back to the pool.
  let failed: Error | undefined;
  let timer: NodeJS.Timeout | undefined;
  try {
    await new Promise<void>((resolve, reject) => {
      let settled = false;
      let thrown: Error | undefined;
      const settle = (err: Error | undefined) => {
        if (settled) return;
        settled = true;
        if (err) reject(err);
        else resolve();
      };
      const query = new RowsNotKept(text, undefined, (err: Error | undefined) => {
        if (err) failed = err;
        settle(err ?? thrown);
      });
      query.on('row', (row: R) => {
        if (settled || thrown) return;
        try {
          take(row);
        } catch (err) {
          thrown = err as Error;
        }
      });
      timer = setTimeout(() => {
        failed = new Error(`the query did not complete within ${timeoutMs / 1000} s`);
        settle(failed);
      }, timeoutMs);
      timer.unref();
      client.query(query);
    });
  } finally {
    clearTimeout(timer);
    client.release(failed);
  }
}

export interface Migration {
  version: number;
  name: string;
  sql: string;
}

export async function loadMigrations(): Promise<Migration[]> {
  const files = (await readdir(MIGRATIONS_DIR)).filter((f) => /^\d{3}_.+\.sql$/.test(f)).sort();
  return Promise.all(
    files.map(async (f) => ({ version: Number(f.slice(0, 3)), name: f.replace(/\.sql$/, ''), sql: await readFile(new URL(f, MIGRATIONS_DIR), 'utf8') })),
  );
}

/**
 * Apply pending migrations in order, each in its own transaction, one migrator at a time.
 * `upTo` stops after that version (an upgrade test builds the database an older release made).
 */
export async function migrate(pool: Pool, logger: Logger, upTo = Infinity): Promise<number[]> {
  const migrations = (await loadMigrations()).filter((m) => m.version <= upTo);
  const client = await pool.connect();
  const applied: number[] = [];
  try {
    await client.query('SELECT pg_advisory_lock($1)', [MIGRATION_LOCK]);
    await client.query(`CREATE TABLE IF NOT EXISTS broker_schema_migrations (
      version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())`);
    const done = new Set((await client.query<{ version: number }>('SELECT version FROM broker_schema_migrations')).rows.map((r) => r.version));
    for (const m of migrations) {
      if (done.has(m.version)) continue;
      await client.query('BEGIN');
      try {
        await client.query(m.sql);
        await client.query('INSERT INTO broker_schema_migrations (version, name) VALUES ($1, $2)', [m.version, m.name]);
        await client.query('COMMIT');
      } catch (err) {
        await client.query('ROLLBACK');
        throw err;
      }
      applied.push(m.version);
      logger.info({ event: 'migration_applied', version: m.version, name: m.name }, `applied migration ${m.name}`);
    }
  } finally {
    await client.query('SELECT pg_advisory_unlock($1)', [MIGRATION_LOCK]).catch(() => undefined);
    client.release();
  }
  return applied;
}
