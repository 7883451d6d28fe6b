import type { Dispatcher } from 'undici';
import { ChangeListener } from './change-listener.js';
import type { Config } from './config.js';
import { createPool, migrate, type Pool } from './db.js';
import type { Logger } from './logger.js';
import type { BrokerMetrics } from './metrics.js';
import { Refresher } from './refresher.js';
import { SecretStore } from './secret-store.js';
import { createUpstreamClient, type RefreshFn } from './upstream.js';

export type CoreConfig = Pick<
  Config,
  | 'CODEX_AUTH_SECRET_KEY'
  | 'OAUTH_TOKEN_URL'
  | 'OAUTH_CLIENT_ID'
  | 'REFRESH_MARGIN_SECONDS'
  | 'REFRESH_CHECK_INTERVAL_SECONDS'
  | 'PERMANENT_FAILURE_BACKOFF_SECONDS'
  | 'TRANSIENT_BACKOFF_BASE_SECONDS'
  | 'UPSTREAM_TIMEOUT_SECONDS'
  | 'encryptionKey'
  | 'replicaId'
>;

export interface BrokerCoreOptions {
  config: CoreConfig;
  databaseUrl: string;
  logger: Logger;
  metrics: BrokerMetrics;
  /** Seams for tests: the upstream call, its dispatcher, the clock, the jitter source. */
  refresh?: RefreshFn;
  dispatcher?: Dispatcher;
  now?: () => number;
  random?: () => number;
  poolSize?: number;
}

export interface BrokerCore {
  pool: Pool;
  store: SecretStore;
  refresher: Refresher;
  listener: ChangeListener;
  /** Load the credential, start listening for changes and start the refresh loop. */
  start(): Promise<void>;
  /** Stop refreshing (waiting, bounded, for one in flight), then close connections. */
  close(timeoutMs: number): Promise<boolean>;
}

const ms = (s: number) => Math.round(s * 1000);

/** The framework-free core, wired the one way serve, the CLI and the tests use it. */
export async function createBrokerCore(o: BrokerCoreOptions): Promise<BrokerCore> {
  const { config, logger } = o;
  const pool = createPool(o.databaseUrl, logger, o.poolSize);
  try {
    await migrate(pool, logger);
  } catch (err) {
    await pool.end().catch(() => undefined);
    throw err;
  }
  const store = new SecretStore(pool, config.encryptionKey);
  const refresh =
    o.refresh ??
    createUpstreamClient(
      { url: config.OAUTH_TOKEN_URL, clientId: config.OAUTH_CLIENT_ID, timeoutMs: ms(config.UPSTREAM_TIMEOUT_SECONDS), dispatcher: o.dispatcher },
      o.now,
    );
  const refresher = new Refresher({
    store,
    secretKey: config.CODEX_AUTH_SECRET_KEY,
    refresh,
    logger,
    metrics: o.metrics,
    replicaId: config.replicaId,
    marginSeconds: config.REFRESH_MARGIN_SECONDS,
    checkIntervalMs: ms(config.REFRESH_CHECK_INTERVAL_SECONDS),
    permanentBackoffMs: ms(config.PERMANENT_FAILURE_BACKOFF_SECONDS),
    transientBaseMs: ms(config.TRANSIENT_BACKOFF_BASE_SECONDS),
    ...(o.now ? { now: o.now } : {}),
    ...(o.random ? { random: o.random } : {}),
  });
  const listener = new ChangeListener({
    connectionString: o.databaseUrl,
    logger,
    onChange: (key) => {
      if (key !== undefined && key !== config.CODEX_AUTH_SECRET_KEY) return;
      // Reload first so a client never gets the burned token; then re-check, since a
      // re-seed may be due or may clear a latch.
      refresher
        .reload()
        .then(() => refresher.poke())
        .catch(() => undefined);
    },
  });
  return {
    pool,
    store,
    refresher,
    listener,
    async start() {
      await refresher.reload().catch(() => undefined);
      await listener.start();
      refresher.start();
    },
    async close(timeoutMs) {
      const finished = await refresher.stop(timeoutMs);
      await listener.close();
      await pool.end().catch(() => undefined);
      return finished;
    },
  };
}
