import { performance } from 'node:perf_hooks';
import underPressure from '@fastify/under-pressure';
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type onResponseHookHandler, type RouteHandlerMethod } from 'fastify';
import type { BrokerCore } from './broker.js';
import type { Config } from './config.js';
import { guardConnections, serverTimeouts, type HttpLimitsConfig } from './http/connection-limits.js';
import { AuthFailures } from './http/auth.js';
import { errorHandler, frameworkErrorHandler, notFoundHandler, sendProblem } from './http/problem.js';
import { FastLane } from './http/lane.js';
import { lazyChildLoggerFactory, requestIdGenerator } from './http/request-logger.js';
import { wallClock } from './lib/time.js';
import type { Logger } from './logger.js';
import { labelled, type BrokerMetrics } from './metrics.js';
import { adminRoutes } from './routes/admin.js';
import { opsRoutes } from './routes/ops.js';
import { pageRoutes } from './routes/page.js';
import { revokeRoutes } from './routes/revoke.js';
import { shimRoutes } from './routes/shim.js';
import { workspaceRoutes } from './routes/workspace.js';
import { ServedCredentials } from './serving.js';

export interface AppOptions {
  config: Pick<Config, 'ADMIN_TOKEN' | 'METRICS_TOKEN' | 'CODEX_AUTH_SECRET_KEY'> &
    Partial<
      Pick<
        Config,
        'REFRESH_TOKEN_EXPOSURE' | 'PLATFORM_WORKSPACE_TOKENS' | 'SHIM_FORCED_REFRESH_FLOOR_SECONDS' | 'MAX_EVENT_LOOP_DELAY_MS' | 'MAX_HEAP_USED_BYTES' | 'MAX_RSS_BYTES'
      >
    > &
    Partial<HttpLimitsConfig>;
  core: BrokerCore;
  metrics: BrokerMetrics;
  logger: Logger;
  now?: () => number;
  /** How often @fastify/under-pressure samples event-loop delay and memory (default 1000 ms, minimum 10). */
  pressureSampleIntervalMs?: number;
  /** The fast lane in front of Fastify (a seam for tests; default a new one). */
  lane?: FastLane;
}

function refuseSchemas(): never {
  throw new Error('route schemas are not compiled here: check the input in the handler (see app.ts, schemaController)');
}

/**
 * The HTTP app, composed explicitly. It never listens: the entry point owns the
 * socket, signals and the database lifecycle.
 */
