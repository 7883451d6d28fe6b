import type { Server } from 'node:http';
import { ENV_VARIABLES, type Config } from '../config.js';
import { connectionCap, isFdExhaustion, openFileLimit } from '../lib/fd-limit.js';
import type { Logger } from '../logger.js';

export type HttpLimitsConfig = Pick<
  Config,
  'MAX_CONNECTIONS' | 'HTTP_CONNECTION_TIMEOUT_SECONDS' | 'HTTP_HEADERS_TIMEOUT_SECONDS' | 'HTTP_REQUEST_TIMEOUT_SECONDS' | 'HTTP_KEEP_ALIVE_TIMEOUT_SECONDS'
>;

/** A value from the config, or the schema's default for an app built without it (tests). */
function setting<K extends keyof HttpLimitsConfig>(c: Partial<HttpLimitsConfig>, name: K): number {
  return c[name] ?? ENV_VARIABLES[name].default;
}

const ms = (seconds: number) => Math.round(seconds * 1000);

/** The Fastify constructor's deadlines for client connections. */
export function serverTimeouts(c: Partial<HttpLimitsConfig>) {
  const headersTimeout = ms(setting(c, 'HTTP_HEADERS_TIMEOUT_SECONDS'));
  const requestTimeout = ms(setting(c, 'HTTP_REQUEST_TIMEOUT_SECONDS'));
  return {
    // Socket inactivity: the one deadline Node applies to a socket that never sends a byte
    // (the headers deadline does not cover it on Node 20). The server must be built by
    // FastLane.serverFactory, which arms it once per connection and lifts it at the first
    // request (guardConnections refuses a server that Node would re-arm it on per request).
    connectionTimeout: ms(setting(c, 'HTTP_CONNECTION_TIMEOUT_SECONDS')),
    keepAliveTimeout: ms(setting(c, 'HTTP_KEEP_ALIVE_TIMEOUT_SECONDS')),
    requestTimeout,
    http: {
      headersTimeout,
      requestTimeout,
      // Headers and request deadlines are enforced only when this timer sweeps (Node's default: every 30 s).
      connectionsCheckingInterval: Math.max(50, Math.min(1_000, Math.floor(headersTimeout / 2))),
    },
  };
}

/** Call fn at most once per interval, with how many calls were skipped since the last one. */
export function throttle(intervalMs: number, now: () => number = Date.now): (fn: (skipped: number) => void) => void {
  let last = -Infinity;
  let skipped = 0;
  return (fn) => {
    if (now() - last < intervalMs) {
      skipped++;
      return;
    }
    last = now();
    const n = skipped;
    skipped = 0;
    fn(n);
  };
}

/** One warning line (at most every 10 s) for running out of file descriptors, wherever it showed. */
export function fdExhaustionReporter(logger: Logger): (err: Error, where: string) => void {
  const report = throttle(10_000);
  return (err, where) =>
    report((skipped) =>
      logger.error(
        { event: 'fd_exhausted', code: (err as NodeJS.ErrnoException).code, where, skipped },
        `out of file descriptors (${(err as NodeJS.ErrnoException).code}) in ${where}; the broker keeps running and recovers as connections close. Raise the open-file limit (ulimit -n, LimitNOFILE, docker --ulimit nofile) or lower MAX_CONNECTIONS`,
      ),
    );
}

/**
 * The connection cap and what keeps a connection flood from taking the process down: a
 * full server refuses new connections (counted in a throttled warning) instead of running
 * out of file descriptors, and an accept that still fails for want of one is logged, not
 * thrown (an 'error' with no listener would be an uncaught exception).
 */
export function guardConnections(server: Server, c: Partial<HttpLimitsConfig>, logger: Logger, fdLimit = openFileLimit()): number {
  const wanted = setting(c, 'MAX_CONNECTIONS');
  const cap = connectionCap(wanted, fdLimit);
  if (cap < wanted) {
    logger.warn(
      { event: 'max_connections_capped', maxConnections: wanted, cap, fdLimit },
      `MAX_CONNECTIONS=${wanted} would let client sockets take every file descriptor (open-file limit ${String(fdLimit)}); serving at most ${cap} connections. Raise the limit (ulimit -n, LimitNOFILE, docker --ulimit nofile) or lower MAX_CONNECTIONS`,
    );
  }
  server.maxConnections = cap;
  // A server given the deadline with server.setTimeout() (Fastify's own server, when built
  // without the lane's factory) has Node arm it again as every kept-alive request begins,
  // and nothing here would lift it: it would cut an answer that waits on the upstream.
  if (server.timeout > 0) {
    throw new Error(`guardConnections: the server re-arms a ${server.timeout} ms inactivity deadline at every kept-alive request (server.setTimeout); build it with FastLane.serverFactory, which arms the nothing-sent deadline once per connection`);
  }

  const dropped = throttle(10_000);
  server.on('drop', () =>
    dropped((skipped) =>
      logger.warn(
        { event: 'connections_refused', cap, refused: skipped + 1 },
        `refused ${skipped + 1} connection(s): ${cap} (MAX_CONNECTIONS) are open. Idle ones close after HTTP_CONNECTION_TIMEOUT_SECONDS; if this is real load, raise MAX_CONNECTIONS and the open-file limit`,
      ),
    ),
  );

  const fdExhausted = fdExhaustionReporter(logger);
  // After listening only: a failure to listen (EADDRINUSE) is listen()'s to report.
  server.once('listening', () =>
    server.on('error', (err) => {
      if (isFdExhaustion(err)) fdExhausted(err, 'accepting a connection');
      else logger.error({ event: 'http_server_error', err: { message: err.message, code: (err as NodeJS.ErrnoException).code } }, `the HTTP server reported an error: ${err.message}`);
    }),
  );
  return cap;
}
