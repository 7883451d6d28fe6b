import { randomBytes } from 'node:crypto';
import { createPool, migrate, type Pool } from '../../src/db.js';
import { createMetrics, type BrokerMetrics } from '../../src/metrics.js';
import { Refresher, type RefresherOptions } from '../../src/refresher.js';
import { SecretStore } from '../../src/secret-store.js';
import { createUpstreamClient } from '../../src/upstream.js';
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

export interface TestBrokerOptions extends Partial<Omit<RefresherOptions, 'store' | 'logger' | 'metrics'>> {
  databaseUrl: string;
  upstreamUrl: string;
  /** Encryption key; default a random one. Pass null for plaintext (version 0) storage. */
  key?: Buffer | null;
  timeoutMs?: number;
  logs?: LogCapture;
}

/** A refresher wired to a real Postgres and the fake upstream, as serve wires it. */
export async function createTestBroker(o: TestBrokerOptions): Promise<TestBroker> {
  const logs = o.logs ?? new LogCapture();
  const pool = createPool(o.databaseUrl, logs.logger, 4);
  await migrate(pool, logs.logger);
  const key = o.key === null ? undefined : (o.key ?? randomBytes(32));
  const store = new SecretStore(pool, key);
  const metrics = createMetrics({ defaultMetrics: false });
  const refresher = new Refresher({
    store,
    secretKey: o.secretKey ?? SECRET_KEY,
    refresh: o.refresh ?? createUpstreamClient({ url: o.upstreamUrl, clientId: 'app_EMoamEEZ73f0CkXaXp7hrann', timeoutMs: o.timeoutMs ?? 5_000 }, o.now),
    logger: logs.logger,
    metrics,
    replicaId: o.replicaId ?? `test-${randomBytes(3).toString('hex')}`,
    marginSeconds: o.marginSeconds ?? 86_400,
    checkIntervalMs: o.checkIntervalMs ?? 300_000,
    permanentBackoffMs: o.permanentBackoffMs ?? 3_600_000,
    transientBaseMs: o.transientBaseMs ?? 15_000,
    ...(o.now ? { now: o.now } : {}),
    ...(o.random ? { random: o.random } : {}),
  });
  return {
    pool,
    store,
    refresher,
    metrics,
    logs,
    key,
    async close() {
      await refresher.stop(5_000);
      await pool.end();
    },
  };
}
