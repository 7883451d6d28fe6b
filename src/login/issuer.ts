import type { Dispatcher } from 'undici';
import { request } from '../lib/http-client.js';
import { MAX_RESPONSE_BYTES, readCapped } from '../upstream.js';
import { LoginError } from './errors.js';

/** Where and how the broker talks to the OAuth issuer (OAUTH_ISSUER), as codex does. */
export interface IssuerOptions {
  /** OAUTH_ISSUER, e.g. https://auth.openai.com (a trailing slash is ignored). */
  issuer: string;
  clientId: string;
  timeoutMs: number;
  dispatcher?: Dispatcher | undefined;
}

export interface IssuerAnswer {
  status: number;
  text: string;
}

export function issuerBase(o: Pick<IssuerOptions, 'issuer'>): string {
  return o.issuer.replace(/\/+$/, '');
}

/**
 * One POST to the issuer: a timeout, a capped body, no retries. A network error names the
 * host and the cause; the body is handed back for the caller to parse, never put in a message.
 */
export async function postToIssuer(o: IssuerOptions, path: string, body: { json: unknown } | { form: Record<string, string> }, signal?: AbortSignal): Promise<IssuerAnswer> {
  const url = `${issuerBase(o)}${path}`;
  const timeout = AbortSignal.timeout(o.timeoutMs);
  const combined = signal ? AbortSignal.any([signal, timeout]) : timeout;
  const host = new URL(url).host;
  let res: Dispatcher.ResponseData;
  try {
    res = await request(url, {
      method: 'POST',
      dispatcher: o.dispatcher,
      signal: combined,
      headers: { 'content-type': 'json' in body ? 'application/json' : 'application/x-www-form-urlencoded', accept: 'application/json' },
      body: 'json' in body ? JSON.stringify(body.json) : new URLSearchParams(body.form).toString(),
      headersTimeout: o.timeoutMs,
      bodyTimeout: o.timeoutMs,
    });
  } catch (err) {
    if (signal?.aborted) throw new LoginError('cancelled', 'the login was cancelled', { cause: err });
    const cause = timeout.aborted ? `no answer within ${o.timeoutMs} ms` : ((err as NodeJS.ErrnoException).code ?? (err as Error).name);
    throw new LoginError('issuer_unreachable', `could not reach the issuer at ${host} (${cause}); check OAUTH_ISSUER, HTTPS_PROXY and the network`, { transient: true, cause: err });
  }
  let text: string | undefined;
  try {
    text = await readCapped(res.body, MAX_RESPONSE_BYTES);
  } catch (err) {
    throw new LoginError('issuer_unreachable', `the issuer at ${host} did not finish its answer`, { transient: true, cause: err });
  }
  if (text === undefined) {
    res.body.destroy();
    throw new LoginError('issuer_error', `the issuer at ${host} answered ${res.statusCode} with a body over ${MAX_RESPONSE_BYTES} bytes`, { transient: true });
  }
  return { status: res.statusCode, text };
}

/** A JSON object body, or undefined. */
export function jsonObject(text: string): Record<string, unknown> | undefined {
  try {
    const v: unknown = JSON.parse(text);
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

export function nonEmptyString(v: unknown): string | undefined {
  return typeof v === 'string' && v !== '' ? v : undefined;
}
