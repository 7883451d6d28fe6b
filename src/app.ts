import underPressure from '@fastify/under-pressure';
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import type { BrokerCore } from './broker.js';
import type { Config } from './config.js';
import { errorHandler, notFoundHandler, sendProblem } from './http/problem.js';
import type { Logger } from './logger.js';
import type { BrokerMetrics } from './metrics.js';
import { opsRoutes } from './routes/ops.js';

export interface AppOptions {
  config: Pick<Config, 'ADMIN_TOKEN' | 'METRICS_TOKEN'>;
  core: BrokerCore;
  metrics: BrokerMetrics;
  logger: Logger;
  now?: () => number;
}

/**
 * The HTTP app, composed explicitly. It never listens: the entry point owns the
 * socket, signals and the database lifecycle.
 */
export async function buildApp(o: AppOptions): Promise<FastifyInstance> {
  const app = Fastify({
    loggerInstance: o.logger as FastifyBaseLogger,
    // Per-request lines would drown the domain events at fleet scale; metrics count requests.
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: 1024 * 1024,
    requestIdHeader: 'x-request-id',
    return503OnClosing: true,
  });
  app.setErrorHandler(errorHandler);
  app.setNotFoundHandler(notFoundHandler);

  app.addHook('onResponse', async (req, reply) => {
    const route = req.routeOptions.url ?? 'unmatched';
    o.metrics.httpDuration.observe({ method: req.method, route, status_code: String(reply.statusCode) }, reply.elapsedTime / 1000);
  });

  await app.register(underPressure, {
    maxEventLoopDelay: 1000,
    retryAfter: 5,
    pressureHandler: (_req, reply, type, value) => {
      sendProblem(reply, {
        status: 503,
        code: 'overloaded',
        title: 'Service Unavailable',
        detail: `the broker is overloaded (${type}${value !== undefined ? ` ${String(value)}` : ''}); retry shortly`,
        headers: { 'retry-after': '5' },
      });
    },
  });

  await app.register(opsRoutes, {
    core: o.core,
    metrics: o.metrics,
    adminToken: o.config.ADMIN_TOKEN,
    metricsToken: o.config.METRICS_TOKEN,
    now: o.now ?? Date.now,
  });
  return app;
}
