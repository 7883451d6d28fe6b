import { randomBytes } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { buildApp } from './app.js';
import { createBrokerCore, type BrokerCore } from './broker.js';
import type { Config } from './config.js';
import { ConfigError } from './errors.js';
import { persistentSecret, startEmbeddedPostgres, type EmbeddedDatabase } from './embedded.js';
import { parseEncryptionKey } from './lib/secret-crypto.js';
import { holdTickObjects, settleRequestShapes } from './lib/shapes.js';
import type { Logger } from './logger.js';
import { createMetrics } from './metrics.js';

export interface Database {
  url: string;
  embedded: EmbeddedDatabase | undefined;
  config: Config;
}

/**
 * DATABASE_URL, or the embedded default under DATA_DIR. In the embedded mode a missing
 * SECRETS_ENCRYPTION_KEY is generated once and kept beside the data, so the credential
 * is never stored in plaintext and a restart can still read it.
 */
export async function openDatabase(config: Config, logger: Logger): Promise<Database> {
  if (config.DATABASE_URL) {
    if (!config.encryptionKey) {
      logger.warn(
        { event: 'plaintext_storage' },
        'SECRETS_ENCRYPTION_KEY is not set: the credential is stored unencrypted (encryption_version 0). Set it (openssl rand -base64 32) for anything but a test',
      );
    }
    return { url: config.DATABASE_URL, embedded: undefined, config };
  }
  let cfg = config;
  if (!config.encryptionKey) {
    const { value, created } = await persistentSecret(config.DATA_DIR, 'secrets-encryption-key', () => randomBytes(32).toString('base64'));
    let key: Buffer;
    try {
      key = parseEncryptionKey(value);
    } catch (err) {
      throw new ConfigError('SECRETS_ENCRYPTION_KEY', `the generated key file in DATA_DIR is invalid (${(err as Error).message}); restore it or remove it to start over`);
    }
    if (created) logger.info({ event: 'encryption_key_generated', dataDir: config.DATA_DIR }, 'generated SECRETS_ENCRYPTION_KEY into DATA_DIR (mode 0600); back it up with the data');
    cfg = { ...config, encryptionKey: key };
  }
  const embedded = await startEmbeddedPostgres({ dataDir: config.DATA_DIR, port: config.EMBEDDED_PG_PORT, logger });
  return { url: embedded.url, embedded, config: cfg };
}

export interface RunningBroker {
  app: FastifyInstance;
  core: BrokerCore;
  db: Database;
  address: string;
  /** Stop refreshing (bounded wait for one in flight), stop serving, close the pool and the embedded database. */
  close(): Promise<void>;
}

export async function startBroker(config: Config, logger: Logger): Promise<RunningBroker> {
  // First, before any socket: V8 sizes Node's request objects from live ones, and the
  // hidden classes of Node's tick objects stay alive (src/lib/shapes.ts).
  settleRequestShapes();
  await holdTickObjects();
  const db = await openDatabase(config, logger);
  const cfg = db.config;
  const metrics = createMetrics({ gcDuration: cfg.METRICS_GC_DURATION });
  const built: { core?: BrokerCore; app?: FastifyInstance } = {};
  let started: { core: BrokerCore; app: FastifyInstance; address: string };
  try {
    const core = (built.core = await createBrokerCore({ config: cfg, databaseUrl: db.url, logger, metrics, journalDir: cfg.DATA_DIR }));
    // Journals recovered, credentials and clients loaded; no refresh yet.
    await core.load();
    const app = (built.app = await buildApp({ config: cfg, core, metrics, logger }));
    // Bind before the first refresh: a port already taken fails the start before any
    // upstream POST, and a replica is reachable as soon as it serves.
    const address = await app.listen({ port: cfg.PORT, host: cfg.HOST });
    core.run();
    started = { core, app, address };
  } catch (err) {
    // Every way out of a failed start stops the embedded Postgres it started: nobody else would.
    await built.app?.close().catch(() => undefined);
    await built.core?.close(1_000).catch(() => undefined);
    await db.embedded?.stop().catch(() => undefined);
    if ((err as NodeJS.ErrnoException).code === 'EADDRINUSE') {
      throw new Error(`${(err as Error).message} (another process holds it: stop it, or set PORT or HOST)`, { cause: err });
    }
    throw err;
  }
  const { core, app, address } = started;
  logger.info({ event: 'listening', address, replicaId: cfg.replicaId, embedded: db.embedded !== undefined }, `codex-auth-broker listening on ${address}`);
  let closing: Promise<void> | undefined;
  return {
    app,
    core,
    db,
    address,
    close() {
      closing ??= (async () => {
        const finished = await core.refresher.stop(cfg.SHUTDOWN_TIMEOUT_SECONDS * 1000);
        if (!finished) logger.error({ event: 'shutdown_refresh_abandoned' }, 'a refresh was still in flight when the shutdown timeout ran out');
        await app.close();
        await core.close(0);
        if (db.embedded?.owned) await db.embedded.stop().catch((err: Error) => logger.warn({ event: 'embedded_db_stop_failed', err: { message: err.message } }, 'could not stop the embedded Postgres'));
        logger.info({ event: 'stopped' }, 'codex-auth-broker stopped');
      })();
      return closing;
    },
  };
}