export async function buildApp(o: AppOptions): Promise<FastifyInstance> {
  const genReqId = requestIdGenerator();
  const lane = o.lane ?? new FastLane();
  const app = Fastify({
    serverFactory: lane.serverFactory,
    loggerInstance: o.logger as FastifyBaseLogger,
    // Per-request lines would drown the domain events at fleet scale; metrics count requests.
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: 1024 * 1024,
    requestIdHeader: 'x-request-id',
    // A POST the lane took and declined keeps the id it was given when it arrived.
    genReqId: (raw) => lane.arrivalId(raw) ?? genReqId(),
    childLoggerFactory: lazyChildLoggerFactory,
    return503OnClosing: true,
    ...serverTimeouts(o.config),
    frameworkErrors: frameworkErrorHandler,
    // No route declares a JSON schema: handlers parse and check their own input. Fastify's
    // default compilers (Ajv and fast-json-stringify, about 100 modules) would only sit in
    // memory; these take their place and refuse a schema at start if one is ever added.
    schemaController: { compilersFactory: { buildValidator: refuseSchemas, buildSerializer: refuseSchemas } },
  });
  guardConnections(app.server, o.config, o.logger);
  app.setErrorHandler(errorHandler);

  // Shed request load before it queues; the refresher runs on timers, not requests, so a
  // due refresh is never starved by it. under-pressure samples in a scope of its own (its
  // per-request hook would build Fastify's routeOptions object on every request); the one
  // onRequest hook below asks it, and also echoes the request id so an operator can find
  // the matching log line.
  const limits = { maxEventLoopDelay: o.config.MAX_EVENT_LOOP_DELAY_MS ?? 1000, maxHeapUsedBytes: o.config.MAX_HEAP_USED_BYTES ?? 0, maxRssBytes: o.config.MAX_RSS_BYTES ?? 0 };
  let pressure: FastifyInstance | undefined;
  await app.register(async (scope) => {
    await scope.register(underPressure, { ...limits, ...(o.pressureSampleIntervalMs !== undefined ? { sampleInterval: o.pressureSampleIntervalMs } : {}) });
    pressure = scope;
  });
  if (!pressure) throw new Error('under-pressure did not register');
  const { isUnderPressure, memoryUsage } = pressure;
  app.decorate('isUnderPressure', isUnderPressure);
  app.decorate('memoryUsage', memoryUsage);
  app.addHook('onRequest', (req, reply, done) => {
    reply.header('x-request-id', req.id);
    // A POST the lane took was checked when it arrived, as Fastify checks every request on arrival.
    if (isUnderPressure() && !lane.admitted(req.raw)) shed(reply, limits, memoryUsage());
    done();
  });

  // Request duration by route: a hook attached to each route as it is added, so the route
  // is known without Fastify's per-request routeOptions object; unmatched URLs are counted
  // by the not-found handler. (Must be registered before any route.)
  const httpDuration = labelled(o.metrics.httpDuration);
  app.addHook('onRoute', (route) => {
    const url = route.url;
    const observe: onResponseHookHandler = (req, reply, done) => {
      // From arrival: a POST the lane took reached Fastify only after its body.
      const arrived = lane.arrivedAt(req.raw);
      httpDuration(req.method, url, reply.statusCode).observe(arrived === undefined ? reply.elapsedTime / 1000 : (performance.now() - arrived) / 1000);
      done();
    };
    route.onResponse = route.onResponse === undefined ? [observe] : [...(Array.isArray(route.onResponse) ? route.onResponse : [route.onResponse]), observe];
  });
  lane.attach({ genReqId, underPressure: isUnderPressure, duration: httpDuration });
  app.addHook('preClose', (done) => {
    lane.close();
    done();
  });
  app.setNotFoundHandler((req, reply) => {
    reply.raw.once('finish', () => httpDuration(req.method, 'unmatched', reply.statusCode).observe(reply.elapsedTime / 1000));
    return notFoundHandler(req, reply);
  });

  const now = o.now ?? Date.now;
  const { core, metrics } = o;
  const exposure = o.config.REFRESH_TOKEN_EXPOSURE ?? 'proxy';
  if (exposure === 'raw') {
    o.logger.warn(
      { event: 'refresh_token_exposure_raw' },
      "REFRESH_TOKEN_EXPOSURE=raw serves the fleet's real upstream refresh token to every workspace: one workspace's `codex logout` without CODEX_REFRESH_TOKEN_URL_OVERRIDE revokes the shared login upstream, and any workspace can burn it. Use proxy unless you must",
    );
  }
  const renderers = new ServedCredentials((client, at) => core.assignments.credentialFor(client, at), exposure, now);
  const renderer = renderers.rendererOf(core.refresher);
  // One count, one cap and one log line for every admin-token check (admin routes and /status).
  const authFailures = new AuthFailures({ logger: o.logger });
  app.addHook('onClose', async () => authFailures.flush());
  await app.register(opsRoutes, {
    lane,
    core,
    metrics,
    adminToken: o.config.ADMIN_TOKEN,
    metricsToken: o.config.METRICS_TOKEN,
    now,
    authFailures,
    // Platform workspace tokens are for the drop-in route only.
    clientFor: (token) => {
      const c = core.clients.authenticate(token);
      return c?.kind === 'broker' ? c : undefined;
    },
    beforeScrape: () => {
      const counts = core.clients.counts((c) => renderers.currentGeneration(c));
      for (const [state, n] of Object.entries(counts)) metrics.clients.set({ state }, n);
      metrics.databaseUp.set(core.listener.connected ? 1 : 0);
      metrics.poolAssignedClients.reset();
      for (const a of core.assignments.assigned()) metrics.poolAssignedClients.set({ pool: a.pool, credential: a.credential }, a.clients);
    },
  });
  // The lane's routes take the wall time from the clock reading the lane made anyway (a
  // clock injected for tests is asked directly).
  const nowAt = o.now ? () => now() : wallClock();
  await app.register(workspaceRoutes, { lane, clients: core.clients, served: renderers, metrics, now, nowAt, platformTokens: o.config.PLATFORM_WORKSPACE_TOKENS === true });
  await app.register(shimRoutes, {
    lane,
    clients: core.clients,
    served: renderers,
    verifier: core.tokenVerifier,
    metrics,
    now,
    forcedRefreshFloorMs: (o.config.SHIM_FORCED_REFRESH_FLOOR_SECONDS ?? 600) * 1000,
  });
  await app.register(revokeRoutes, { clients: core.clients, refresher: core.refresher, metrics });
  await app.register(pageRoutes, { adminRoutes: Boolean(o.config.ADMIN_TOKEN) });
  if (!o.config.ADMIN_TOKEN) {
    // Off is not "no such route": say why, and how to turn them on.
    const adminOff: RouteHandlerMethod = (req, reply) =>
      sendProblem(reply, {
        status: 404,
        code: 'not_found',
        title: 'Not Found',
        detail: `admin routes are off: set ADMIN_TOKEN (a secret of at least 16 characters, e.g. openssl rand -base64 32) and restart the broker to use ${req.method} ${req.url.split('?')[0]}`,
      });
    app.all('/admin', adminOff);
    app.all('/admin/*', adminOff);
  } else {
    await app.register(adminRoutes, {
      adminToken: o.config.ADMIN_TOKEN,
      pool: core.pool,
      secretKey: o.config.CODEX_AUTH_SECRET_KEY,
      refresher: core.refresher,
      clients: core.clients,
      renderer,
      served: renderers,
      credentialSecret: core.credentialSecret,
      core,
      metrics,
      logins: core.logins,
      authFailures,
    });
  }
  return app;
}

/** 503 + Retry-After, naming the first limit exceeded (in under-pressure's order of checks). */
function shed(reply: FastifyReply, limits: { maxEventLoopDelay: number; maxHeapUsedBytes: number; maxRssBytes: number }, m: { eventLoopDelay: number; heapUsed: number; rssBytes: number }): void {
  const [type, value] =
    limits.maxEventLoopDelay > 0 && m.eventLoopDelay > limits.maxEventLoopDelay
      ? ['eventLoopDelay', m.eventLoopDelay]
      : limits.maxHeapUsedBytes > 0 && m.heapUsed > limits.maxHeapUsedBytes
        ? ['heapUsedBytes', m.heapUsed]
        : ['rssBytes', m.rssBytes];
  sendProblem(reply, {
    status: 503,
    code: 'overloaded',
    title: 'Service Unavailable',
    detail: `the broker is overloaded (${type} ${String(value)}); retry shortly`,
    headers: { 'retry-after': '5' },
  });
}
