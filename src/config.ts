import { hostname } from 'node:os';
import { ConfigError, BrokerError } from './errors.js';
import { parseEncryptionKey } from './lib/secret-crypto.js';

// The environment's schema: a type, bounds, a default and the expectation a refusal quotes.
// (TypeBox did this until session 10: it cost the process 2 MB of heap and about 8 MB of
// RSS for its whole life, to check about 40 variables once at start.)
interface NumberVariable {
  readonly type: 'number' | 'integer';
  readonly description: string;
  readonly default?: number;
  readonly minimum?: number;
  readonly exclusiveMinimum?: number;
  readonly maximum?: number;
}
interface StringVariable {
  readonly type: 'string';
  readonly description: string;
  readonly default?: string;
  readonly minLength?: number;
  readonly maxLength?: number;
}
interface BooleanVariable {
  readonly type: 'boolean';
  readonly description: string;
  readonly default?: boolean;
}
interface ChoiceVariable<C extends string = string> {
  readonly type: 'choice';
  readonly description: string;
  readonly choices: readonly C[];
  readonly default?: C;
}
type Variable = NumberVariable | StringVariable | BooleanVariable | ChoiceVariable;
/** A variable with no default: unset, it stays undefined. */
type Optional<V extends Variable> = V & { readonly optional: true };

const num = <O extends Omit<NumberVariable, 'type'>>(o: O) => ({ type: 'number' as const, ...o });
const int = <O extends Omit<NumberVariable, 'type'>>(o: O) => ({ type: 'integer' as const, ...o });
const str = <O extends Omit<StringVariable, 'type'>>(o: O) => ({ type: 'string' as const, ...o });
const bool = <O extends Omit<BooleanVariable, 'type'>>(o: O) => ({ type: 'boolean' as const, ...o });
const choice = <const C extends string>(choices: readonly C[], o: { default: NoInfer<C>; description: string }): ChoiceVariable<C> => ({ type: 'choice', choices, ...o });
const optional = <V extends Variable>(v: V): Optional<V> => ({ ...v, optional: true });

const Seconds = (dflt: number, description: string) =>
  num({ exclusiveMinimum: 0, maximum: 31_536_000, default: dflt, description: `${description} (seconds, > 0)` });

const HttpSeconds = (dflt: number, description: string) =>
  num({ exclusiveMinimum: 0, maximum: 3_600, default: dflt, description: `${description} (seconds, > 0, at most 3600)` });

