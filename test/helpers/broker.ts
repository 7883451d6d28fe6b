import { randomBytes } from 'node:crypto';
import { createBrokerCore } from '../../src/broker.js';
import { testCoreConfig } from './config.js';
import type { Pool } from '../../src/db.js';
import { createMetrics, type BrokerMetrics } from '../../src/metrics.js';
import type { Refresher } from '../../src/refresher.js';
import type { SecretStore } from '../../src/secret-store.js';
import type { RefreshFn } from '../../src/upstream.js';
import { LogCapture } from './logs.js';

export const SECRET_KEY = 'CODEX_AUTH_JSON';

export interface TestBroker {
  pool: Pool;
  store: SecretStore;
  refresher: Refresher;
  metrics: BrokerMetrics;
  logs: LogCapture;
  key: Buffer | undefined;
  close(): Promise<void>;
}

export interface TestBrokerOptions {
  databaseUrl: string;
  upstreamUrl: string;
  /** Encryption key; default a random one. Pass null for plaintext (version 0) storage. */
  key?: Buffer | null;
  timeoutMs?: number;
  logs?: LogCapture;
  refresh?: RefreshFn;
  now?: () => number;
  random?: () => number;
  replicaId?: string;
  secretKey?: string;
  marginSeconds?: number;
  checkIntervalMs?: number;
  permanentBackoffMs?: number;
  transientBaseMs?: number;
}

/**
 * The core exactly as serve wires it (createBrokerCore), on a real Postgres and the fake
 * upstream, without the change listener or the timer unless the test starts them.
 */
export async function createTestBroker(o: TestBrokerOptions): Promise<TestBroker> {
  const logs = o.logs ?? new LogCapture();
  const key = o.key === null ? undefined : (o.key ?? randomBytes(32));
  const metrics = createMetrics({ defaultMetrics: false });
  const core = await createBrokerCore({
    config: testCoreConfig(o.upstreamUrl, {
      CODEX_AUTH_SECRET_KEY: o.secretKey ?? SECRET_KEY,
      ...(o.marginSeconds !== undefined ? { REFRESH_MARGIN_SECONDS: o.marginSeconds } : {}),
      ...(o.checkIntervalMs !== undefined ? { REFRESH_CHECK_INTERVAL_SECONDS: o.checkIntervalMs / 1000 } : {}),
      ...(o.permanentBackoffMs !== undefined ? { PERMANENT_FAILURE_BACKOFF_SECONDS: o.permanentBackoffMs / 1000 } : {}),
      ...(o.transientBaseMs !== undefined ? { TRANSIENT_BACKOFF_BASE_SECONDS: o.transientBaseMs / 1000 } : {}),
      ...(o.timeoutMs !== undefined ? { UPSTREAM_TIMEOUT_SECONDS: o.timeoutMs / 1000 } : {}),
      ...(o.replicaId !== undefined ? { replicaId: o.replicaId } : {}),
      encryptionKey: key,
    }),
    databaseUrl: o.databaseUrl,
    logger: logs.logger,
    metrics,
    poolSize: 4,
    ...(o.refresh ? { refresh: o.refresh } : {}),
    ...(o.now ? { now: o.now } : {}),
    ...(o.random ? { random: o.random } : {}),
  });
  return {
    pool: core.pool,
    store: core.store,
    refresher: core.refresher,
    metrics,
    logs,
    key,
    close: async () => {
      await core.close(5_000);
    },
  };
}
