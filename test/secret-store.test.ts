import { strict as assert } from 'node:assert';
import { createDecipheriv, randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { createPool, loadMigrations, migrate } from '../src/db.js';
import { SecretStore } from '../src/secret-store.js';
import { LogCapture } from './helpers/logs.js';
import { startTestPostgres, type TestPostgres } from './helpers/pg.js';

let server: TestPostgres;
before(async () => {
  server = await startTestPostgres();
});
after(async () => {
  await server.stop();
});

const PLATFORM_DDL = `CREATE TABLE global_secrets (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  key text NOT NULL UNIQUE,
  encrypted_value bytea NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  encryption_version int NOT NULL DEFAULT 0,
  platform_note text
)`;

async function columns(c: pg.Client | pg.Pool) {
  const r = await c.query(
    `SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns
     WHERE table_name = 'global_secrets' ORDER BY ordinal_position`,
  );
  return r.rows;
}

async function withPool<T>(url: string, fn: (pool: pg.Pool, logs: LogCapture) => Promise<T>): Promise<T> {
  const logs = new LogCapture();
  const pool = createPool(url, logs.logger, 2);
  try {
    return await fn(pool, logs);
  } finally {
    await pool.end();
  }
}

describe('global_secrets', () => {
  test('creates the table in the platform shape when missing', async () => {
    const url = await server.newDatabase();
    await withPool(url, async (pool, logs) => {
      await migrate(pool, logs.logger);
      const cols = await columns(pool);
      assert.deepEqual(
        cols.map((c) => [c.column_name, c.data_type, c.is_nullable]),
        [
          ['id', 'uuid', 'NO'],
          ['key', 'text', 'NO'],
          ['encrypted_value', 'bytea', 'NO'],
          ['encryption_version', 'integer', 'NO'],
          ['created_at', 'timestamp with time zone', 'NO'],
          ['updated_at', 'timestamp with time zone', 'NO'],
        ],
      );
      const unique = await pool.query(
        `SELECT 1 FROM pg_indexes WHERE tablename = 'global_secrets' AND indexdef LIKE 'CREATE UNIQUE INDEX%(key)'`,
      );
      assert.equal(unique.rowCount, 1);
    });
  });

  test("never alters the platform's existing table or its rows", async () => {
    const url = await server.newDatabase();
    const c = new pg.Client({ connectionString: url });
    await c.connect();
    await c.query(PLATFORM_DDL);
    await c.query("INSERT INTO global_secrets (key, encrypted_value, encryption_version, platform_note) VALUES ('OTHER', '\\x0102', 1, 'kept')");
    const before = await columns(c);
    const rowBefore = (await c.query('SELECT * FROM global_secrets')).rows;
    await withPool(url, async (pool, logs) => {
      await migrate(pool, logs.logger);
      await migrate(pool, logs.logger);
      await new SecretStore(pool, randomBytes(32)).put('CODEX_AUTH_JSON', '{"tokens":{}}');
    });
    assert.deepEqual(await columns(c), before);
    assert.deepEqual((await c.query("SELECT * FROM global_secrets WHERE key = 'OTHER'")).rows, rowBefore);
    await c.end();
  });

  test('migrations are versioned, applied once, and create only broker_ tables', async () => {
    const url = await server.newDatabase();
    await withPool(url, async (pool, logs) => {
      const all = (await loadMigrations()).map((m) => m.version);
      assert.deepEqual(await migrate(pool, logs.logger), all);
      assert.deepEqual(await migrate(pool, logs.logger), []);
      const tables = (await pool.query<{ tablename: string }>("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")).rows.map((r) => r.tablename);
      for (const t of tables) assert.ok(t === 'global_secrets' || t.startsWith('broker_'), t);
    });
  });

  test('concurrent migrators do not collide', async () => {
    const url = await server.newDatabase();
    await withPool(url, async (pool, logs) => {
      const results = await Promise.all([migrate(pool, logs.logger), migrate(pool, logs.logger), migrate(pool, logs.logger)]);
      assert.equal(results.flat().length, (await loadMigrations()).length);
    });
  });

  test('upsert keeps id and created_at and sets updated_at to now', async () => {
    const url = await server.newDatabase();
    await withPool(url, async (pool, logs) => {
      await migrate(pool, logs.logger);
      const store = new SecretStore(pool, randomBytes(32));
      await store.put('CODEX_AUTH_JSON', 'one');
      await pool.query("UPDATE global_secrets SET updated_at = now() - interval '1 day', created_at = now() - interval '2 days'");
      const before = (await pool.query('SELECT id, created_at, updated_at FROM global_secrets')).rows[0];
      await store.put('CODEX_AUTH_JSON', 'two');
      const after = (await pool.query('SELECT id, created_at, updated_at FROM global_secrets')).rows[0];
      assert.equal(after.id, before.id);
      assert.deepEqual(after.created_at, before.created_at);
      assert.ok(after.updated_at.getTime() > before.updated_at.getTime() + 3_600_000);
      const row = await store.read('CODEX_AUTH_JSON');
      assert.ok(row);
      assert.equal(store.decrypt(row), 'two');
    });
  });

  test('what the broker writes decrypts with the platform format (nonce || ciphertext || tag)', async () => {
    const url = await server.newDatabase();
    const key = randomBytes(32);
    await withPool(url, async (pool, logs) => {
      await migrate(pool, logs.logger);
      await new SecretStore(pool, key).put('CODEX_AUTH_JSON', '{"tokens":{"refresh_token":"x"}}');
      const r = await pool.query<{ encrypted_value: Buffer; encryption_version: number }>('SELECT encrypted_value, encryption_version FROM global_secrets');
      const { encrypted_value: v, encryption_version: version } = r.rows[0] ?? { encrypted_value: Buffer.alloc(0), encryption_version: -1 };
      assert.equal(version, 1);
      const d = createDecipheriv('aes-256-gcm', key, v.subarray(0, 12));
      d.setAuthTag(v.subarray(v.length - 16));
      assert.equal(Buffer.concat([d.update(v.subarray(12, v.length - 16)), d.final()]).toString(), '{"tokens":{"refresh_token":"x"}}');
    });
  });

  test('without a key the broker writes and reads version 0 plaintext', async () => {
    const url = await server.newDatabase();
    await withPool(url, async (pool, logs) => {
      await migrate(pool, logs.logger);
      const store = new SecretStore(pool, undefined);
      await store.put('CODEX_AUTH_JSON', 'plain');
      const r = await pool.query<{ encrypted_value: Buffer; encryption_version: number }>('SELECT encrypted_value, encryption_version FROM global_secrets');
      assert.equal(r.rows[0]?.encryption_version, 0);
      assert.equal(r.rows[0]?.encrypted_value.toString(), 'plain');
    });
  });

  test('compare-and-set writes only over exactly what was read', async () => {
    const url = await server.newDatabase();
    await withPool(url, async (pool, logs) => {
      await migrate(pool, logs.logger);
      const store = new SecretStore(pool, randomBytes(32));
      await store.put('CODEX_AUTH_JSON', 'v1');
      const read = await store.read('CODEX_AUTH_JSON');
      assert.ok(read);
      await store.put('CODEX_AUTH_JSON', 'reseeded');
      assert.equal(await store.compareAndSet('CODEX_AUTH_JSON', read.raw, 'rotated'), false);
      const now = await store.read('CODEX_AUTH_JSON');
      assert.ok(now);
      assert.equal(store.decrypt(now), 'reseeded');
      assert.equal(await store.compareAndSet('CODEX_AUTH_JSON', now.raw, 'rotated'), true);
    });
  });

  test('every committed change NOTIFYs codex_auth_changed with the key, and a failed compare-and-set does not', async () => {
    const url = await server.newDatabase();
    const listener = new pg.Client({ connectionString: url });
    await listener.connect();
    const heard: string[] = [];
    listener.on('notification', (m) => heard.push(`${m.channel}:${m.payload}`));
    await listener.query('LISTEN codex_auth_changed');
    await withPool(url, async (pool, logs) => {
      await migrate(pool, logs.logger);
      const store = new SecretStore(pool, randomBytes(32));
      await store.put('CODEX_AUTH_JSON', 'a');
      const read = await store.read('CODEX_AUTH_JSON');
      assert.ok(read);
      assert.equal(await store.compareAndSet('CODEX_AUTH_JSON', Buffer.from('stale'), 'x'), false);
      assert.equal(await store.compareAndSet('CODEX_AUTH_JSON', read.raw, 'b'), true);
      assert.equal(await store.remove('CODEX_AUTH_JSON'), true);
    });
    // A round trip on the listening session: Postgres delivers every notification committed
    // before it ahead of its answer (a fixed sleep could end first on a loaded machine).
    await listener.query('SELECT 1');
    await listener.end();
    assert.deepEqual(heard, ['codex_auth_changed:CODEX_AUTH_JSON', 'codex_auth_changed:CODEX_AUTH_JSON', 'codex_auth_changed:CODEX_AUTH_JSON']);
  });

  test('the refresh lock admits one holder at a time across connections', async () => {
    const url = await server.newDatabase();
    await withPool(url, async (pool, logs) => {
      await migrate(pool, logs.logger);
      const store = new SecretStore(pool, undefined);
      let inner: unknown = 'not run';
      const outer = await store.withLock('K', false, async () => {
        inner = await store.withLock('K', false, async () => 'second holder');
        return 'first holder';
      });
      assert.deepEqual(outer, { value: 'first holder' });
      assert.equal(inner, undefined);
      assert.deepEqual(await store.withLock('K', false, async () => 'after release'), { value: 'after release' });
    });
  });
});