/** Every variable the broker reads. Defaults and expectations live here only. */
export const ENV_VARIABLES = {
  PORT: int({ minimum: 0, maximum: 65535, default: 8080, description: 'a TCP port 0-65535' }),
  HOST: str({ minLength: 1, default: '127.0.0.1', description: 'an address to listen on' }),
  DATABASE_URL: optional(str({ description: 'a postgres:// or postgresql:// URL' })),
  DATA_DIR: str({ minLength: 1, default: './data', description: 'a directory path' }),
  SECRETS_ENCRYPTION_KEY: optional(str({ description: 'standard base64 of 32 bytes, or a raw 32-character string' })),
  CODEX_AUTH_SECRET_KEY: str({ minLength: 1, maxLength: 200, default: 'CODEX_AUTH_JSON', description: 'a non-empty key name' }),
  OAUTH_ISSUER: str({ default: 'https://auth.openai.com', description: 'an https URL (http only for a loopback host)' }),
  // Unset: {OAUTH_ISSUER}/oauth/token (filled in by loadConfig).
  OAUTH_TOKEN_URL: optional(str({ description: 'an https URL (http only for a loopback host)' })),
  CHATGPT_BASE_URL: str({ default: 'https://chatgpt.com/backend-api', description: 'an https URL (http only for a loopback host)' }),
  OAUTH_CLIENT_ID: str({ minLength: 1, default: 'app_EMoamEEZ73f0CkXaXp7hrann', description: 'a non-empty client id' }),
  REFRESH_MARGIN_SECONDS: Seconds(86_400, 'refresh this long before expiry'),
  REFRESH_CHECK_INTERVAL_SECONDS: Seconds(300, 'how often to check the credential'),
  PERMANENT_FAILURE_BACKOFF_SECONDS: Seconds(3_600, 'wait after a permanent failure'),
  SHIM_FORCED_REFRESH_FLOOR_SECONDS: Seconds(600, 'minimum age of a rotation before the shim may force another'),
  TRANSIENT_BACKOFF_BASE_SECONDS: Seconds(15, 'first retry delay after a transient failure'),
  UPSTREAM_TIMEOUT_SECONDS: Seconds(30, 'upstream request timeout'),
  SHUTDOWN_TIMEOUT_SECONDS: Seconds(30, 'how long SIGTERM waits for an in-flight refresh'),
  // One replica per credential polls per interval (claimed in broker_usage); fractions of a second serve tests.
  USAGE_POLL_INTERVAL_SECONDS: num({
    minimum: 0,
    maximum: 86_400,
    default: 300,
    description: 'how often each credential\'s usage is fetched from CHATGPT_BASE_URL/wham/usage (seconds, 0 turns it off, at most 86400)',
  }),
  POOL_SWITCH_PERCENT: int({ minimum: 1, maximum: 100, default: 90, description: 'a usage percentage 1-100 at which a credential counts as nearly exhausted' }),
  ADMIN_TOKEN: optional(str({ minLength: 16, description: 'a secret of at least 16 characters' })),
  METRICS_TOKEN: optional(str({ minLength: 16, description: 'a secret of at least 16 characters' })),
  // prom-client's GC histogram costs about 2 % of the CPU at tens of thousands of requests a second (src/metrics.ts).
  METRICS_GC_DURATION: bool({ default: true, description: 'true or false' }),
  REFRESH_TOKEN_EXPOSURE: choice(['proxy', 'omit', 'raw'], { default: 'proxy', description: 'one of proxy, omit, raw' }),
  PLATFORM_WORKSPACE_TOKENS: bool({ default: false, description: 'true or false' }),
  MAX_CONNECTIONS: int({
    minimum: 1,
    maximum: 1_000_000,
    default: 512,
    description: 'the most open client connections (1 or more); the default fits the common 1024 file-descriptor limit',
  }),
  // At most an hour: Node turns a timer past 2^31 ms into 1 ms, which would close every connection.
  HTTP_CONNECTION_TIMEOUT_SECONDS: HttpSeconds(10, 'close a connection that sends nothing for this long before its request (a connect-and-wait flood)'),
  HTTP_HEADERS_TIMEOUT_SECONDS: HttpSeconds(10, 'close a connection whose request headers are not complete this long after they began'),
  HTTP_REQUEST_TIMEOUT_SECONDS: HttpSeconds(30, 'answer 408 to a request not fully received this long after it began'),
  HTTP_KEEP_ALIVE_TIMEOUT_SECONDS: HttpSeconds(5, 'close an idle keep-alive connection after this long; behind a proxy, set it above the proxy\'s idle timeout'),
  LOG_LEVEL: choice(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], {
    default: 'info',
    description: 'one of fatal, error, warn, info, debug, trace, silent',
  }),
  MAX_EVENT_LOOP_DELAY_MS: int({ minimum: 0, default: 1000, description: 'milliseconds of event-loop delay before shedding load (0: off)' }),
  MAX_HEAP_USED_BYTES: int({ minimum: 0, default: 0, description: 'heap bytes before shedding load (0: off)' }),
  MAX_RSS_BYTES: int({ minimum: 0, default: 0, description: 'resident bytes before shedding load (0: off)' }),
  LOG_FORMAT: choice(['auto', 'json', 'pretty'], { default: 'auto', description: 'one of auto (pretty in a terminal), json, pretty' }),
  REPLICA_ID: optional(str({ minLength: 1, maxLength: 100, description: 'a short name for this replica' })),
  EMBEDDED_PG_PORT: int({ minimum: 0, maximum: 65535, default: 0, description: 'a TCP port 0-65535 (0: pick a free one)' }),
  BROKER_ENV: optional(str({ description: 'e.g. production' })),
  MOLECULE_ENV: optional(str({ description: 'e.g. prod' })),
} as const;

