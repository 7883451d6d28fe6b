import { decodeJwt } from 'jose/jwt/decode';
import { AuthJsonError } from './errors.js';
import { isEpochSeconds, MAX_EPOCH_SECONDS } from './lib/time.js';

export type JsonObject = Record<string, unknown>;
export type Shape = 'nested' | 'flat';

export interface TokenSet {
  access_token?: string;
  refresh_token?: string;
  id_token?: string;
  account_id?: string;
}

export interface ParsedCredential {
  doc: JsonObject;
  shape: Shape;
  tokens: TokenSet;
}

const TOKEN_FIELDS = ['access_token', 'refresh_token', 'id_token', 'account_id'] as const;
export const MAX_DOCUMENT_BYTES = 1024 * 1024;

function isObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function pickTokens(source: JsonObject): TokenSet {
  const out: TokenSet = {};
  for (const f of TOKEN_FIELDS) {
    const v = source[f];
    if (typeof v === 'string' && v !== '') out[f] = v;
  }
  return out;
}

/**
 * The original refresher's reading: tokens from nested `{"tokens":{...}}` or, failing
 * that, flat top-level fields. Lenient on purpose: the refresher must keep working with
 * whatever the platform stored; strict checks belong to seeding (validateSeed).
 */
export function parseCredential(blob: string): ParsedCredential {
  let doc: unknown;
  try {
    doc = JSON.parse(blob);
  } catch {
    throw new AuthJsonError('document', 'is not valid JSON');
  }
  if (!isObject(doc)) throw new AuthJsonError('document', 'must be a JSON object');
  const nested = doc['tokens'];
  if (isObject(nested)) {
    const tokens = pickTokens(nested);
    if (tokens.refresh_token !== undefined || tokens.access_token !== undefined) return { doc, shape: 'nested', tokens };
  }
  return { doc, shape: 'flat', tokens: pickTokens(doc) };
}

export interface RotationResponse {
  access_token: string;
  refresh_token?: string | undefined;
  id_token?: string | undefined;
}

/**
 * Merge an upstream answer into the stored document in place of the old tokens,
 * keeping the shape and every other field (codex adds fields over time). An empty or
 * missing field in the answer never clobbers the stored one. `last_refresh` moves to
 * now: codex refreshes by itself when it is older than 8 days, which would burn the
 * fleet's refresh token.
 */
export function mergeRotation(parsed: ParsedCredential, answer: RotationResponse, now: Date): JsonObject {
  const doc = structuredClone(parsed.doc);
  let target: JsonObject = doc;
  if (parsed.shape === 'nested') {
    target = doc['tokens'] as JsonObject;
  }
  for (const f of ['access_token', 'refresh_token', 'id_token'] as const) {
    const v = answer[f];
    if (typeof v === 'string' && v !== '') target[f] = v;
  }
  doc['last_refresh'] = now.toISOString();
  return doc;
}

function hasProtoKey(v: unknown, depth = 0): boolean {
  if (depth > 32) return true;
  if (Array.isArray(v)) return v.some((x) => hasProtoKey(x, depth + 1));
  if (!isObject(v)) return false;
  for (const k of Object.keys(v)) {
    if (k === '__proto__' || k === 'constructor' || k === 'prototype') return true;
    if (hasProtoKey(v[k], depth + 1)) return true;
  }
  return false;
}

function jwtPayload(token: string): JsonObject | undefined {
  if (token.split('.').length !== 3) return undefined;
  try {
    return decodeJwt(token) as JsonObject;
  } catch {
    return undefined;
  }
}

/**
 * exp and iat, when present, must be numbers of seconds from 1970 to 2100. Out of range
 * they are corrupt, not dates: the broker would schedule by them and format them. Both
 * tokens are checked: the id_token is served to codex, which parses its claims, and a
 * real login never carries such values, so a document that does is not one to store.
 */
function checkTimeClaims(field: string, claims: JsonObject | undefined): void {
  for (const claim of ['exp', 'iat'] as const) {
    if (claims === undefined || !Object.hasOwn(claims, claim)) continue;
    if (!isEpochSeconds(claims[claim])) {
      throw new AuthJsonError(`${field}.${claim}`, `must be a number of seconds from 0 to ${MAX_EPOCH_SECONDS} (1970 to 2100) when present`);
    }
  }
}

/**
 * Strict validation of a login about to be stored (seed, PUT /admin/credential): what
 * codex itself needs to accept the file. Throws AuthJsonError naming the field.
 */
export function validateSeed(input: string | unknown): ParsedCredential {
  let doc: unknown = input;
  if (typeof input === 'string') {
    if (Buffer.byteLength(input) > MAX_DOCUMENT_BYTES) throw new AuthJsonError('document', `is larger than ${MAX_DOCUMENT_BYTES} bytes`);
    try {
      doc = JSON.parse(input);
    } catch {
      throw new AuthJsonError('document', 'is not valid JSON');
    }
  }
  if (!isObject(doc)) throw new AuthJsonError('document', 'must be a JSON object (an auth.json file)');
  if (hasProtoKey(doc)) throw new AuthJsonError('document', 'must not contain __proto__, constructor or prototype keys');
  const tokens = doc['tokens'];
  if (!isObject(tokens)) throw new AuthJsonError('tokens', 'is missing or not an object (expected {"tokens": {...}} as codex writes it)');
  const rt = tokens['refresh_token'];
  if (typeof rt !== 'string' || rt.trim() === '') throw new AuthJsonError('tokens.refresh_token', 'must be a non-empty string');
  const at = tokens['access_token'];
  if (typeof at !== 'string' || !jwtPayload(at)) throw new AuthJsonError('tokens.access_token', 'must be a three-part JWT with a JSON payload');
  const id = tokens['id_token'];
  if (typeof id !== 'string' || !jwtPayload(id)) throw new AuthJsonError('tokens.id_token', 'must be a three-part JWT with a JSON payload (codex rejects the file otherwise)');
  checkTimeClaims('tokens.access_token', jwtPayload(at));
  checkTimeClaims('tokens.id_token', jwtPayload(id));
  const acct = tokens['account_id'];
  if (acct !== undefined && acct !== null && typeof acct !== 'string') throw new AuthJsonError('tokens.account_id', 'must be a string when present');
  const lr = doc['last_refresh'];
  if (lr !== undefined && lr !== null && (typeof lr !== 'string' || !isEpochSeconds(Date.parse(lr) / 1000))) {
    throw new AuthJsonError('last_refresh', 'must be an RFC 3339 timestamp from 1970 to 2100 when present');
  }
  return { doc, shape: 'nested', tokens: pickTokens(tokens) };
}

export interface AccountInfo {
  accountId: string | undefined;
  planType: string | undefined;
  email: string | undefined;
}

/** Non-secret facts for /status, read from the id_token's claims (unverified). */
export function accountInfo(tokens: TokenSet): AccountInfo {
  const claims = tokens.id_token ? jwtPayload(tokens.id_token) : undefined;
  const auth = claims && isObject(claims['https://api.openai.com/auth']) ? (claims['https://api.openai.com/auth'] as JsonObject) : {};
  const str = (v: unknown) => (typeof v === 'string' ? v : undefined);
  return {
    accountId: tokens.account_id ?? str(auth['chatgpt_account_id']),
    planType: str(auth['chatgpt_plan_type']),
    email: str(claims?.['email']),
  };
}
