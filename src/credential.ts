import { createHash } from 'node:crypto';
import { accountInfo, parseCredential, type AccountInfo, type ParsedCredential } from './auth-json.js';
import { accessClaims, isDue, isExpired, type AccessClaims } from './due.js';
import type { CredentialState } from './metrics.js';

/** The credential as last read or rotated: what is served and what /status describes. */
export interface Snapshot {
  /** Stored bytes (ciphertext or plaintext): the compare-and-set guard for the next write. */
  raw: Buffer;
  plaintext: string;
  parsed: ParsedCredential;
  claims: AccessClaims;
  account: AccountInfo;
  lastRefreshMs: number | undefined;
  /** Short, non-reversible name of the refresh token: what latches and logs may carry. */
  refreshTokenSha: string;
}

export function sha256Hex(value: string): string {
  return createHash('sha256').update(value).digest('hex');
}

/** The 8-hex-character prefix of a SHA-256: enough to correlate, useless to an attacker. */
export function shortHash(value: string): string {
  return sha256Hex(value).slice(0, 8);
}

export function buildSnapshot(raw: Buffer, plaintext: string): Snapshot {
  const parsed = parseCredential(plaintext);
  const lr = parsed.doc['last_refresh'];
  const lastRefreshMs = typeof lr === 'string' && !Number.isNaN(Date.parse(lr)) ? Date.parse(lr) : undefined;
  return {
    raw,
    plaintext,
    parsed,
    claims: accessClaims(parsed.tokens.access_token),
    account: accountInfo(parsed.tokens),
    lastRefreshMs,
    refreshTokenSha: parsed.tokens.refresh_token ? sha256Hex(parsed.tokens.refresh_token) : '',
  };
}

export function stateOf(snap: Snapshot | undefined, latched: boolean, nowMs: number, marginSeconds: number): CredentialState {
  if (!snap) return 'absent';
  if (latched) return 'latched';
  if (!snap.parsed.tokens.refresh_token) return 'invalid';
  if (snap.claims.exp !== undefined && isExpired(snap.claims, nowMs)) return 'expired';
  return isDue(snap.claims, nowMs, marginSeconds) ? 'due' : 'fresh';
}