type Variables = typeof ENV_VARIABLES;
type ValueOf<V> = V extends ChoiceVariable<infer C> ? C : V extends NumberVariable ? number : V extends StringVariable ? string : V extends BooleanVariable ? boolean : never;
export type Env = { -readonly [K in keyof Variables as Variables[K] extends { optional: true } ? never : K]: ValueOf<Variables[K]> } & {
  -readonly [K in keyof Variables as Variables[K] extends { optional: true } ? K : never]?: ValueOf<Variables[K]>;
};

export interface Config extends Omit<Env, 'OAUTH_TOKEN_URL'> {
  /** OAUTH_TOKEN_URL, or {OAUTH_ISSUER}/oauth/token when unset. */
  OAUTH_TOKEN_URL: string;
  /** Parsed SECRETS_ENCRYPTION_KEY; undefined when unset (the embedded mode may generate one). */
  encryptionKey: Buffer | undefined;
  production: boolean;
  replicaId: string;
}

// A decimal number as people write one: 30, 0.5, .25, 1e3. Not hex, not words, not Infinity.
const DECIMAL = /^[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?$/i;

/** The value of one variable as a trimmed string, or why it is refused (its expectation). */
function parseVariable(v: Variable, raw: string): { ok: true; value: unknown } | { ok: false } {
  switch (v.type) {
    case 'number':
    case 'integer': {
      // Integers are digits only: no sign, fraction or exponent ("80.5", "1e3", "0x50" are refused).
      if (!(v.type === 'integer' ? /^\d+$/ : DECIMAL).test(raw)) return { ok: false };
      const n = Number(raw);
      const fits =
        Number.isFinite(n) &&
        (v.minimum === undefined || n >= v.minimum) &&
        (v.exclusiveMinimum === undefined || n > v.exclusiveMinimum) &&
        (v.maximum === undefined || n <= v.maximum);
      return fits ? { ok: true, value: n } : { ok: false };
    }
    case 'string':
      return (v.minLength === undefined || raw.length >= v.minLength) && (v.maxLength === undefined || raw.length <= v.maxLength) ? { ok: true, value: raw } : { ok: false };
    case 'boolean': {
      const b = raw.toLowerCase();
      return b === 'true' || b === '1' ? { ok: true, value: true } : b === 'false' || b === '0' ? { ok: true, value: false } : { ok: false };
    }
    case 'choice':
      return v.choices.includes(raw) ? { ok: true, value: raw } : { ok: false };
  }
}

/** Validate the environment once at start; the first bad variable is named in the error. */
export function loadConfig(source: NodeJS.ProcessEnv = process.env): Config {
  const values: Record<string, unknown> = {};
  for (const [name, variable] of Object.entries(ENV_VARIABLES) as Array<[string, Variable]>) {
    // An empty string is "unset": compose files and shells often export VAR= .
    const raw = source[name]?.trim();
    if (raw === undefined || raw === '') {
      if (variable.default !== undefined) values[name] = variable.default;
      continue;
    }
    const parsed = parseVariable(variable, raw);
    if (!parsed.ok) {
      const got = name.endsWith('TOKEN') || name.includes('KEY') ? '(hidden)' : JSON.stringify(raw);
      throw new ConfigError(name, `expected ${variable.description}, got ${got}`);
    }
    values[name] = parsed.value;
  }
  const env = values as Env;
  if (env.DATABASE_URL !== undefined) checkDatabaseUrl(env.DATABASE_URL);
  checkUpstreamUrl('OAUTH_ISSUER', env.OAUTH_ISSUER);
  const tokenUrl = env.OAUTH_TOKEN_URL ?? `${env.OAUTH_ISSUER.replace(/\/+$/, '')}/oauth/token`;
  checkUpstreamUrl(env.OAUTH_TOKEN_URL === undefined ? 'OAUTH_ISSUER' : 'OAUTH_TOKEN_URL', tokenUrl);
  checkUpstreamUrl('CHATGPT_BASE_URL', env.CHATGPT_BASE_URL);
  checkProxyVariables(source);
  // Node refuses a server whose headers deadline is past its request deadline.
  if (env.HTTP_HEADERS_TIMEOUT_SECONDS > env.HTTP_REQUEST_TIMEOUT_SECONDS) {
    throw new ConfigError('HTTP_HEADERS_TIMEOUT_SECONDS', `expected at most HTTP_REQUEST_TIMEOUT_SECONDS (${env.HTTP_REQUEST_TIMEOUT_SECONDS}), got ${env.HTTP_HEADERS_TIMEOUT_SECONDS}`);
  }

  const production =
    env.BROKER_ENV?.toLowerCase() === 'production' || ['prod', 'production'].includes(env.MOLECULE_ENV?.toLowerCase() ?? '');
  let encryptionKey: Buffer | undefined;
  if (env.SECRETS_ENCRYPTION_KEY !== undefined) {
    try {
      encryptionKey = parseEncryptionKey(env.SECRETS_ENCRYPTION_KEY);
    } catch (err) {
      throw new ConfigError('SECRETS_ENCRYPTION_KEY', err instanceof BrokerError ? err.message : 'invalid');
    }
  } else if (production) {
    throw new ConfigError('SECRETS_ENCRYPTION_KEY', 'required when BROKER_ENV=production (or MOLECULE_ENV=prod/production); generate one with: openssl rand -base64 32');
  }
  return {
    ...env,
    OAUTH_TOKEN_URL: tokenUrl,
    encryptionKey,
    production,
    replicaId: env.REPLICA_ID ?? `${hostname()}-${process.pid}`,
  };
}

function checkDatabaseUrl(value: string): void {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new ConfigError('DATABASE_URL', 'expected a postgres:// or postgresql:// URL, got something that does not parse as a URL');
  }
  if (url.protocol !== 'postgres:' && url.protocol !== 'postgresql:') {
    throw new ConfigError('DATABASE_URL', `expected a postgres:// or postgresql:// URL, got scheme ${url.protocol}`);
  }
}

