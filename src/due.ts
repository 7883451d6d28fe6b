import { decodeJwt } from 'jose/jwt/decode';
import { isEpochSeconds } from './lib/time.js';

export interface AccessClaims {
  exp: number | undefined;
  iat: number | undefined;
}

/**
 * exp/iat of a JWT, WITHOUT verifying the signature: the broker only schedules by them.
 * A claim outside 1970..2100 is unreadable (undefined), like a missing one: whatever a
 * stored document holds, nothing downstream formats or compares a nonsense date.
 */
export function accessClaims(token: string | undefined): AccessClaims {
  if (!token) return { exp: undefined, iat: undefined };
  try {
    const c = decodeJwt(token);
    const num = (v: unknown) => (isEpochSeconds(v) ? v : undefined);
    return { exp: num(c.exp), iat: num(c.iat) };
  } catch {
    return { exp: undefined, iat: undefined };
  }
}

/**
 * Lead time before expiry at which a refresh is due: min(margin, lifetime / 2). The
 * half keeps short-lived tokens from being refreshed on every check; the margin leaves
 * a day of retries before an upstream outage can expire the fleet's token.
 */
export function refreshLeadSeconds(claims: AccessClaims, marginSeconds: number): number {
  if (claims.exp !== undefined && claims.iat !== undefined && claims.exp > claims.iat) {
    return Math.min(marginSeconds, (claims.exp - claims.iat) / 2);
  }
  return marginSeconds;
}

/** No readable exp means due: the original refresher's rule. */
export function isDue(claims: AccessClaims, nowMs: number, marginSeconds: number): boolean {
  if (claims.exp === undefined) return true;
  return claims.exp - nowMs / 1000 < refreshLeadSeconds(claims, marginSeconds);
}

/**
 * The one definition of "expired", for serving, readiness, state and the shim: only a
 * readable exp that has passed. A token with no readable exp is served, as codex itself
 * keeps using one (it then goes by last_refresh); isDue makes the broker rotate it at once.
 */
export function isExpired(claims: AccessClaims, nowMs: number): boolean {
  return claims.exp !== undefined && claims.exp <= nowMs / 1000;
}
