import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { newToken, refreshCredential, sha256, loadCredentialSecret } from '../src/clients/credentials.js';
import { createPool, migrate } from '../src/db.js';
import { SecretStore } from '../src/secret-store.js';
import { ADMIN_TOKEN, keyFor } from './helpers/app.js';
import { LogCapture } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';

const KEY = 'CODEX_AUTH_JSON';
const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
const suite = useSuite();

/** The last migration of the release before named credentials and pools. */
const BEFORE_CREDENTIALS = 7;

test('a database made by the release before named credentials upgrades in place: its login and clients are served, each client assigned default', async () => {
  const upstream = await suite.upstream();
  const url = await suite.pg.newDatabase();
  const logs = new LogCapture();
  const pool = createPool(url, logs.logger, 2);
  const tokens: string[] = [];
  try {
    assert.deepEqual(await migrate(pool, logs.logger, BEFORE_CREDENTIALS), [1, 2, 3, 4, 5, 6, 7]);
    const store = new SecretStore(pool, keyFor(url));
    await store.put(KEY, JSON.stringify(upstream.seed({ accountId: 'acct-old' })));
    // Clients as that release wrote them: no pool, no assignment column yet.
    const secret = await loadCredentialSecret(pool, keyFor(url));
    for (const name of ['ws-1', 'ws-2']) {
      const token = newToken();
      tokens.push(token);
      await pool.query('INSERT INTO broker_clients (name, token_sha256, token_prefix, refresh_credential_sha256) VALUES ($1, $2, $3, $4)', [
        name,
        sha256(token),
        '',
        sha256(refreshCredential(secret, sha256(token))),
      ]);
    }
  } finally {
    await pool.end();
  }
  const t = await suite.app({ databaseUrl: url, upstreamUrl: upstream.url });
  for (const token of tokens) {
    const res = await t.app.inject({ url: '/codex-auth', headers: { authorization: `Bearer ${token}` } });
    assert.equal(res.statusCode, 200, res.body);
    assert.equal(res.headers['x-codex-credential'], 'default');
  }
  await t.core.assignments.rebalance();
  const rows = await t.core.pool.query<{ name: string; pool: string; assigned_credential: string | null }>('SELECT name, pool, assigned_credential FROM broker_clients ORDER BY name');
  assert.deepEqual(
    rows.rows.map((r) => [r.name, r.pool, r.assigned_credential]),
    [
      ['ws-1', 'default', 'default'],
      ['ws-2', 'default', 'default'],
    ],
  );
  // The platform's row is untouched and default needs no row of its own.
  assert.equal((await t.core.pool.query('SELECT 1 FROM broker_credentials')).rowCount, 0);
  const list = (await t.app.inject({ url: '/admin/credentials', headers: admin })).json() as { credentials: Array<{ name: string; state: string; accountId: string; clientsAssigned: number }> };
  assert.deepEqual(
    list.credentials.map((c) => [c.name, c.state, c.accountId, c.clientsAssigned]),
    [['default', 'fresh', 'acct-old', 2]],
  );
});
