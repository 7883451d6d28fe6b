import { strict as assert } from 'node:assert';
import { randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import { loadConfig } from '../src/config.js';
import { ConfigError } from '../src/errors.js';

/** Asserts loadConfig(env) throws a ConfigError naming `variable` (in the message and in `.variable`). */
function rejects(env: Record<string, string>, variable: string): ConfigError {
  let caught: unknown;
  try {
    loadConfig(env);
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof ConfigError, `expected a ConfigError for ${JSON.stringify(env)}, got ${String(caught)}`);
  assert.equal(caught.variable, variable);
  assert.equal(caught.code, 'CONFIG_INVALID');
  assert.ok(caught.message.includes(variable), `message should name ${variable}: ${caught.message}`);
  return caught;
}

describe('config: defaults (DESIGN.md)', () => {
  const config = loadConfig({});

  test('an empty environment gives every documented default', () => {
    assert.equal(config.PORT, 8080);
    assert.equal(config.HOST, '127.0.0.1');
    assert.equal(config.DATA_DIR, './data');
    assert.equal(config.CODEX_AUTH_SECRET_KEY, 'CODEX_AUTH_JSON');
    assert.equal(config.OAUTH_TOKEN_URL, 'https://auth.openai.com/oauth/token');
    assert.equal(config.OAUTH_CLIENT_ID, 'app_EMoamEEZ73f0CkXaXp7hrann');
    assert.equal(config.REFRESH_MARGIN_SECONDS, 86400);
    assert.equal(config.REFRESH_CHECK_INTERVAL_SECONDS, 300);
    assert.equal(config.PERMANENT_FAILURE_BACKOFF_SECONDS, 3600);
    assert.equal(config.SHIM_FORCED_REFRESH_FLOOR_SECONDS, 600);
    assert.equal(config.REFRESH_TOKEN_EXPOSURE, 'proxy');
    assert.equal(config.PLATFORM_WORKSPACE_TOKENS, false);
    assert.equal(config.LOG_LEVEL, 'info');
    assert.equal(config.OAUTH_ISSUER, 'https://auth.openai.com');
    assert.equal(config.CHATGPT_BASE_URL, 'https://chatgpt.com/backend-api');
    assert.equal(config.MAX_CONNECTIONS, 512);
    assert.equal(config.USAGE_POLL_INTERVAL_SECONDS, 300);
    assert.equal(config.POOL_SWITCH_PERCENT, 90);
  });

  test('the token URL defaults to {OAUTH_ISSUER}/oauth/token when OAUTH_TOKEN_URL is unset', () => {
    assert.equal(loadConfig({ OAUTH_ISSUER: 'https://issuer.example/' }).OAUTH_TOKEN_URL, 'https://issuer.example/oauth/token');
    assert.equal(loadConfig({ OAUTH_ISSUER: 'https://issuer.example', OAUTH_TOKEN_URL: 'https://other.example/t' }).OAUTH_TOKEN_URL, 'https://other.example/t');
  });

  test('optional values stay unset: no database URL, no admin token, no key, not production', () => {
    assert.equal(config.DATABASE_URL, undefined);
    assert.equal(config.ADMIN_TOKEN, undefined);
    assert.equal(config.SECRETS_ENCRYPTION_KEY, undefined);
    assert.equal(config.encryptionKey, undefined);
    assert.equal(config.production, false);
  });

  test('a replica id is always derived when REPLICA_ID is unset', () => {
    assert.equal(typeof config.replicaId, 'string');
    assert.ok(config.replicaId.length > 0);
    assert.equal(loadConfig({ REPLICA_ID: 'replica-a' }).replicaId, 'replica-a');
  });

  test('an empty string counts as unset (compose files export VAR=)', () => {
    const c = loadConfig({ PORT: '', LOG_LEVEL: '', DATABASE_URL: '', SECRETS_ENCRYPTION_KEY: '' });
    assert.equal(c.PORT, 8080);
    assert.equal(c.LOG_LEVEL, 'info');
    assert.equal(c.DATABASE_URL, undefined);
    assert.equal(c.encryptionKey, undefined);
  });

  test('unrelated environment variables are ignored', () => {
    const c = loadConfig({ PATH: '/usr/bin', HOME: '/root', npm_config_foo: 'x' });
    assert.equal(c.PORT, 8080);
    assert.equal((c as unknown as Record<string, unknown>)['PATH'], undefined);
  });
});

describe('config: parsing good values', () => {
  test('numbers are converted from their string form', () => {
    const c = loadConfig({ PORT: '9090', REFRESH_MARGIN_SECONDS: '3600', PERMANENT_FAILURE_BACKOFF_SECONDS: '60' });
    assert.equal(c.PORT, 9090);
    assert.equal(c.REFRESH_MARGIN_SECONDS, 3600);
    assert.equal(c.PERMANENT_FAILURE_BACKOFF_SECONDS, 60);
  });

  test("PORT '0' (pick a free port) is accepted", () => {
    assert.equal(loadConfig({ PORT: '0' }).PORT, 0);
  });

  test('surrounding whitespace is trimmed', () => {
    assert.equal(loadConfig({ PORT: ' 8081 ' }).PORT, 8081);
  });

  test("PLATFORM_WORKSPACE_TOKENS 'true' parses to boolean true, 'false' to false", () => {
    assert.equal(loadConfig({ PLATFORM_WORKSPACE_TOKENS: 'true' }).PLATFORM_WORKSPACE_TOKENS, true);
    assert.equal(loadConfig({ PLATFORM_WORKSPACE_TOKENS: 'false' }).PLATFORM_WORKSPACE_TOKENS, false);
  });

  test("REFRESH_CHECK_INTERVAL_SECONDS '1' and '0.5' are accepted", () => {
    assert.equal(loadConfig({ REFRESH_CHECK_INTERVAL_SECONDS: '1' }).REFRESH_CHECK_INTERVAL_SECONDS, 1);
    assert.equal(loadConfig({ REFRESH_CHECK_INTERVAL_SECONDS: '0.5' }).REFRESH_CHECK_INTERVAL_SECONDS, 0.5);
  });

  test('each REFRESH_TOKEN_EXPOSURE mode is accepted', () => {
    for (const mode of ['proxy', 'omit', 'raw'] as const) {
      assert.equal(loadConfig({ REFRESH_TOKEN_EXPOSURE: mode }).REFRESH_TOKEN_EXPOSURE, mode);
    }
  });

  test('postgres:// and postgresql:// DATABASE_URLs are accepted', () => {
    assert.equal(loadConfig({ DATABASE_URL: 'postgres://u:p@db:5432/broker' }).DATABASE_URL, 'postgres://u:p@db:5432/broker');
    assert.equal(loadConfig({ DATABASE_URL: 'postgresql://localhost/broker' }).DATABASE_URL, 'postgresql://localhost/broker');
  });

  test('a padded base64 32-byte SECRETS_ENCRYPTION_KEY becomes the 32-byte encryptionKey', () => {
    const bytes = randomBytes(32);
    const c = loadConfig({ SECRETS_ENCRYPTION_KEY: bytes.toString('base64') });
    assert.deepEqual(c.encryptionKey, bytes);
  });

  test('a raw 32-character non-base64 SECRETS_ENCRYPTION_KEY becomes its raw bytes', () => {
    const raw = 'not!base64!but!32!characters!ok!';
    assert.equal(raw.length, 32);
    assert.deepEqual(loadConfig({ SECRETS_ENCRYPTION_KEY: raw }).encryptionKey, Buffer.from(raw));
  });

  test('production with a valid key starts and reports production', () => {
    const key = randomBytes(32).toString('base64');
    assert.equal(loadConfig({ BROKER_ENV: 'production', SECRETS_ENCRYPTION_KEY: key }).production, true);
    assert.equal(loadConfig({ MOLECULE_ENV: 'prod', SECRETS_ENCRYPTION_KEY: key }).production, true);
    assert.equal(loadConfig({ MOLECULE_ENV: 'production', SECRETS_ENCRYPTION_KEY: key }).production, true);
  });

  test('a non-production environment name without a key starts', () => {
    assert.equal(loadConfig({ BROKER_ENV: 'staging', MOLECULE_ENV: 'dev' }).production, false);
  });

  test('an ADMIN_TOKEN of 16 characters or more is accepted', () => {
    assert.equal(loadConfig({ ADMIN_TOKEN: 'a'.repeat(16) }).ADMIN_TOKEN, 'a'.repeat(16));
  });
});

describe('config: bad values fail fast naming the variable', () => {
  test("REFRESH_CHECK_INTERVAL_SECONDS 'abc' throws a ConfigError whose variable is REFRESH_CHECK_INTERVAL_SECONDS", () => {
    const err = rejects({ REFRESH_CHECK_INTERVAL_SECONDS: 'abc' }, 'REFRESH_CHECK_INTERVAL_SECONDS');
    assert.ok(err.message.startsWith('REFRESH_CHECK_INTERVAL_SECONDS'), err.message);
  });

  test('a zero or negative number of seconds is rejected', () => {
    rejects({ REFRESH_CHECK_INTERVAL_SECONDS: '0' }, 'REFRESH_CHECK_INTERVAL_SECONDS');
    rejects({ REFRESH_MARGIN_SECONDS: '-5' }, 'REFRESH_MARGIN_SECONDS');
    rejects({ PERMANENT_FAILURE_BACKOFF_SECONDS: '0' }, 'PERMANENT_FAILURE_BACKOFF_SECONDS');
    rejects({ SHIM_FORCED_REFRESH_FLOOR_SECONDS: 'soon' }, 'SHIM_FORCED_REFRESH_FLOOR_SECONDS');
  });

  test('a 31-byte SECRETS_ENCRYPTION_KEY is rejected naming SECRETS_ENCRYPTION_KEY', () => {
    rejects({ SECRETS_ENCRYPTION_KEY: randomBytes(31).toString('base64') }, 'SECRETS_ENCRYPTION_KEY');
  });

  test('a 32-character all-base64-alphabet SECRETS_ENCRYPTION_KEY (24 bytes) is rejected', () => {
    rejects({ SECRETS_ENCRYPTION_KEY: 'abcdefghijklmnopqrstuvwxyzABCDEF' }, 'SECRETS_ENCRYPTION_KEY');
  });

  test("DATABASE_URL 'not a url' is rejected naming DATABASE_URL", () => {
    rejects({ DATABASE_URL: 'not a url' }, 'DATABASE_URL');
  });

  test("DATABASE_URL 'mysql://x' is rejected naming DATABASE_URL", () => {
    rejects({ DATABASE_URL: 'mysql://x' }, 'DATABASE_URL');
  });

  test('a proxy variable that is not a URL is rejected naming it (the one undici reads: lowercase first), never echoing it', () => {
    for (const name of ['HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy']) {
      // No scheme: parses as the URL scheme "user:", which no proxy speaks.
      for (const bad of ['user:hunter2-s3cret@proxy.internal:3128', 'http://user:hunter2-s3cret@', 'hunter2-s3cret not a url']) {
        const err = rejects({ [name]: bad }, name);
        assert.ok(!err.message.includes('hunter2-s3cret'), err.message);
      }
    }
    // The lowercase one wins in undici: an unused uppercase one does not stop the broker.
    assert.doesNotThrow(() => loadConfig({ https_proxy: 'http://proxy.internal:3128', HTTPS_PROXY: 'not a url' }));
    assert.doesNotThrow(() => loadConfig({ HTTPS_PROXY: 'http://user:pw@proxy.internal:3128', HTTP_PROXY: 'socks5://127.0.0.1:1080', NO_PROXY: 'localhost' }));
  });

  test('a DATABASE_URL error never echoes its password', () => {
    const err = rejects({ DATABASE_URL: 'mysql://user:hunter2-s3cret@db/x' }, 'DATABASE_URL');
    assert.ok(!err.message.includes('hunter2-s3cret'), err.message);
  });

  test('a bad PORT is rejected naming PORT: words, out of range, negative, fractional, exponent, trailing junk', () => {
    for (const port of ['abc', '70000', '65536', '-1', '80.5', '1e3', '8080abc', '0x50']) {
      rejects({ PORT: port }, 'PORT');
    }
  });

  test('a bad EMBEDDED_PG_PORT is rejected naming EMBEDDED_PG_PORT', () => {
    rejects({ EMBEDDED_PG_PORT: '5.5' }, 'EMBEDDED_PG_PORT');
  });

  test('a bad REFRESH_TOKEN_EXPOSURE is rejected naming it and listing the choices', () => {
    const err = rejects({ REFRESH_TOKEN_EXPOSURE: 'everything' }, 'REFRESH_TOKEN_EXPOSURE');
    assert.ok(err.message.includes('proxy') && err.message.includes('omit') && err.message.includes('raw'), err.message);
  });

  test('a bad PLATFORM_WORKSPACE_TOKENS is rejected', () => {
    rejects({ PLATFORM_WORKSPACE_TOKENS: 'maybe' }, 'PLATFORM_WORKSPACE_TOKENS');
  });

  test("METRICS_GC_DURATION: true unless set; 'false' and '0' turn the GC histogram off; anything else is rejected naming it", () => {
    assert.equal(loadConfig({}).METRICS_GC_DURATION, true);
    assert.equal(loadConfig({ METRICS_GC_DURATION: 'false' }).METRICS_GC_DURATION, false);
    assert.equal(loadConfig({ METRICS_GC_DURATION: '0' }).METRICS_GC_DURATION, false);
    assert.equal(loadConfig({ METRICS_GC_DURATION: 'true' }).METRICS_GC_DURATION, true);
    for (const bad of ['off', 'no', 'yes please']) rejects({ METRICS_GC_DURATION: bad }, 'METRICS_GC_DURATION');
  });

  test('USAGE_POLL_INTERVAL_SECONDS: 0 turns polling off and fractions are accepted; negative, words and over a day are rejected naming it', () => {
    assert.equal(loadConfig({ USAGE_POLL_INTERVAL_SECONDS: '0' }).USAGE_POLL_INTERVAL_SECONDS, 0);
    assert.equal(loadConfig({ USAGE_POLL_INTERVAL_SECONDS: '0.25' }).USAGE_POLL_INTERVAL_SECONDS, 0.25);
    for (const bad of ['-1', 'often', '86401']) rejects({ USAGE_POLL_INTERVAL_SECONDS: bad }, 'USAGE_POLL_INTERVAL_SECONDS');
  });

  test('POOL_SWITCH_PERCENT must be a whole percentage 1-100, rejected naming it', () => {
    assert.equal(loadConfig({ POOL_SWITCH_PERCENT: '100' }).POOL_SWITCH_PERCENT, 100);
    assert.equal(loadConfig({ POOL_SWITCH_PERCENT: '1' }).POOL_SWITCH_PERCENT, 1);
    for (const bad of ['0', '101', '90.5', 'ninety', '-5']) rejects({ POOL_SWITCH_PERCENT: bad }, 'POOL_SWITCH_PERCENT');
  });

  test("a number in hex, words or Infinity is refused naming the variable (USAGE_POLL_INTERVAL_SECONDS '0x10' is not read as 0, which would turn polling off)", () => {
    for (const bad of ['0x10', 'Infinity', 'true', '5s', '1,5', '--1']) rejects({ USAGE_POLL_INTERVAL_SECONDS: bad }, 'USAGE_POLL_INTERVAL_SECONDS');
    for (const bad of ['0x10', 'NaN', '1e999']) rejects({ UPSTREAM_TIMEOUT_SECONDS: bad }, 'UPSTREAM_TIMEOUT_SECONDS');
  });

  test("seconds are read in decimal or exponent form ('1e3', '.5', '+2'); booleans as true/false/1/0 in any case", () => {
    const c = loadConfig({ UPSTREAM_TIMEOUT_SECONDS: '1e3', REFRESH_CHECK_INTERVAL_SECONDS: '.5', TRANSIENT_BACKOFF_BASE_SECONDS: '+2' });
    assert.equal(c.UPSTREAM_TIMEOUT_SECONDS, 1000);
    assert.equal(c.REFRESH_CHECK_INTERVAL_SECONDS, 0.5);
    assert.equal(c.TRANSIENT_BACKOFF_BASE_SECONDS, 2);
    for (const [raw, want] of [['TRUE', true], ['1', true], ['False', false], ['0', false]] as const) {
      assert.equal(loadConfig({ PLATFORM_WORKSPACE_TOKENS: raw }).PLATFORM_WORKSPACE_TOKENS, want, raw);
    }
  });

  test('a bad LOG_LEVEL is rejected', () => {
    rejects({ LOG_LEVEL: 'verbose' }, 'LOG_LEVEL');
  });

  test('a non-http OAUTH_TOKEN_URL is rejected', () => {
    rejects({ OAUTH_TOKEN_URL: 'ftp://auth.example/token' }, 'OAUTH_TOKEN_URL');
    rejects({ OAUTH_TOKEN_URL: 'nope' }, 'OAUTH_TOKEN_URL');
  });

  test('upstream URLs must be https unless the host is loopback: a remote http:// fails at start naming the variable', () => {
    for (const name of ['OAUTH_ISSUER', 'OAUTH_TOKEN_URL', 'CHATGPT_BASE_URL']) {
      for (const remote of ['http://auth.example.com/x', 'http://10.0.0.5:8080/x', 'http://[2001:db8::1]/x', 'http://127.evil.example/x']) {
        const err = rejects({ [name]: remote }, name);
        assert.match(err.message, /https/, err.message);
      }
      for (const local of ['http://127.0.0.1:9/x', 'http://localhost:9/x', 'http://[::1]:9/x', 'http://127.8.9.10/x', 'https://auth.example.com/x']) {
        assert.doesNotThrow(() => loadConfig({ [name]: local }), `${name}=${local}`);
      }
    }
  });

  test('an http OAUTH_ISSUER to a remote host is named even when it only feeds the default token URL', () => {
    rejects({ OAUTH_ISSUER: 'http://issuer.example' }, 'OAUTH_ISSUER');
  });

  test('a bad MAX_CONNECTIONS is rejected', () => {
    rejects({ MAX_CONNECTIONS: '0' }, 'MAX_CONNECTIONS');
    rejects({ MAX_CONNECTIONS: 'lots' }, 'MAX_CONNECTIONS');
  });

  test('a message says what was expected and what was given', () => {
    const err = rejects({ PORT: 'abc' }, 'PORT');
    assert.ok(err.message.includes('"abc"'), err.message);
    assert.ok(err.message.includes('0-65535'), err.message);
  });
});

describe('config: production requires an encryption key', () => {
  test('BROKER_ENV=production without a key refuses naming SECRETS_ENCRYPTION_KEY', () => {
    rejects({ BROKER_ENV: 'production' }, 'SECRETS_ENCRYPTION_KEY');
  });

  test('MOLECULE_ENV=prod without a key refuses naming SECRETS_ENCRYPTION_KEY', () => {
    rejects({ MOLECULE_ENV: 'prod' }, 'SECRETS_ENCRYPTION_KEY');
  });

  test('MOLECULE_ENV=production and BROKER_ENV=PRODUCTION (any case) also refuse without a key', () => {
    rejects({ MOLECULE_ENV: 'production' }, 'SECRETS_ENCRYPTION_KEY');
    rejects({ BROKER_ENV: 'PRODUCTION' }, 'SECRETS_ENCRYPTION_KEY');
  });

  test('production with an invalid key refuses naming SECRETS_ENCRYPTION_KEY', () => {
    rejects({ BROKER_ENV: 'production', SECRETS_ENCRYPTION_KEY: 'too-short' }, 'SECRETS_ENCRYPTION_KEY');
  });
});

describe('config: secrets never appear in error messages', () => {
  test('an ADMIN_TOKEN that is too short is rejected without echoing its value', () => {
    const secret = 'tiny-s3cr3t';
    const err = rejects({ ADMIN_TOKEN: secret }, 'ADMIN_TOKEN');
    assert.ok(!err.message.includes(secret), err.message);
  });

  test('a METRICS_TOKEN that is too short is rejected without echoing its value', () => {
    const secret = 'mt-s3cr3t';
    const err = rejects({ METRICS_TOKEN: secret }, 'METRICS_TOKEN');
    assert.ok(!err.message.includes(secret), err.message);
  });

  test('an invalid SECRETS_ENCRYPTION_KEY is rejected without echoing its value', () => {
    for (const key of [randomBytes(31).toString('base64'), randomBytes(33).toString('base64'), 'raw-but-31-characters-long-key!', 'abcdefghijklmnopqrstuvwxyzABCDEF']) {
      const err = rejects({ SECRETS_ENCRYPTION_KEY: key }, 'SECRETS_ENCRYPTION_KEY');
      assert.ok(!err.message.includes(key), err.message);
    }
  });
});
