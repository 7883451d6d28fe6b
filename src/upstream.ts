import type { Dispatcher } from 'undici';
import { request } from './lib/http-client.js';
import { UpstreamError } from './errors.js';
import { describeNetworkError } from './lib/net-error.js';
import type { RotationResponse } from './auth-json.js';

export const MAX_RESPONSE_BYTES = 1024 * 1024;

const PERMANENT_CODES = new Set([
  'refresh_token_expired',
  'refresh_token_reused',
  'refresh_token_invalidated',
  'token_expired',
  'account_deactivated',
  'invalid_grant',
]);
const PERMANENT_400_PHRASES = ['invalid_grant', 'refresh token already used', 'already been used', 'token has been revoked'];

export interface UpstreamClientOptions {
  url: string;
  clientId: string;
  timeoutMs: number;
  dispatcher?: Dispatcher | undefined;
}

/** The one seam to the upstream token endpoint: one POST, no retries (the caller owns retry policy). */
export type RefreshFn = (refreshToken: string) => Promise<RotationResponse>;

// An error code is an identifier (refresh_token_reused, invalid_grant); anything else
// (prose, an echoed token) is not repeated into messages, logs or /status.
const ERROR_CODE_SHAPE = /^[A-Za-z0-9_.:-]{1,64}$/;

/** The error code an OAuth-ish body names: error.code, a string `error`, or a top-level `code`. */
export function upstreamErrorCode(body: unknown): string | undefined {
  const code = rawErrorCode(body);
  return code !== undefined && ERROR_CODE_SHAPE.test(code) ? code : undefined;
}

function rawErrorCode(body: unknown): string | undefined {
  if (typeof body !== 'object' || body === null) return undefined;
  const b = body as Record<string, unknown>;
  const err = b['error'];
  if (typeof err === 'object' && err !== null) {
    const c = (err as Record<string, unknown>)['code'];
    if (typeof c === 'string') return c;
  }
  if (typeof err === 'string') return err;
  if (typeof b['code'] === 'string') return b['code'];
  return undefined;
}

export function parseRetryAfter(value: string | string[] | undefined, nowMs: number): number | undefined {
  const v = Array.isArray(value) ? value[0] : value;
  if (!v) return undefined;
  if (/^\d+$/.test(v.trim())) return Number(v.trim()) * 1000;
  // An HTTP-date names a day or month; V8's Date.parse would also read "1.5" or "-1" as dates.
  if (!/[A-Za-z]/.test(v)) return undefined;
  const at = Date.parse(v);
  return Number.isNaN(at) ? undefined : Math.max(0, at - nowMs);
}

/**
 * Classify a non-200 answer. By code first, then by status: the upstream answers 401
 * or 400 for the same code, and a permanent failure must latch whichever it uses.
 */
export function classifyFailure(status: number, text: string, retryAfterMs: number | undefined): UpstreamError {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    body = undefined;
  }
  const code = upstreamErrorCode(body);
  const details = { status, upstreamCode: code, retryAfterMs };
  if (status >= 400 && status < 500) {
    if (code && PERMANENT_CODES.has(code)) return new UpstreamError('permanent', `upstream refused the refresh token (${status} ${code})`, details);
    if (status === 401 || status === 403) return new UpstreamError('permanent', `upstream refused the refresh token (${status})`, details);
    if (status === 400) {
      const lower = text.toLowerCase();
      if (PERMANENT_400_PHRASES.some((p) => lower.includes(p))) {
        return new UpstreamError('permanent', `upstream refused the refresh token (400 ${code ?? 'invalid_grant'})`, details);
      }
    }
  }
  return new UpstreamError('transient', `upstream answered ${status}${code ? ` ${code}` : ''}`, details);
}

function looksLikeJwt(v: string): boolean {
  return v.split('.').length === 3;
}

/** A 200 is only a rotation when it carries a usable access token; anything else is transient. */
export function parseRotation(text: string): RotationResponse {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    throw new UpstreamError('transient', 'upstream answered 200 with a body that is not JSON', { status: 200 });
  }
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw new UpstreamError('transient', 'upstream answered 200 with a body that is not a JSON object', { status: 200 });
  }
  const b = body as Record<string, unknown>;
  if (b['error'] !== undefined) {
    throw new UpstreamError('transient', `upstream answered 200 carrying an error${upstreamErrorCode(b) ? ` (${upstreamErrorCode(b)})` : ''}`, {
      status: 200,
      upstreamCode: upstreamErrorCode(b),
    });
  }
  const at = b['access_token'];
  if (typeof at !== 'string' || at === '') throw new UpstreamError('transient', 'upstream answered 200 without an access_token', { status: 200 });
  if (!looksLikeJwt(at)) throw new UpstreamError('transient', 'upstream answered 200 with an access_token that is not a JWT', { status: 200 });
  const str = (v: unknown) => (typeof v === 'string' && v !== '' ? v : undefined);
  return { access_token: at, refresh_token: str(b['refresh_token']), id_token: str(b['id_token']) };
}