/**
 * The outbound proxy every upstream call goes through (undici's EnvHttpProxyAgent): the
 * variable it reads (lowercase first, as undici does) must be a URL, or every start would
 * fail with a bare "Invalid URL". The value is never echoed (it may hold a password).
 */
function checkProxyVariables(source: NodeJS.ProcessEnv): void {
  for (const [lower, upper] of [['http_proxy', 'HTTP_PROXY'], ['https_proxy', 'HTTPS_PROXY']] as const) {
    const name = source[lower] !== undefined ? lower : upper;
    const value = source[name];
    if (!value) continue;
    let url: URL | undefined;
    try {
      url = new URL(value);
    } catch {
      url = undefined;
    }
    // "proxy.internal:3128" parses too (as scheme "proxy.internal:"): insist on a scheme undici speaks and a host.
    if (!url || !['http:', 'https:', 'socks:', 'socks5:'].includes(url.protocol) || !url.hostname) {
      throw new ConfigError(name, 'expected the URL of an outbound proxy (http://, https:// or socks5://host:port, e.g. http://proxy.internal:3128)');
    }
  }
}

/** A loopback host: the only place a plain-http upstream cannot leak a token to the network. */
export function isLoopbackHost(hostname: string): boolean {
  const h = hostname.replace(/^\[|\]$/g, '').toLowerCase();
  return h === 'localhost' || h.endsWith('.localhost') || h === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h);
}

/**
 * Upstream URLs carry refresh tokens and access tokens: https only, except for a
 * loopback host (tests, a local proxy), where plain http never crosses a network.
 */
function checkUpstreamUrl(name: string, value: string): void {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new ConfigError(name, `expected an https URL, got ${JSON.stringify(value)}`);
  }
  if (url.protocol === 'https:') return;
  if (url.protocol !== 'http:') throw new ConfigError(name, `expected an https URL, got scheme ${url.protocol}`);
  if (!isLoopbackHost(url.hostname)) {
    throw new ConfigError(name, `plain http to ${url.hostname} would send tokens in the clear; use https (http is allowed only for a loopback host such as 127.0.0.1)`);
  }
}
