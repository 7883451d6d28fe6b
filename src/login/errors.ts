import { BrokerError } from '../errors.js';

/** Why a login did not complete: what the CLI and the admin API tell the operator to do next. */
export type LoginFailure =
  | 'device_login_unavailable'
  | 'expired'
  | 'cancelled'
  | 'state_mismatch'
  | 'authorization_denied'
  | 'bad_callback'
  | 'exchange_failed'
  | 'issuer_unreachable'
  | 'issuer_error'
  | 'invalid_login'
  // The stale-seed guard: the login's refresh token was already spent, or it is older than the stored login of its account.
  | 'stale_login'
  // The request, not the login: no such credential or login, one already in progress,
  // a login already finished, a callback already being handled, a callback for a device login.
  | 'unknown_credential'
  | 'unknown_login'
  | 'login_in_progress'
  | 'login_finished'
  | 'login_busy'
  | 'wrong_method';

/**
 * A login that cannot go on. Messages say what happened and what to do, and never carry
 * a verifier, a code, a device_auth_id or a token (issuer bodies are never quoted).
 */
export class LoginError extends BrokerError {
  readonly reason: LoginFailure;
  /** Worth retrying the same step (a network error, a 5xx): device polling keeps going. */
  readonly transient: boolean;
  constructor(reason: LoginFailure, message: string, opts: { transient?: boolean; cause?: unknown } = {}) {
    super('LOGIN_FAILED', message, { cause: opts.cause });
    this.name = 'LoginError';
    this.reason = reason;
    this.transient = opts.transient === true;
  }
}
