import { accountInfo, validateSeed, type AccountInfo, type JsonObject } from '../auth-json.js';
import { recordLogin, spentAt } from '../audit.js';
import { buildSnapshot, shortHash } from '../credential.js';
import { AuthJsonError } from '../errors.js';
import type { PoolClient } from '../db.js';
import type { Logger } from '../logger.js';
import { clearBackoff, clearLatch } from '../refresh-guards.js';
import type { SecretStore } from '../secret-store.js';
import { describeRefusal, judgeSeed, storedSnapshot, type SeedRefusal } from '../seed-guard.js';
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
  /** Who asked: the CLI or the admin API (audited). */
  source: 'cli' | 'admin_api';
  /** Store even when the stale-seed guard refuses it. */
  force?: boolean;
  /**
   * Make the credential known (a login may create one), in the same transaction as the
   * write: a refused or failed login never leaves an empty credential in the list.
   */
  register?: (db: PoolClient) => Promise<unknown>;
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
  const seed = buildSnapshot(Buffer.alloc(0), JSON.stringify(parsed.doc));
  const audit = (db: Parameters<typeof recordLogin>[0], outcome: string, stored: boolean) =>
    recordLogin(db, { secretKey: o.secretKey, replicaId: o.replicaId, source: o.source, refreshTokenSha8: shortHash(refreshToken), outcome, durationMs: now() - o.startedAt, stored });
  const locked = await o.store.withLock(o.secretKey, true, async (db): Promise<SeedRefusal | undefined> => {
    // The stale-seed guard, as for a seed: a spent refresh token, or an older login of the same account.
    const refusal = judgeSeed(seed, storedSnapshot(o.store, await o.store.read(o.secretKey, db)), await spentAt(db, seed.refreshTokenSha));
    if (refusal && !o.force) {
      await audit(db, `refused_${refusal.reason}`, false);
      return refusal;
    }
    await db.query('BEGIN');
    try {
      await o.store.put(o.secretKey, JSON.stringify(parsed.doc), db);
      await o.register?.(db);
      await clearLatch(db, o.secretKey);
      await clearBackoff(db, o.secretKey);
      await audit(db, refusal ? 'stored_forced' : 'stored', true);
      await db.query('COMMIT');
    } catch (err) {
      await db.query('ROLLBACK').catch(() => undefined);
      throw err;
    }
    return undefined;
  });
  const refusal = locked?.value;
  if (refusal) {
    o.logger?.warn({ event: 'login_refused', method: o.method, source: o.source, secretKey: o.secretKey, refusal }, `refused to store a ${o.method} login: ${describeRefusal(refusal)}`);
    throw new LoginError('stale_login', `the login was not stored: ${describeRefusal(refusal)}. Log in again, or force it (login --force) only if you are sure`);
  }
  const account = accountInfo(parsed.tokens);
  o.logger?.info(
    { event: 'login_stored', method: o.method, secretKey: o.secretKey, accountId: account.accountId, planType: account.planType, refreshTokenSha8: shortHash(refreshToken) },
    `a ${o.method} login was stored under ${o.secretKey} (account ${account.accountId ?? 'unknown'}); every replica picks it up now`,
  );
  return account;
}
