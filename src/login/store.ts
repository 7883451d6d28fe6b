import { accountInfo, validateSeed, type AccountInfo, type JsonObject } from '../auth-json.js';
import { recordLogin } from '../audit.js';
import { shortHash } from '../credential.js';
import { AuthJsonError } from '../errors.js';
import type { Logger } from '../logger.js';
import { clearBackoff, clearLatch } from '../refresh-guards.js';
import type { SecretStore } from '../secret-store.js';
import { LoginError } from './errors.js';

export type LoginMethod = 'device' | 'browser';

export interface StoreLoginOptions {
  store: SecretStore;
  secretKey: string;
  replicaId: string;
  method: LoginMethod;
  /** The auth.json document the login produced (loginDocument). */
  doc: JsonObject;
  /** When the login began (epoch ms), for the audit's duration. */
  startedAt: number;
  logger?: Logger | undefined;
  now?: () => number;
}

/**
 * The ONE way a completed login is stored (CLI and admin API alike): validated as a seed,
 * then, under the credential's refresh lock (so no rotation of the old login is half-way
 * through its write-back), written, its latch and backoff cleared and audited as `login`,
 * all in one transaction. The store's write NOTIFYs every replica when it commits.
 */
export async function storeLogin(o: StoreLoginOptions): Promise<AccountInfo> {
  let parsed;
  try {
    parsed = validateSeed(o.doc);
  } catch (err) {
    if (err instanceof AuthJsonError) throw new LoginError('invalid_login', `the issuer's tokens do not make a login codex accepts (${err.message}); nothing was stored`);
    throw err;
  }
  const refreshToken = parsed.tokens.refresh_token ?? '';
  const now = o.now ?? Date.now;
  // The stale-seed guard (a spent refresh token, or an older login of the same account) goes here.
  await o.store.withLock(o.secretKey, true, async (db) => {
    await db.query('BEGIN');
    try {
      await o.store.put(o.secretKey, JSON.stringify(parsed.doc), db);
      await clearLatch(db, o.secretKey);
      await clearBackoff(db, o.secretKey);
      await recordLogin(db, { secretKey: o.secretKey, replicaId: o.replicaId, refreshTokenSha8: shortHash(refreshToken), outcome: 'stored', durationMs: now() - o.startedAt });
      await db.query('COMMIT');
    } catch (err) {
      await db.query('ROLLBACK').catch(() => undefined);
      throw err;
    }
  });
  const account = accountInfo(parsed.tokens);
  o.logger?.info(
    { event: 'login_stored', method: o.method, secretKey: o.secretKey, accountId: account.accountId, planType: account.planType, refreshTokenSha8: shortHash(refreshToken) },
    `a ${o.method} login was stored under ${o.secretKey} (account ${account.accountId ?? 'unknown'}); every replica picks it up now`,
  );
  return account;
}
