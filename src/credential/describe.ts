import type { Snapshot } from '../credential.js';
import { isoFromMs, isoFromSeconds } from '../lib/time.js';
import type { Latch } from './ledger.js';

/**
 * The part of a credential every reader describes the same way (/status, the CLI's status,
 * the admin API): who the login is, until when its token lives, and whether it is latched.
 * Never a token.
 */
export function describeLogin(snap: Snapshot | undefined, latch: Latch | undefined) {
  return {
    accountId: snap?.account.accountId ?? null,
    planType: snap?.account.planType ?? null,
    accessTokenExpiresAt: isoFromSeconds(snap?.claims.exp),
    latch: latch ? { upstreamStatus: latch.status ?? null, upstreamCode: latch.code ?? null, at: isoFromMs(latch.at.getTime()) } : null,
  };
}
