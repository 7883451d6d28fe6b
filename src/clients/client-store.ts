import type { Pool } from '../db.js';
import { BrokerError } from '../errors.js';
import { CLIENTS_CHANNEL, newToken, refreshCredential, sha256 } from './credentials.js';

export const CLIENT_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
export const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export class ClientInputError extends BrokerError {
  readonly field: string;
  constructor(field: string, message: string) {
    super('CLIENT_INVALID', `${field}: ${message}`);
    this.field = field;
  }
}

export interface NewClient {
  name: string;
  workspaceId: string | null;
  pool: string;
  /** Shown once: the bearer token for GET /codex-auth and the drop-in route. */
  token: string;
  /** Shown once: what proxy mode serves as tokens.refresh_token, accepted by /oauth/token. */
  refreshCredential: string;
  createdAt: string;
}

export interface ClientRow {
  name: string;
  workspaceId: string | null;
  pool: string;
  assignedCredential: string | null;
  createdAt: string;
  lastUsedAt: string | null;
  lastServedGeneration: string | null;
  revokedAt: string | null;
}

export function validateClientInput(name: unknown, workspaceId: unknown): { name: string; workspaceId: string | null } {
  if (typeof name !== 'string' || !CLIENT_NAME.test(name)) {
    throw new ClientInputError('name', 'must be 1-64 characters of letters, digits, ".", "_" or "-", starting with a letter or digit');
  }
  if (workspaceId !== undefined && workspaceId !== null && (typeof workspaceId !== 'string' || !UUID.test(workspaceId))) {
    throw new ClientInputError('workspaceId', 'must be a UUID when given');
  }
  // Postgres stores a uuid in lower case: answer the create in the form every later read shows.
  return { name, workspaceId: typeof workspaceId === 'string' ? workspaceId.toLowerCase() : null };
}

export const POOL_NAME = /^[a-z0-9][a-z0-9-]{0,39}$/;

export async function createClient(pool: Pool, secret: Buffer, nameIn: unknown, workspaceIn?: unknown, poolIn?: unknown): Promise<NewClient> {
  const { name, workspaceId } = validateClientInput(nameIn, workspaceIn);
  if (poolIn !== undefined && poolIn !== null && (typeof poolIn !== 'string' || !POOL_NAME.test(poolIn))) {
    throw new ClientInputError('pool', 'must be a pool name: lower-case letters, digits and -, at most 40 characters');
  }
  const clientPool = typeof poolIn === 'string' ? poolIn : 'default';
  const token = newToken();
  const tokenSha = sha256(token);
  const credential = refreshCredential(secret, tokenSha);
  const r = await pool.query<{ created_at: Date }>(
    `WITH ins AS (
       INSERT INTO broker_clients (name, workspace_id, token_sha256, token_prefix, refresh_credential_sha256, pool)
       VALUES ($1, $2, $3, $4, $5, $7) ON CONFLICT (name) DO NOTHING RETURNING created_at)
     SELECT created_at, pg_notify($6, $1) FROM ins`,
    // token_prefix (NOT NULL since migration 004) stays empty: no part of a token is kept in clear.
    [name, workspaceId, tokenSha, '', sha256(credential), CLIENTS_CHANNEL, clientPool],
  );
  const row = r.rows[0];
  if (!row) throw new ClientInputError('name', `a client named ${name} already exists (revoke it first, or choose another name)`);
  return { name, workspaceId, pool: clientPool, token, refreshCredential: credential, createdAt: row.created_at.toISOString() };
}

export async function listClients(pool: Pool, includeRevoked = false): Promise<ClientRow[]> {
  const r = await pool.query<{
    name: string;
    workspace_id: string | null;
    pool: string;
    assigned_credential: string | null;
    created_at: Date;
    last_used_at: Date | null;
    last_served_generation: string | null;
    revoked_at: Date | null;
  }>(
    `SELECT name, workspace_id::text AS workspace_id, pool, assigned_credential, created_at, last_used_at, last_served_generation, revoked_at
     FROM broker_clients ${includeRevoked ? '' : 'WHERE revoked_at IS NULL'} ORDER BY name`,
  );
  const iso = (d: Date | null) => (d ? d.toISOString() : null);
  return r.rows.map((x) => ({
    name: x.name,
    workspaceId: x.workspace_id,
    pool: x.pool,
    assignedCredential: x.assigned_credential,
    createdAt: x.created_at.toISOString(),
    lastUsedAt: iso(x.last_used_at),
    lastServedGeneration: x.last_served_generation,
    revokedAt: iso(x.revoked_at),
  }));
}

/**
 * Revoke by name. The row is renamed out of the way so the name can be reused, and every
 * replica drops the client from memory on the NOTIFY.
 */
export async function revokeClient(pool: Pool, name: string): Promise<boolean> {
  // No live client can have any other name, and a NUL or invalid UTF-8 would make
  // Postgres itself fail the query: answer "no such client" before asking it.
  if (!CLIENT_NAME.test(name)) return false;
  const r = await pool.query(
    `WITH upd AS (
       UPDATE broker_clients SET revoked_at = now(), name = name || '~revoked~' || extract(epoch from now())::bigint::text || '~' || left(id::text, 8)
       WHERE name = $1 AND revoked_at IS NULL RETURNING 1)
     SELECT pg_notify($2, $1) FROM upd`,
    [name, CLIENTS_CHANNEL],
  );
  return r.rowCount === 1;
}
