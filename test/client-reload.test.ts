/**
 * The client registry's reload: reloads never overlap (a burst of NOTIFYs reads the table
 * twice, and a reload asked for while one runs reads what was committed before it was asked
 * for), and a reload of clients already held keeps their records and maps, updating a record
 * in place where its row says something new (nothing new is held, so nothing is promoted).
 */
import { strict as assert } from 'node:assert';
import { createHash, randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { loadCredentialSecret } from '../src/clients/credentials.js';
import { ClientRegistry, type Client } from '../src/clients/registry.js';
import { createPool, eachRow, migrate, RowsNotKept, type Pool } from '../src/db.js';
import { bulkInsert } from './helpers/bulk-clients.js';
import { LogCapture } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';

const suite = useSuite();

interface Setup {
  pool: Pool;
  registry: ClientRegistry;
  tokens: string[];
  /** How many times the registry read broker_clients. */
  reads: () => number;
  /**
   * Holds the next read of broker_clients until release(): `before` it is sent (its snapshot
   * comes later), or `after` the database has answered it (its snapshot is taken, its rows not
   * yet read).
   */
  hold: (mode: 'before' | 'after') => { release: () => void; started: Promise<void> };
  end: () => Promise<void>;
}

async function setup(n: number, platformTokens = false): Promise<Setup> {
  const logs = new LogCapture();
  const pool = createPool(await suite.pg.newDatabase(), logs.logger, 4);
  await migrate(pool, logs.logger);
  const secret = await loadCredentialSecret(pool, randomBytes(32));
  const bulk = bulkInsert(secret, n, { prefix: 'reload' });
  await pool.query(bulk.text, bulk.values);
  let reads = 0;
  let gate: { wait: Promise<void>; started: () => void; mode: 'before' | 'after' } | undefined;
  // The registry's reads of broker_clients, counted and (with hold()) held back before they are sent.
  const isRead = (q: unknown) => /FROM broker_clients WHERE revoked_at IS NULL/.test(typeof q === 'string' ? q : String((q as { text?: unknown } | null)?.text ?? ''));
  const counted = new Proxy(pool, {
    get(target, prop) {
      // Everything but a promise-style connect() is the pool's own (pg-pool's query() calls connect(callback) on itself).
      const own = Reflect.get(target, prop, target) as unknown;
      if (prop !== 'connect') return typeof own === 'function' ? (own as (...a: unknown[]) => unknown).bind(target) : own;
      return async (...callback: unknown[]) => {
        if (callback.length > 0) return (target.connect as (...a: unknown[]) => unknown)(...callback);
        const client = await target.connect();
        const original = client.query.bind(client) as (...a: unknown[]) => unknown;
        return new Proxy(client, {
          get(c, p, r) {
            if (p !== 'query') return Reflect.get(c, p, r) as unknown;
            return (...args: unknown[]) => {
              if (!isRead(args[0])) return original(...args);
              reads += 1;
              const g = gate;
              gate = undefined;
              if (!g) return original(...args);
              if (g.mode === 'before') {
                // Held before it is sent: the read's snapshot is taken after release().
                g.started();
                void g.wait.then(() => original(...args));
                return args[0];
              }
              // Sent, its answer left unread until release(): the snapshot is taken now.
              const result = original(...args);
              const stream = (client as unknown as { connection: { stream: { pause(): void; resume(): void } } }).connection.stream;
              stream.pause();
              void (async () => {
                const pid = (client as unknown as { processID: number }).processID;
                // The backend has answered (its snapshot is taken) once it is idle again.
                for (;;) {
                  const st = await pool.query<{ state: string | null }>('SELECT state FROM pg_stat_activity WHERE pid = $1', [pid]);
                  if (st.rows[0]?.state === 'idle') break;
                  await new Promise((resolve) => setTimeout(resolve, 10));
                }
                g.started();
                await g.wait;
                stream.resume();
              })();
              return result;
            };
          },
        });
      };
    },
  }) as unknown as Pool;
  const registry = new ClientRegistry({ pool: counted, logger: logs.logger, credentialSecret: secret, platformTokens });
  return {
    pool,
    registry,
    tokens: bulk.tokens,
    reads: () => reads,
    hold: (mode) => {
      let release = () => undefined as void;
      let started = () => undefined as void;
      const wait = new Promise<void>((r) => (release = r));
      const began = new Promise<void>((r) => (started = r));
      gate = { wait, started, mode };
      return { release, started: began };
    },
    end: () => pool.end(),
  };
}

test('client reloads never overlap: a burst of 20 asked for during a read waits for one more read, which sees what was committed before they asked', async () => {
  const s = await setup(3);
  try {
    await s.registry.reload();
    const before = s.reads();
    const held = s.hold('after');
    const first = s.registry.reload();
    await held.started;
    // The first read's snapshot is taken; this commits after it: only a later read sees it.
    await s.pool.query("UPDATE broker_clients SET revoked_at = now() WHERE name = 'reload-0'");
    const firstSawIt = first.then(() => s.registry.authenticate(s.tokens[0] ?? '') !== undefined);
    const burst = Array.from({ length: 20 }, () => s.registry.reload().then(() => s.reads() - before));
    held.release();
    await first;
    assert.equal(await firstSawIt, true, 'the first read is of the snapshot before the revoke');
    assert.deepEqual(new Set(await Promise.all(burst)), new Set([2]), 'every caller of the burst waited for the second read');
    assert.equal(s.reads() - before, 2, 'the running read and one after it');
    assert.equal(s.registry.authenticate(s.tokens[0] ?? ''), undefined, 'the revoke committed before the burst asked is applied');
    assert.equal(s.registry.size, 2);
    // A failed reload rejects its callers and leaves the next one free to run.
    const broken = s.hold('before');
    const failing = s.registry.reload();
    await broken.started;
    await s.pool.query('ALTER TABLE broker_clients RENAME TO broker_clients_gone');
    broken.release();
    await assert.rejects(failing);
    await s.pool.query('ALTER TABLE broker_clients_gone RENAME TO broker_clients');
    await s.registry.reload();
    assert.equal(s.registry.size, 2);
  } finally {
    await s.end();
  }
});

test('a reload of the same clients keeps every record and both maps; a changed row updates its record in place; a new client is added and a revoked one dropped with its remembered secret', async () => {
  const s = await setup(4);
  try {
    await s.registry.reload();
    const byName = () => new Map([...s.registry.all()].map((c) => [c.name, c] as [string, Client]));
    const first = byName();
    // Remember two secrets (a match is remembered as presented).
    assert.equal(s.registry.authenticate(s.tokens[1] ?? '')?.name, 'reload-1');
    assert.equal(s.registry.authenticate(s.tokens[2] ?? '')?.name, 'reload-2');
    assert.equal(s.registry.remembered, 2);

    await s.registry.reload();
    const second = byName();
    for (const [name, c] of first) assert.equal(second.get(name), c, `${name}: the same record`);
    assert.equal(s.registry.remembered, 2);

    await s.pool.query("UPDATE broker_clients SET assigned_credential = 'team-b', last_used_at = now(), last_served_generation = 'g-9' WHERE name = 'reload-1'");
    await s.registry.reload();
    const updated = byName().get('reload-1');
    assert.equal(updated, first.get('reload-1'), 'updated in place');
    assert.equal(updated?.assigned, 'team-b');
    assert.equal(updated?.lastGeneration, 'g-9');
    assert.ok((updated?.lastSeenAt ?? 0) > 0);
    assert.equal(s.registry.matchedBefore(s.tokens[1] ?? ''), updated);

    // What this replica saw after the stored last-seen wins over the older row.
    const served = Date.now() + 60_000;
    s.registry.markServed(updated as Client, 'g-10', served);
    await s.registry.reload();
    assert.equal(updated?.lastSeenAt, served);
    assert.equal(updated?.lastGeneration, 'g-10');

    await s.pool.query("UPDATE broker_clients SET revoked_at = now() WHERE name = 'reload-2'");
    const added = bulkInsert(await loadCredentialSecret(s.pool, randomBytes(32)), 1, { prefix: 'added' });
    await s.pool.query(added.text, added.values);
    await s.registry.reload();
    const third = byName();
    assert.deepEqual([...third.keys()].sort(), ['added-0', 'reload-0', 'reload-1', 'reload-3']);
    for (const name of ['reload-0', 'reload-1', 'reload-3']) assert.equal(third.get(name), first.get(name), `${name}: still the same record`);
    assert.equal(s.registry.authenticate(s.tokens[2] ?? ''), undefined, 'revoked');
    assert.equal(s.registry.matchedBefore(s.tokens[2] ?? ''), undefined, 'its remembered secret forgotten');
    assert.equal(s.registry.matchedBefore(s.tokens[1] ?? ''), updated, 'the other remembered secret stays');
    assert.equal(s.registry.authenticate(added.tokens[0] ?? '')?.name, 'added-0');
    assert.equal(s.registry.byRefreshCredential(third.get('reload-3')?.refreshCredential ?? '')?.name, 'reload-3');
  } finally {
    await s.end();
  }
});

test('eachRow hands every row over as it arrives; a take that throws rejects once the query has ended, and the connection goes back', async () => {
  // One connection (createPool gives up on one after 5 s): a connection not handed back fails the last query.
  const pool = createPool(await suite.pg.newDatabase(), new LogCapture().logger, 1);
  try {
    const seen: number[] = [];
    await eachRow<{ n: number }>(pool, 'SELECT generate_series(1, 2500) AS n', (r) => seen.push(r.n));
    assert.equal(seen.length, 2500);
    assert.deepEqual(seen.slice(0, 3), [1, 2, 3]);
    let calls = 0;
    await assert.rejects(
      eachRow<{ n: number }>(pool, 'SELECT generate_series(1, 10) AS n', (r) => {
        calls += 1;
        if (r.n === 3) throw new Error('row 3 is bad');
      }),
      /row 3 is bad/,
    );
    assert.equal(calls, 3, 'the rows after the throw are skipped');
    await assert.rejects(eachRow(pool, 'SELECT * FROM no_such_table', () => undefined), /no_such_table/);
    // The pool's one connection is free again (a leak would time out here).
    assert.equal((await pool.query<{ one: number }>('SELECT 1 AS one')).rows[0]?.one, 1);
  } finally {
    await pool.end();
  }
});

test('a platform token hash listed twice is one client: a revoked broker client is still dropped by the reload that sees the duplicate', async () => {
  const s = await setup(2, true);
  try {
    await s.pool.query(`CREATE TABLE workspace_auth_tokens (
      id uuid PRIMARY KEY DEFAULT gen_random_uuid(), workspace_id uuid NOT NULL, token_hash bytea NOT NULL, revoked_at timestamptz)`);
    const token = randomBytes(32).toString('base64url');
    const hash = createHash('sha256').update(token).digest();
    const ws = '00000000-0000-4000-8000-000000000001';
    await s.pool.query('INSERT INTO workspace_auth_tokens (workspace_id, token_hash) VALUES ($1, $2)', [ws, hash]);
    await s.registry.reload();
    assert.equal(s.registry.size, 3);
    assert.equal(s.registry.authenticate(s.tokens[1] ?? '')?.name, 'reload-1');
    // One broker client revoked and the platform's hash listed a second time: as many rows as before.
    await s.pool.query("UPDATE broker_clients SET revoked_at = now() WHERE name = 'reload-1'");
    await s.pool.query('INSERT INTO workspace_auth_tokens (workspace_id, token_hash) VALUES ($1, $2)', [ws, hash]);
    await s.registry.reload();
    assert.equal(s.registry.authenticate(s.tokens[1] ?? ''), undefined, 'the revoked client is gone');
    assert.equal(s.registry.matchedBefore(s.tokens[1] ?? ''), undefined, 'with its remembered secret');
    assert.equal(s.registry.size, 2);
    assert.equal(s.registry.authenticate(token)?.kind, 'platform');
    await s.registry.reload();
    assert.equal(s.registry.size, 2);
  } finally {
    await s.end();
  }
});

test('a reload that changed a record and then failed still has the assignments recounted', async () => {
  const s = await setup(2, true);
  try {
    await s.pool.query('CREATE TABLE workspace_auth_tokens (workspace_id uuid NOT NULL, token_hash bytea NOT NULL, revoked_at timestamptz)');
    await s.registry.reload();
    let recounts = 0;
    s.registry.onReload = () => (recounts += 1);
    await s.pool.query("UPDATE broker_clients SET assigned_credential = 'team-b' WHERE name = 'reload-0'");
    // The platform read fails after the broker rows are in.
    await s.pool.query('ALTER TABLE workspace_auth_tokens RENAME COLUMN token_hash TO token_digest');
    await assert.rejects(s.registry.reload(), /token_hash/);
    assert.equal([...s.registry.all()].find((c) => c.name === 'reload-0')?.assigned, 'team-b');
    assert.equal(recounts, 1);
    // A failed read that changed nothing recounts nothing.
    await assert.rejects(s.registry.reload(), /token_hash/);
    assert.equal(recounts, 1);
  } finally {
    await s.end();
  }
});

test('eachRow keeps no row (with and without query_timeout, which gives every pg query a callback), and a query that does not end in time rejects and loses its connection', async () => {
  const url = await suite.pg.newDatabase();
  for (const connectionString of [url, `${url}${url.includes('?') ? '&' : '?'}query_timeout=30000`]) {
    const pool = createPool(connectionString, new LogCapture().logger, 1);
    try {
      const client = await pool.connect();
      const kept = await new Promise<number>((resolve, reject) => {
        let rows = 0;
        const q = new RowsNotKept('SELECT generate_series(1, 500) AS n', undefined, (err: Error | undefined, res: unknown) =>
          err ? reject(err) : resolve(rows === 500 ? (res as { rows: unknown[] }).rows.length : -1),
        );
        q.on('row', () => (rows += 1));
        client.query(q);
      });
      client.release();
      assert.equal(kept, 0, `${connectionString}: every row handed over, none kept`);
      let n = 0;
      await eachRow(pool, 'SELECT generate_series(1, 300) AS n', () => (n += 1));
      assert.equal(n, 300);
      await assert.rejects(eachRow(pool, 'SELECT * FROM no_such_table', () => undefined), /no_such_table/);
      await assert.rejects(eachRow(pool, 'SELECT pg_sleep(10)', () => undefined, 200), /did not complete within 0.2 s/);
      assert.equal((await pool.query<{ one: number }>('SELECT 1 AS one')).rows[0]?.one, 1, 'the pool serves again');
    } finally {
      await pool.end();
    }
  }
});

test('a database connection that dies under a reload: that reload rejects, nothing is half-applied, and the next one reads again', async () => {
  const s = await setup(3);
  try {
    await s.registry.reload();
    const before = [...s.registry.all()];
    const held = s.hold('before');
    const dying = s.registry.reload();
    await held.started;
    // Every other connection of this database (the registry's among them) is killed before the read is sent.
    await s.pool.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()');
    await s.pool.query("UPDATE broker_clients SET revoked_at = now() WHERE name = 'reload-2'");
    held.release();
    await assert.rejects(dying);
    assert.deepEqual([...s.registry.all()], before, 'the failed read changed nothing');
    await s.registry.reload();
    assert.equal(s.registry.size, 2);
    assert.equal(s.registry.authenticate(s.tokens[2] ?? ''), undefined);
  } finally {
    await s.end();
  }
});
