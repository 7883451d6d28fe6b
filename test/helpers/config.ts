import { randomBytes } from 'node:crypto';
import type { CoreConfig } from '../../src/broker.js';
import { loadConfig } from '../../src/config.js';

/**
 * The core's configuration for a test: the defaults of the one config schema (so tests
 * run what an operator gets), pointed at the fake upstream, with a short upstream timeout
 * and a replica id of its own.
 */
export function testCoreConfig(upstreamUrl: string, overrides: Partial<CoreConfig> = {}): CoreConfig {
  return {
    // Usage polling off unless a test turns it on: it would GET the real chatgpt.com, or add
    // to the GETs a fake backend counts for token checks.
    ...loadConfig({ OAUTH_TOKEN_URL: upstreamUrl, UPSTREAM_TIMEOUT_SECONDS: '5', USAGE_POLL_INTERVAL_SECONDS: '0' }),
    replicaId: `test-${randomBytes(3).toString('hex')}`,
    ...overrides,
  };
}
