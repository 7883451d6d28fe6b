import { hash } from 'node:crypto';
import { accountInfo, parseCredential, type AccountInfo, type ParsedCredential } from './auth-json.js';
import { AuthJsonError } from './errors.js';
import { accessClaims, isDue, isExpired, type AccessClaims } from './due.js';
import { isEpochSeconds } from './lib/time.js';
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
  return hash('sha256', value, 'hex');
}

/** The 8-hex-character prefix of a SHA-256: enough to correlate, useless to an attacker. */
export function shortHash(value: string): string {
  return sha256Hex(value).slice(0, 8);
}

/** Deeper than this, a stored document is unreadable: cloning or serialising it would overflow the stack. */
export const MAX_DOCUMENT_DEPTH = 64;

/** Nesting depth, walked without recursion (the point is to refuse what recursion cannot handle). */
function tooDeep(v: unknown): boolean {
  const stack: Array<[unknown, number]> = [[v, 0]];
  while (stack.length > 0) {
    const [x, d] = stack.pop()!;
    if (typeof x !== 'object' || x === null) continue;
    if (d >= MAX_DOCUMENT_DEPTH) return true;
    for (const child of Object.values(x)) stack.push([child, d + 1]);
  }
  return false;
}

export function buildSnapshot(raw: Buffer, plaintext: string): Snapshot {
  const parsed = parseCredential(plaintext);
  if (tooDeep(parsed.doc)) throw new AuthJsonError('document', `is nested deeper than ${MAX_DOCUMENT_DEPTH} levels`);
  const lr = parsed.doc['last_refresh'];
  const lrMs = typeof lr === 'string' ? Date.parse(lr) : Number.NaN;
  // Out of 1970..2100 is as unreadable as garbage: a far-future last_refresh would hold the shim's floor shut.
  const lastRefreshMs = isEpochSeconds(lrMs / 1000) ? lrMs : undefined;
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
  if (isExpired(snap.claims, nowMs)) return 'expired';
  return isDue(snap.claims, nowMs, marginSeconds) ? 'due' : 'fresh';
}

export type Unusable = 'no_credential' | 'token_expired';

/**
 * Why the held credential cannot be served, or undefined when it can: the one rule that
 * GET /codex-auth, the drop-in route and /readyz share, so they never disagree.
 */
export function unusable(snap: Snapshot | undefined, nowMs: number): Unusable | undefined {
  if (!snap || !snap.parsed.tokens.access_token) return 'no_credential';
  // A latched credential whose access token still works is the best the fleet has.
  return isExpired(snap.claims, nowMs) ? 'token_expired' : undefined;
}
