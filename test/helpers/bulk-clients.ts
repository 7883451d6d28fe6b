import { newToken, refreshCredential, sha256 } from '../../src/clients/credentials.js';
import type { BrokerCore } from '../../src/broker.js';

/** A client inserted in bulk: its name and bearer token (for requests as it). */
export interface BulkClient {
  name: string;
  token: string;
}

/** One INSERT of many clients, and their bearer tokens in the same order (`<prefix>-<i>`). */
export interface BulkInsert {
  tokens: string[];
  names: string[];
  text: string;
  values: unknown[];
}

/**
 * The one statement that lands `n` clients of one pool at once, in the shape createClient
 * writes (token hash, no part of the token in clear, refresh-credential hash), as a bulk
 * import would: no assignment yet, so the first replica to see them assigns them. Shared by
 * the tests and the bench.
 */
export function bulkInsert(credentialSecret: Buffer, n: number, o: { prefix: string; pool?: string; workspaceId?: (i: number) => string }): BulkInsert {
  const tokens: string[] = [];
  const names: string[] = [];
  const workspaces: Array<string | null> = [];
  const tokenShas: Buffer[] = [];
  const credentialShas: Buffer[] = [];
  for (let i = 0; i < n; i++) {
    const token = newToken();
    const tokenSha = sha256(token);
    tokens.push(token);
    names.push(`${o.prefix}-${i}`);
    workspaces.push(o.workspaceId ? o.workspaceId(i) : null);
    tokenShas.push(tokenSha);
    credentialShas.push(sha256(refreshCredential(credentialSecret, tokenSha)));
  }
  return {
    tokens,
    names,
    text: `INSERT INTO broker_clients (name, workspace_id, token_sha256, token_prefix, refresh_credential_sha256, pool)
           SELECT n, w, t, '', c, $5 FROM unnest($1::text[], $2::uuid[], $3::bytea[], $4::bytea[]) AS x(n, w, t, c)`,
    values: [names, workspaces, tokenShas, credentialShas, o.pool ?? 'default'],
  };
}

/** `n` clients of one pool in a single statement (bulkInsert), then `core` reloaded. */
export async function insertClients(core: BrokerCore, n: number, prefix: string, pool = 'default'): Promise<BulkClient[]> {
  const bulk = bulkInsert(core.credentialSecret, n, { prefix, pool });
  await core.pool.query(bulk.text, bulk.values);
  await core.clients.reload();
  return bulk.tokens.map((token, i) => ({ name: bulk.names[i] ?? '', token }));
}
