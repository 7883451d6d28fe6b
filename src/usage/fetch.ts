import type { Dispatcher } from 'undici';
import { request } from '../lib/http-client.js';
import { describeNetworkError } from '../lib/net-error.js';
import { readCapped } from '../upstream.js';
import { parseUsage, type UsageSnapshot } from './parse.js';

/**
 * A poll's outcome. A failure carries a short code for /status and the store (`timeout`,
 * `unreachable`, `status_401`, `malformed`, `too_large`) and a detail for the log: the
 * host and cause, or the status. Never a token, never the body.
 */
export type UsageFetchResult = { ok: true; snapshot: UsageSnapshot } | { ok: false; code: string; detail: string };

/** The one seam to the backend for usage (tests may pass a fake). */
export type UsageFetchFn = (accessToken: string, accountId: string | undefined, signal?: AbortSignal) => Promise<UsageFetchResult>;

export interface UsageFetchOptions {
  /** CHATGPT_BASE_URL, e.g. https://chatgpt.com/backend-api */
  baseUrl: string;
  timeoutMs: number;
  dispatcher?: Dispatcher | undefined;
  now?: () => number;
}

/** `{CHATGPT_BASE_URL}/wham/usage`. */
export function usageUrl(baseUrl: string): string {
  return `${baseUrl.replace(/\/+$/, '')}/wham/usage`;
}

/**
 * The one GET of the usage endpoint, as codex itself sends it: the access token and the
 * account id. Shared by the usage poll and the token check before a forced refresh.
 */
export function getUsage(url: string, accessToken: string, accountId: string | undefined, o: { dispatcher?: Dispatcher | undefined; signal: AbortSignal; timeoutMs: number }): Promise<Dispatcher.ResponseData> {
  return request(url, {
    method: 'GET',
    dispatcher: o.dispatcher,
    signal: o.signal,
    headers: {
      authorization: `Bearer ${accessToken}`,
      accept: 'application/json',
      ...(accountId ? { 'chatgpt-account-id': accountId } : {}),
    },
    headersTimeout: o.timeoutMs,
    bodyTimeout: o.timeoutMs,
  });
}

// A usage document is a few hundred bytes; a huge answer is not one.
const MAX_BODY_BYTES = 64 * 1024;

/** `GET {CHATGPT_BASE_URL}/wham/usage` with the access token and account id, as codex itself asks. One GET, no retries. */
export function createUsageFetch(o: UsageFetchOptions): UsageFetchFn {
  const url = usageUrl(o.baseUrl);
  const now = o.now ?? Date.now;
  return async (accessToken, accountId, cancel) => {
    const deadline = AbortSignal.timeout(o.timeoutMs);
    // A shutdown cancels a poll in flight rather than wait out its timeout.
    const signal = cancel ? AbortSignal.any([deadline, cancel]) : deadline;
    let res: Dispatcher.ResponseData;
    try {
      res = await getUsage(url, accessToken, accountId, { dispatcher: o.dispatcher, signal, timeoutMs: o.timeoutMs });
    } catch (err) {
      return { ok: false, code: deadline.aborted ? 'timeout' : 'unreachable', detail: describeNetworkError(err, url, deadline.aborted) };
    }
    let text: string | undefined;
    try {
      text = await readCapped(res.body as AsyncIterable<Buffer>, MAX_BODY_BYTES);
    } catch (err) {
      return { ok: false, code: deadline.aborted ? 'timeout' : 'unreachable', detail: describeNetworkError(err, url, deadline.aborted) };
    }
    if (text === undefined) {
      res.body.destroy();
      return { ok: false, code: 'too_large', detail: `${res.statusCode} with a body over ${MAX_BODY_BYTES} bytes` };
    }
    if (res.statusCode < 200 || res.statusCode >= 300) return { ok: false, code: `status_${res.statusCode}`, detail: String(res.statusCode) };
    let body: unknown;
    try {
      body = JSON.parse(text);
    } catch {
      return { ok: false, code: 'malformed', detail: `${res.statusCode} with a body that is not JSON` };
    }
    const snapshot = parseUsage(body, now() / 1000);
    return snapshot ? { ok: true, snapshot } : { ok: false, code: 'malformed', detail: `${res.statusCode} with no plan and no usage window` };
  };
}
