/**
 * One error base with a stable `code`, so callers `switch (err.code)` instead of
 * matching messages. problem+json is produced from these in exactly one place
 * (http/problem.ts).
 */
export type BrokerErrorCode =
  | 'CONFIG_INVALID'
  | 'ENCRYPTION_KEY_INVALID'
  | 'ENCRYPTION_KEY_MISSING'
  | 'ENCRYPTION_VERSION_UNKNOWN'
  | 'DECRYPT_FAILED'
  | 'AUTH_JSON_INVALID'
  | 'UPSTREAM_PERMANENT'
  | 'UPSTREAM_TRANSIENT'
  | 'STORE_UNAVAILABLE'
  | 'CLIENT_INVALID'
  | 'LOGIN_FAILED';

export class BrokerError extends Error {
  readonly code: BrokerErrorCode;
  constructor(code: BrokerErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BrokerError';
    this.code = code;
  }
}

/** A bad environment variable: the message always names the variable. */
export class ConfigError extends BrokerError {
  readonly variable: string;
  constructor(variable: string, message: string) {
    super('CONFIG_INVALID', `${variable}: ${message}`);
    this.name = 'ConfigError';
    this.variable = variable;
  }
}

/** A credential document that codex (or the broker) could not use; `field` names the culprit. */
export class AuthJsonError extends BrokerError {
  readonly field: string;
  constructor(field: string, message: string) {
    super('AUTH_JSON_INVALID', `${field}: ${message}`);
    this.name = 'AuthJsonError';
    this.field = field;
  }
}

export type UpstreamFailureKind = 'permanent' | 'transient';

/**
 * A failed upstream refresh. Carries what the operator needs (status, upstream code,
 * a short sanitised description) and never the response body verbatim: a body may
 * echo a token.
 */
export class UpstreamError extends BrokerError {
  readonly kind: UpstreamFailureKind;
  readonly status: number | undefined;
  readonly upstreamCode: string | undefined;
  readonly retryAfterMs: number | undefined;
  constructor(
    kind: UpstreamFailureKind,
    message: string,
    details: { status?: number; upstreamCode?: string; retryAfterMs?: number; cause?: unknown } = {},
  ) {
    super(kind === 'permanent' ? 'UPSTREAM_PERMANENT' : 'UPSTREAM_TRANSIENT', message, { cause: details.cause });
    this.name = 'UpstreamError';
    this.kind = kind;
    this.status = details.status;
    this.upstreamCode = details.upstreamCode;
    this.retryAfterMs = details.retryAfterMs;
  }
}
