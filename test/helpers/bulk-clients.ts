import { newToken, refreshCredential, sha256 } from '../../src/clients/credentials.js';
import type { BrokerCore } from '../../src/broker.js';

/** A client inserted in bulk: its name and bearer token (for requests as it). */
export interface BulkClient {
  name: string;
  token: string;
}

/**
 * `n` clients of one pool in a single statement, as a bulk import would land them (no
 * assignment yet: the first replica to see them assigns them). Then reload `core`.
 */
export async function insertClients(core: BrokerCore, n: number, prefix: string, pool = 'default'): Promise<BulkClient[]> {
  const made = Array.from({ length: n }, (_, i) => {
    const token = newToken();
    const tokenSha = sha256(token);
    return { name: `${prefix}-${i}`, token, tokenSha, credentialSha: sha256(refreshCredential(core.credentialSecret, tokenSha)) };
  });
  await core.pool.query(
    `INSERT INTO broker_clients (name, token_sha256, token_prefix, refresh_credential_sha256, pool)
     SELECT n, t, '', c, $4 FROM unnest($1::text[], $2::bytea[], $3::bytea[]) AS x(n, t, c)`,
    [made.map((c) => c.name), made.map((c) => c.tokenSha), made.map((c) => c.credentialSha), pool],
  );
  await core.clients.reload();
  return made.map(({ name, token }) => ({ name, token }));
}
