import { recordIntent, recordOutcome } from './audit.js';
import { buildSnapshot, type Snapshot } from './credential.js';
import { UpstreamError } from './errors.js';
import type { Logger } from './logger.js';
import type { BrokerMetrics } from './metrics.js';
import { writeLatch, type Latch } from './refresh-guards.js';
import type { SecretStore } from './secret-store.js';
import type { RevokeFn } from './upstream.js';

export interface RevokeRequest {
  store: SecretStore;
  secretKey: string;
  revoke: RevokeFn;
  replicaId: string;
  logger: Logger;
  metrics: BrokerMetrics;
  now?: () => number;
}

export type RevokeReport =
  | { outcome: 'revoked'; latch: Latch }
  | { outcome: 'absent' }
  | { outcome: 'revoke_failed'; kind: 'permanent' | 'transient'; message: string; upstreamStatus: number | undefined; upstreamCode: string | undefined };

/**
 * An operator's explicit revocation of the stored login upstream. Under the refresh lock:
 * no replica is mid-POST with the token, and the latch written before the lock is released
 * keeps every replica from ever sending it again (the upstream now answers it with
 * refresh_token_invalidated). A failed revocation latches nothing: the login keeps working
 * and the operator may retry. Audited before the POST, like a refresh.
 */
export async function revokeStoredLogin(o: RevokeRequest): Promise<RevokeReport> {
  const now = o.now ?? Date.now;
  const locked = await o.store.withLock(o.secretKey, true, async (db): Promise<RevokeReport> => {
    const row = await o.store.read(o.secretKey, db);
    let snap: Snapshot | undefined;
    try {
      snap = row ? buildSnapshot(row.raw, o.store.decrypt(row)) : undefined;
    } catch {
      snap = undefined;
    }
    const token = snap?.parsed.tokens.refresh_token;
    if (!snap || !token) return { outcome: 'absent' };
    const eventId = await recordIntent(db, { secretKey: o.secretKey, replicaId: o.replicaId, reason: 'revoke', kind: 'revoke', source: 'admin', refreshTokenSha256: snap.refreshTokenSha });
    const started = Date.now();
    try {
      await o.revoke(token);
    } catch (err) {
      const ue = err instanceof UpstreamError ? err : new UpstreamError('transient', `revocation failed: ${(err as Error).message}`);
      await recordOutcome(db, eventId, { outcome: 'revoke_failed', status: ue.status, code: ue.upstreamCode, durationMs: Date.now() - started }).catch(() => undefined);
      o.logger.error(
        { event: 'revoke_failed', secretKey: o.secretKey, status: ue.status, upstreamCode: ue.upstreamCode, refreshTokenSha8: snap.refreshTokenSha.slice(0, 8) },
        `the upstream did not revoke the login (${ue.message}); it is unchanged and still in use. Retry POST /admin/credentials/default/revoke`,
      );
      return { outcome: 'revoke_failed', kind: ue.kind, message: ue.message, upstreamStatus: ue.status, upstreamCode: ue.upstreamCode };
    }
    // What the upstream now answers a refresh of this token with, so the shim tells codex the same.
    const latch: Latch = { refreshTokenSha: snap.refreshTokenSha, status: undefined, code: 'refresh_token_invalidated', at: new Date(now()) };
    await writeLatch(db, o.secretKey, latch, o.replicaId).catch((err: Error) =>
      // The upstream refuses the token anyway: the next replica to try latches it itself.
      o.logger.warn({ event: 'latch_not_shared', err: { message: err.message } }, 'could not record the latch for other replicas'),
    );
    await recordOutcome(db, eventId, { outcome: 'revoked', status: 200, durationMs: Date.now() - started }).catch((err: Error) =>
      o.logger.warn({ event: 'audit_outcome_lost', eventId, err: { message: err.message } }, 'could not record the outcome of a revocation in broker_refresh_events'),
    );
    o.metrics.revocations.inc({ source: 'admin' });
    o.logger.warn(
      { event: 'revoked', secretKey: o.secretKey, source: 'admin', refreshTokenSha8: snap.refreshTokenSha.slice(0, 8) },
      'revoked the stored login upstream at an operator\'s request and latched it: no replica will refresh it again. Log in again and seed a new login',
    );
    return { outcome: 'revoked', latch };
  });
  if (!locked) throw new Error('the refresh lock was not taken');
  return locked.value;
}
