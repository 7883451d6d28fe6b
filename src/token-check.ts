import type { Dispatcher } from 'undici';
import { describeNetworkError } from './lib/net-error.js';
import { getUsage, usageUrl } from './usage/fetch.js';

/**
 * What the backend said of an access token: `accepted` (it answered 2xx), `rejected` (401
 * or 403), or `unknown` (anything else: down, slow, 404, 5xx). Only `rejected` may lead
 * to a forced rotation.
 */
export type TokenVerdict = 'accepted' | 'rejected' | 'unknown';

export interface TokenCheckResult {
  verdict: TokenVerdict;
  /** The backend's status, or a short cause (`timeout`, `ECONNREFUSED`): never a token. */
  detail: string;
}

/** The one seam to the backend for this question (tests pass a fake). */
export type TokenCheckFn = (accessToken: string, accountId: string | undefined) => Promise<TokenCheckResult>;

export interface BackendCheckOptions {
  /** CHATGPT_BASE_URL, e.g. https://chatgpt.com/backend-api */
  baseUrl: string;
  timeoutMs: number;
  dispatcher?: Dispatcher | undefined;
}

const MAX_BODY_BYTES = 64 * 1024;

/**
 * Ask the backend whether it accepts an access token: `GET {CHATGPT_BASE_URL}/wham/usage`,
 * the cheapest authenticated call codex itself makes, with the token and the account id.
 * The answer's body is drained (bounded) and ignored.
 */
export function createBackendTokenCheck(o: BackendCheckOptions): TokenCheckFn {
  const url = usageUrl(o.baseUrl);
  return async (accessToken, accountId) => {
    const signal = AbortSignal.timeout(o.timeoutMs);
    let res: Dispatcher.ResponseData;
    try {
      res = await getUsage(url, accessToken, accountId, { dispatcher: o.dispatcher, signal, timeoutMs: o.timeoutMs });
    } catch (err) {
      return { verdict: 'unknown', detail: describeNetworkError(err, url, signal.aborted) };
    }
    let size = 0;
    try {
      for await (const chunk of res.body) {
        size += (chunk as Buffer).length;
        if (size > MAX_BODY_BYTES) {
          res.body.destroy();
          break;
        }
      }
    } catch {
      // The status is the answer; a broken body changes nothing.
    }
    const s = res.statusCode;
    if (s === 401 || s === 403) return { verdict: 'rejected', detail: String(s) };
    if (s >= 200 && s < 300) return { verdict: 'accepted', detail: String(s) };
    return { verdict: 'unknown', detail: String(s) };
  };
}

export interface TokenVerifierOptions {
  check: TokenCheckFn;
  /** How long a verdict on one token is reused (a storm of callers costs one backend call). */
  ttlMs: number;
  now?: () => number;
}

interface Entry {
  token: string;
  at: number;
  result: Promise<TokenCheckResult>;
}

/**
 * Verdicts on the current access token, shared: one backend call in flight per token, its
 * verdict reused for ttlMs, so 1,000 callers reporting the same token rejected cost one
 * GET. Only the latest token is remembered: the broker holds one current token at a time.
 */
export class TokenVerifier {
  readonly #o: TokenVerifierOptions;
  readonly #now: () => number;
  #entry: Entry | undefined;

  constructor(o: TokenVerifierOptions) {
    this.#o = o;
    this.#now = o.now ?? Date.now;
  }

  verify(accessToken: string, accountId: string | undefined): Promise<TokenCheckResult> {
    const now = this.#now();
    const e = this.#entry;
    if (e && e.token === accessToken && now - e.at < this.#o.ttlMs) return e.result;
    const result = this.#o.check(accessToken, accountId).catch((err: Error): TokenCheckResult => ({ verdict: 'unknown', detail: err.name }));
    this.#entry = { token: accessToken, at: now, result };
    return result;
  }
}
