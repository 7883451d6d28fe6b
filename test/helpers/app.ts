import { randomBytes } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import inject from 'light-my-request';
import type { FastifyInstance } from 'fastify';
import type { Dispatcher } from 'undici';
import { buildApp } from '../../src/app.js';
import type { FastLane } from '../../src/http/lane.js';
import { createBrokerCore, type BrokerCore, type BrokerCoreOptions, type CoreConfig } from '../../src/broker.js';
import { testCoreConfig } from './config.js';
import { createMetrics, type BrokerMetrics } from '../../src/metrics.js';
import { LogCapture } from './logs.js';

export const ADMIN_TOKEN = 'admin-token-for-tests-0123456789';

// Instances on one database share its key, as replicas of one deployment do.
const keys = new Map<string, Buffer>();
export function keyFor(databaseUrl: string): Buffer {
  let k = keys.get(databaseUrl);
  if (!k) {
    k = randomBytes(32);
    keys.set(databaseUrl, k);
  }
  return k;
}

export interface TestApp {
  app: FastifyInstance;
  core: BrokerCore;
  metrics: BrokerMetrics;
  logs: LogCapture;
  close(): Promise<void>;
}

export interface TestAppOptions {
  databaseUrl: string;
  upstreamUrl: string;
  now?: () => number;
  random?: () => number;
  config?: Partial<CoreConfig>;
  adminToken?: string | undefined;
  metricsToken?: string | undefined;
  logs?: LogCapture;
  /** Start the refresh loop and the change listener (default true). */
  start?: boolean;
  exposure?: 'proxy' | 'omit' | 'raw';
  floorSeconds?: number;
  platformTokens?: boolean;
  clientReloadMs?: number;
  clientFlushMs?: number;
  journalDir?: string;
  /** The dispatcher for upstream and backend calls (e.g. one trusting a test CA). */
  dispatcher?: Dispatcher;
  /** App-level load-shedding settings passed into buildApp (default: the app's defaults). */
  maxEventLoopDelayMs?: number;
  pressureSampleIntervalMs?: number;
  /** The fast lane in front of Fastify (default: the app's own), to count what it answers. */
  lane?: FastLane;
  /** Seams for broker-performed logins (lifetime, lease, poll interval, sweep period). */
  login?: BrokerCoreOptions['login'];
}

/** The app as serve builds it (core + HTTP), on a real Postgres, without listening. */
export async function createTestApp(o: TestAppOptions): Promise<TestApp> {
  const logs = o.logs ?? new LogCapture();
  const metrics = createMetrics({ defaultMetrics: false });
  const config = testCoreConfig(o.upstreamUrl, {
    encryptionKey: keyFor(o.databaseUrl),
    PLATFORM_WORKSPACE_TOKENS: o.platformTokens === true,
    ...o.config,
  });
  const core = await createBrokerCore({
    config,
    databaseUrl: o.databaseUrl,
    logger: logs.logger,
    metrics,
    poolSize: 4,
    ...(o.clientReloadMs ? { clientReloadMs: o.clientReloadMs } : {}),
    ...(o.clientFlushMs ? { clientFlushMs: o.clientFlushMs } : {}),
    ...(o.journalDir ? { journalDir: o.journalDir } : {}),
    ...(o.dispatcher ? { dispatcher: o.dispatcher } : {}),
    ...(o.now ? { now: o.now } : {}),
    ...(o.random ? { random: o.random } : {}),
    ...(o.login ? { login: o.login } : {}),
  });
  if (o.start !== false) await core.start();
  const app = await buildApp({
    config: {
      ADMIN_TOKEN: 'adminToken' in o ? o.adminToken : ADMIN_TOKEN,
      METRICS_TOKEN: o.metricsToken,
      CODEX_AUTH_SECRET_KEY: config.CODEX_AUTH_SECRET_KEY,
      REFRESH_TOKEN_EXPOSURE: o.exposure ?? 'proxy',
      PLATFORM_WORKSPACE_TOKENS: o.platformTokens === true,
      SHIM_FORCED_REFRESH_FLOOR_SECONDS: o.floorSeconds ?? 600,
      ...(o.maxEventLoopDelayMs !== undefined ? { MAX_EVENT_LOOP_DELAY_MS: o.maxEventLoopDelayMs } : {}),
    },
    ...(o.pressureSampleIntervalMs !== undefined ? { pressureSampleIntervalMs: o.pressureSampleIntervalMs } : {}),
    ...(o.lane ? { lane: o.lane } : {}),
    core,
    metrics,
    logger: logs.logger,
    ...(o.now ? { now: o.now } : {}),
  });
  await app.ready();
  // Injected requests enter where a socket's requests do, the server's request listener: the
  // fast lane first, then Fastify (Fastify's own inject would skip the lane). Every test that
  // injects a plain GET /codex-auth, drop-in or /healthz is then answered as in production.
  const listener = app.server.listeners('request')[0] as (req: IncomingMessage, res: ServerResponse) => void;
  (app as { inject: unknown }).inject = (opts: Parameters<typeof inject>[1]) => inject(listener, opts);
  return {
    app,
    core,
    metrics,
    logs,
    async close() {
      await core.refresher.stop(5_000);
      await app.close();
      await core.close(0);
    },
  };
}

/**
 * A set-up request to an app with a small event-loop-delay limit (the overload tests): one
 * that under-pressure sheds (503 `overloaded`) is sent again, for up to 10 s. On a loaded
 * machine (CI runs two test files at once on two cores) a short sample window can hold no
 * histogram sample, which under-pressure reads as an infinite delay; the set-up is not what
 * such a test is about. Any other answer is returned as it is.
 */
export async function injectUnshed(app: FastifyInstance, o: { method: 'GET' | 'POST' | 'PUT'; url: string; headers?: Record<string, string>; payload?: string | object }): Promise<Awaited<ReturnType<FastifyInstance['inject']>>> {
  const started = Date.now();
  for (;;) {
    const res = await app.inject(o);
    const shed = res.statusCode === 503 && /"code":"overloaded"/.test(res.body);
    if (!shed || Date.now() - started > 10_000) return res;
    await new Promise((r) => setTimeout(r, 20));
  }
}