export async function readCapped(body: AsyncIterable<Buffer>, cap: number): Promise<string | undefined> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of body) {
    size += chunk.length;
    if (size > cap) return undefined;
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

/** The one secret this client knows is the token it sent: an upstream echo of it never reaches a message or a code. */
function redact(err: UpstreamError, token: string): UpstreamError {
  if (token === '' || (!err.message.includes(token) && !err.upstreamCode?.includes(token))) return err;
  return new UpstreamError(err.kind, err.message.replaceAll(token, '[redacted]'), {
    status: err.status,
    upstreamCode: err.upstreamCode?.includes(token) ? undefined : err.upstreamCode,
    retryAfterMs: err.retryAfterMs,
    cause: err.cause,
  });
}

export function createUpstreamClient(opts: UpstreamClientOptions, now: () => number = Date.now): RefreshFn {
  return async (refreshToken) => {
    try {
      return await refreshOnce(opts, now, refreshToken);
    } catch (err) {
      throw err instanceof UpstreamError ? redact(err, refreshToken) : err;
    }
  };
}

/** Revoke a refresh token upstream (RFC 7009): resolves on a 2xx, throws UpstreamError otherwise. One POST, no retries. */
export type RevokeFn = (refreshToken: string) => Promise<void>;

/** The revocation endpoint beside the token endpoint, where codex's own logout sends it. */
export function revokeUrlFor(tokenUrl: string): string {
  return new URL('/oauth/revoke', tokenUrl).toString();
}

/** opts.url is the revocation endpoint (revokeUrlFor); the same timeout, size cap and redaction as a refresh. */
export function createRevokeClient(opts: UpstreamClientOptions, now: () => number = Date.now): RevokeFn {
  return async (refreshToken) => {
    try {
      const res = await postJson(opts, { token: refreshToken, token_type_hint: 'refresh_token', client_id: opts.clientId });
      if (res.status >= 200 && res.status < 300) return;
      throw classifyFailure(res.status, res.text, parseRetryAfter(res.retryAfter, now()));
    } catch (err) {
      throw err instanceof UpstreamError ? redact(err, refreshToken) : err;
    }
  };
}

async function refreshOnce(opts: UpstreamClientOptions, now: () => number, refreshToken: string): Promise<RotationResponse> {
  const res = await postJson(opts, { grant_type: 'refresh_token', client_id: opts.clientId, refresh_token: refreshToken });
  if (res.status === 200) return parseRotation(res.text);
  throw classifyFailure(res.status, res.text, parseRetryAfter(res.retryAfter, now()));
}

/** One JSON POST with a deadline over the whole exchange and a cap on the answer; every failure is transient. */
async function postJson(opts: UpstreamClientOptions, payload: Record<string, string>): Promise<{ status: number; text: string; retryAfter: string | string[] | undefined }> {
  const signal = AbortSignal.timeout(opts.timeoutMs);
  let res: Dispatcher.ResponseData;
  try {
    res = await request(opts.url, {
      method: 'POST',
      dispatcher: opts.dispatcher,
      signal,
      headers: { 'content-type': 'application/json', accept: 'application/json' },
      body: JSON.stringify(payload),
      headersTimeout: opts.timeoutMs,
      bodyTimeout: opts.timeoutMs,
    });
  } catch (err) {
    const timedOut = signal.aborted;
    throw new UpstreamError(
      'transient',
      timedOut ? `upstream did not answer within ${opts.timeoutMs} ms (${describeNetworkError(err, opts.url, true)})` : `upstream unreachable: ${describeNetworkError(err, opts.url)}`,
      { cause: err },
    );
  }
  let text: string | undefined;
  try {
    text = await readCapped(res.body, MAX_RESPONSE_BYTES);
  } catch (err) {
    throw new UpstreamError('transient', signal.aborted ? `upstream body not read within ${opts.timeoutMs} ms` : 'upstream body read failed', {
      status: res.statusCode,
      cause: err,
    });
  }
  if (text === undefined) {
    res.body.destroy();
    throw new UpstreamError('transient', `upstream answered ${res.statusCode} with a body over ${MAX_RESPONSE_BYTES} bytes`, { status: res.statusCode });
  }
  return { status: res.statusCode, text, retryAfter: res.headers['retry-after'] };
}
