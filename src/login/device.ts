import { setTimeout as sleepFor } from 'node:timers/promises';
import { LoginError } from './errors.js';
import { issuerBase, jsonObject, nonEmptyString, postToIssuer, type IssuerOptions } from './issuer.js';

/** A device code is valid for 15 minutes; codex gives up after as long. */
export const LOGIN_TTL_MS = 15 * 60_000;
const DEFAULT_INTERVAL_S = 5;
const MAX_INTERVAL_S = 60;

export interface DeviceCode {
  /** Secret: with the user code it claims the login once approved. */
  deviceAuthId: string;
  /** Shown to the operator, who types it at the verification URL. */
  userCode: string;
  intervalMs: number;
}

export function verificationUri(o: Pick<IssuerOptions, 'issuer'>): string {
  return `${issuerBase(o)}/codex/device`;
}

/** The redirect URI the device flow's code exchange names (device_code_auth.rs). */
export function deviceRedirectUri(o: Pick<IssuerOptions, 'issuer'>): string {
  return `${issuerBase(o)}/deviceauth/callback`;
}

/** The server sends the interval as a string of seconds ("5"); a number is taken too. */
export function parseInterval(v: unknown): number {
  const n = typeof v === 'number' ? v : typeof v === 'string' && /^\s*\d+\s*$/.test(v) ? Number(v) : NaN;
  const s = Number.isFinite(n) ? Math.min(Math.max(n, 1), MAX_INTERVAL_S) : DEFAULT_INTERVAL_S;
  return s * 1000;
}

/** `POST {issuer}/api/accounts/deviceauth/usercode`; a 404 means device login is not enabled. */
export async function requestDeviceCode(o: IssuerOptions, signal?: AbortSignal): Promise<DeviceCode> {
  const res = await postToIssuer(o, '/api/accounts/deviceauth/usercode', { json: { client_id: o.clientId } }, signal);
  if (res.status === 404) {
    throw new LoginError(
      'device_login_unavailable',
      'the issuer has device login turned off for this account (404): allow device code login in the account\'s security settings (ChatGPT settings, Security), or log in with --browser (API: {"method":"browser"})',
    );
  }
  const body = jsonObject(res.text);
  if (res.status !== 200) {
    throw new LoginError('issuer_error', `the issuer answered ${res.status} when asked for a device code: retry later, or log in with --browser`, { transient: res.status >= 500 || res.status === 429 });
  }
  const deviceAuthId = nonEmptyString(body?.['device_auth_id']);
  const userCode = nonEmptyString(body?.['user_code']) ?? nonEmptyString(body?.['usercode']);
  if (!deviceAuthId || !userCode) throw new LoginError('issuer_error', "the issuer's device-code answer lacks device_auth_id or user_code");
  return { deviceAuthId, userCode, intervalMs: parseInterval(body?.['interval']) };
}

export type DevicePoll = { kind: 'pending' } | { kind: 'approved'; authorizationCode: string; codeVerifier: string };

/**
 * One poll of `POST {issuer}/api/accounts/deviceauth/token`: 403 and 404 mean the code was
 * not entered yet. A 5xx, 429 or network error is transient (the caller polls again);
 * any other status ends the login, as it does in codex.
 */
export async function pollDeviceCode(o: IssuerOptions, code: Pick<DeviceCode, 'deviceAuthId' | 'userCode'>, signal?: AbortSignal): Promise<DevicePoll> {
  const res = await postToIssuer(o, '/api/accounts/deviceauth/token', { json: { device_auth_id: code.deviceAuthId, user_code: code.userCode } }, signal);
  if (res.status === 403 || res.status === 404) return { kind: 'pending' };
  if (res.status !== 200) {
    throw new LoginError('issuer_error', `the issuer answered ${res.status} while waiting for the code to be entered: start a new login`, { transient: res.status >= 500 || res.status === 429 });
  }
  const body = jsonObject(res.text);
  const authorizationCode = nonEmptyString(body?.['authorization_code']);
  const codeVerifier = nonEmptyString(body?.['code_verifier']);
  if (!authorizationCode || !codeVerifier) throw new LoginError('issuer_error', "the issuer's device approval lacks authorization_code or code_verifier: start a new login");
  return { kind: 'approved', authorizationCode, codeVerifier };
}

export interface WaitOptions {
  /** Epoch ms after which the code is dead. */
  deadline: number;
  signal?: AbortSignal | undefined;
  now?: () => number;
  sleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
  /** Told of each transient failure (the poll goes on). */
  onTransient?: (err: LoginError) => void;
}

/** Poll at the server's interval until the code is entered, the deadline passes, or the signal aborts. */
export async function waitForDeviceApproval(o: IssuerOptions, code: DeviceCode, w: WaitOptions): Promise<Extract<DevicePoll, { kind: 'approved' }>> {
  const now = w.now ?? Date.now;
  const sleep = w.sleep ?? ((ms: number, signal?: AbortSignal) => sleepFor(ms, undefined, { signal }));
  for (;;) {
    const wait = Math.min(code.intervalMs, w.deadline - now());
    if (wait <= 0) break;
    try {
      await sleep(wait, w.signal);
    } catch (err) {
      if (w.signal?.aborted) throw new LoginError('cancelled', 'the login was cancelled', { cause: err });
      throw err;
    }
    if (now() >= w.deadline) break;
    try {
      const r = await pollDeviceCode(o, code, w.signal);
      if (r.kind === 'approved') return r;
    } catch (err) {
      if (!(err instanceof LoginError) || !err.transient) throw err;
      w.onTransient?.(err);
    }
  }
  throw new LoginError('expired', 'the code was not entered within 15 minutes: start a new login');
}
