import { assignedClients, listCredentials, removeCredential } from '../credential/catalog.js';
import { describeLogin } from '../credential/describe.js';
import { DEFAULT_CREDENTIAL } from '../credential/names.js';
import { buildSnapshot, stateOf } from '../credential.js';
import type { Pool } from '../db.js';
import { readLatch } from '../refresh-guards.js';
import type { SecretStore } from '../secret-store.js';

export interface CredentialRow {
  name: string;
  pool: string;
  secretKey: string;
  state: string;
  accountId: string | null;
  planType: string | null;
  accessTokenExpiresAt: string | null;
  latch: { upstreamStatus: number | null; upstreamCode: string | null; at: string | null } | null;
  clientsAssigned: number;
}

/** Every credential as the database holds it (no broker needs to run): the CLI's `credentials list`. */
export async function describeStored(store: SecretStore, pool: Pool, defaultKey: string, marginSeconds: number): Promise<CredentialRow[]> {
  const out: CredentialRow[] = [];
  for (const e of await listCredentials(pool, defaultKey)) {
    const row = await store.read(e.secretKey);
    let snap;
    let state = 'absent';
    try {
      const text = row ? store.decrypt(row) : '';
      if (row && text.trim() !== '') snap = buildSnapshot(row.raw, text);
    } catch {
      state = 'invalid';
    }
    const client = await pool.connect();
    const latch = await readLatch(client, e.secretKey).finally(() => client.release());
    const latched = latch !== undefined && snap !== undefined && latch.refreshTokenSha === snap.refreshTokenSha;
    if (snap) state = stateOf(snap, latched, Date.now(), marginSeconds);
    out.push({ name: e.name, pool: e.pool, secretKey: e.secretKey, state, ...describeLogin(snap, latched ? latch : undefined), clientsAssigned: await assignedClients(pool, e.name) });
  }
  return out;
}

export interface Io {
  out: (line: string) => void;
  err: (line: string) => void;
  table: (header: string[], rows: string[][]) => void;
}

/** `credentials list [--json]` and `credentials remove <name> [--reassign]`. */
export async function credentialsCommand(
  sub: string,
  name: string | undefined,
  flags: Record<string, string | true>,
  ctx: { store: SecretStore; pool: Pool; defaultKey: string; marginSeconds: number },
  io: Io,
): Promise<number> {
  if (sub === 'list') {
    const rows = await describeStored(ctx.store, ctx.pool, ctx.defaultKey, ctx.marginSeconds);
    if (flags['--json']) {
      io.out(JSON.stringify({ credentials: rows }, null, 2));
      return 0;
    }
    io.table(
      ['NAME', 'POOL', 'STATE', 'ACCOUNT', 'PLAN', 'EXPIRES', 'CLIENTS'],
      rows.map((r) => [r.name, r.pool, r.state, r.accountId ?? '-', r.planType ?? '-', r.accessTokenExpiresAt ?? '-', String(r.clientsAssigned)]),
    );
    return 0;
  }
  const target = name ?? '';
  if (target === DEFAULT_CREDENTIAL) {
    io.err('credentials remove: the default credential cannot be removed; log in or seed another login over it instead');
    return 2;
  }
  const entry = (await listCredentials(ctx.pool, ctx.defaultKey)).find((e) => e.name === target);
  if (!entry) {
    io.err(`credentials remove: no credential named ${target}; \`credentials list\` shows them`);
    return 1;
  }
  const assigned = await assignedClients(ctx.pool, target);
  if (assigned > 0 && flags['--reassign'] !== true) {
    io.err(`credentials remove: ${assigned} client(s) are assigned to ${target}; repeat with --reassign to move them to the other credentials of pool ${entry.pool} (running agents switch accounts). Nothing was removed.`);
    return 1;
  }
  await removeCredential(ctx.store, target, entry.secretKey);
  io.out(`removed credential ${target} and its stored login${assigned > 0 ? `; running brokers move its ${assigned} client(s) within pool ${entry.pool} at once` : ''}`);
  return 0;
}
