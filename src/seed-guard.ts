import type { ParsedCredential } from './auth-json.js';
import { recordSeed, spentAt } from './audit.js';
import { buildSnapshot, type Snapshot } from './credential.js';
import type { PoolClient } from './db.js';
import type { Logger } from './logger.js';
import type { SecretStore } from './secret-store.js';

/** Where a seed came from: the CLI, PUT /admin/credential (and, with issue #11, a broker login). */
export type SeedSource = 'cli' | 'admin_api' | 'login';

/** Why a seed would re-kill a live login. */
export type SeedRefusal =
  | { reason: 'spent'; spentAt: string; by: 'refresh' | 'revoke' }
  | { reason: 'older'; accountId: string; seedIssuedAt: string; storedIssuedAt: string };

export type SeedResult = { stored: true; forced: boolean; overrode: SeedRefusal | undefined } | { stored: false; refusal: SeedRefusal };

export interface SeedRequest {
  store: SecretStore;
  secretKey: string;
  /** A document validateSeed accepted. */
  parsed: ParsedCredential;
  source: SeedSource;
  force: boolean;
  replicaId: string;
  logger: Logger;
}

const iso = (sec: number) => new Date(sec * 1000).toISOString();

/**
 * The stale-seed rule, without I/O. An old copy of auth.json (a laptop's, a backup)
 * holds a refresh token the broker has already rotated away: storing it makes the next
 * refresh a reuse, which the upstream answers by logging the whole fleet out.
 */
export function judgeSeed(seed: Snapshot, stored: Snapshot | undefined, spent: { at: Date; kind: 'refresh' | 'revoke' } | undefined): SeedRefusal | undefined {
  if (spent) return { reason: 'spent', spentAt: spent.at.toISOString(), by: spent.kind };
  const account = seed.account.accountId;
  if (!stored || account === undefined || stored.account.accountId !== account) return undefined;
  const a = seed.claims.iat;
  const b = stored.claims.iat;
  if (a !== undefined && b !== undefined && a < b) return { reason: 'older', accountId: account, seedIssuedAt: iso(a), storedIssuedAt: iso(b) };
  return undefined;
}

/** The admin API's answer to a refused seed: 409, why, and how to force it. */
export function staleSeedProblem(r: SeedRefusal): { status: 409; code: 'stale_seed'; title: string; detail: string; extra: Record<string, unknown> } {
  return {
    status: 409,
    code: 'stale_seed',
    title: 'Conflict',
    detail: `refused: ${describeRefusal(r)}. Nothing was stored. To store it anyway, repeat with ?force=true`,
    extra: { refusal: r },
  };
}

/** What an operator reads: why, and what to do. */
export function describeRefusal(r: SeedRefusal): string {
  if (r.reason === 'spent') {
    const how = r.by === 'revoke' ? 'revoked upstream by the broker' : 'already spent by the broker (sent upstream to refresh)';
    return `its refresh token was ${how} on ${r.spentAt}: this is an old copy of the login, and storing it would log every workspace out`;
  }
  return `it is older than the stored login of the same account ${r.accountId} (access token issued ${r.seedIssuedAt}, the stored one ${r.storedIssuedAt}): it would replace a newer login with an old copy`;
}

export function storedSnapshot(store: SecretStore, row: Awaited<ReturnType<SecretStore['read']>>): Snapshot | undefined {
  if (!row) return undefined;
  try {
    return buildSnapshot(row.raw, store.decrypt(row));
  } catch {
    // Unreadable or blank: nothing to protect, the seed repairs it.
    return undefined;
  }
}

/**
 * Store a validated login unless it is stale (see judgeSeed), or anyway when forced. The
 * check and the write happen under the key's refresh lock, so a seed never lands between a
 * refresher's re-read and its compare-and-set, and two seeds are judged one after the
 * other. Every seed, stored or refused, is audited and logged with its source.
 */
export async function seedCredential(o: SeedRequest): Promise<SeedResult> {
  const plaintext = JSON.stringify(o.parsed.doc);
  const seed = buildSnapshot(Buffer.alloc(0), plaintext);
  const locked = await o.store.withLock(o.secretKey, true, async (db) => {
    const stored = storedSnapshot(o.store, await o.store.read(o.secretKey, db));
    const refusal = judgeSeed(seed, stored, await spentAt(db, seed.refreshTokenSha));
    const facts = {
      secretKey: o.secretKey,
      source: o.source,
      accountId: seed.account.accountId ?? null,
      refreshTokenSha8: seed.refreshTokenSha.slice(0, 8),
      storedRefreshTokenSha8: stored ? stored.refreshTokenSha.slice(0, 8) : null,
    };
    if (refusal && !o.force) {
      await audit(db, o, seed, `refused_${refusal.reason}`, false).catch((err: Error) =>
        o.logger.warn({ event: 'audit_seed_lost', err: { message: err.message } }, 'could not record a refused seed in broker_refresh_events'),
      );
      o.logger.warn({ event: 'seed_refused', ...facts, refusal }, `refused a seed from ${o.source}: ${describeRefusal(refusal)}. Nothing was stored; force it only if you are sure`);
      return { stored: false as const, refusal };
    }
    await inTransaction(db, async () => {
      await o.store.put(o.secretKey, plaintext, db);
      await audit(db, o, seed, refusal ? 'stored_forced' : 'stored', true);
    });
    o.logger.info(
      { event: 'seeded', ...facts, forced: refusal !== undefined, ...(refusal ? { overrode: refusal } : {}) },
      refusal ? `stored a login from ${o.source}, forced past the stale-seed guard: ${describeRefusal(refusal)}` : `stored a login from ${o.source}`,
    );
    return { stored: true as const, forced: refusal !== undefined, overrode: refusal };
  });
  // withLock only skips fn when not waiting for the lock.
  if (!locked) throw new Error('the refresh lock was not taken');
  return locked.value;
}

function audit(db: PoolClient, o: SeedRequest, seed: Snapshot, outcome: string, stored: boolean): Promise<void> {
  const sha8 = seed.refreshTokenSha.slice(0, 8);
  return recordSeed(db, { secretKey: o.secretKey, replicaId: o.replicaId, source: o.source, outcome, refreshTokenSha8: sha8, storedRefreshTokenSha8: stored ? sha8 : undefined });
}

/** The write and its audit row land together or not at all: an unaudited seed would be invisible. */
async function inTransaction(db: PoolClient, fn: () => Promise<void>): Promise<void> {
  await db.query('BEGIN');
  try {
    await fn();
    await db.query('COMMIT');
  } catch (err) {
    await db.query('ROLLBACK').catch(() => undefined);
    throw err;
  }
}
