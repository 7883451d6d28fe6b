import { createRequire } from 'node:module';
import type * as Pg from 'pg';

export type { Client, Pool, PoolClient } from 'pg';

/**
 * pg, loaded without Node's own fetch implementation.
 *
 * pg asks once, as it loads (lib/stream.js), whether it runs on Cloudflare Workers: it reads
 * `navigator.userAgent`, and where there is no `navigator` (Node 20) it builds a
 * `new Response(...)` to look for Cloudflare's `cf` field. On Node 20 that loads Node's
 * bundled undici (fetch, Response, Headers and the web streams), which the broker never
 * uses: 1.8 MB of heap and 6 MB of RSS for the process's whole life (BENCHMARKS.md, history,
 * session 17). So the global `Response` reads as undefined while pg loads (pg
 * then takes Node's sockets, the answer it would reach anyway) and is put back, untouched
 * and still lazy, right after. Node 21 and later have `navigator`: pg never gets to
 * `Response` there, and this leaves it alone.
 *
 * This module is the only place the broker loads pg from; it must load before anything
 * else loads pg (test/footprint.test.ts checks that the serving process never loads fetch).
 */
function loadPg(): typeof Pg {
  const require = createRequire(import.meta.url);
  // pg's own test: with a navigator whose userAgent is a string (Node 21 and later), it never
  // looks at Response, and neither may this: on Node 22 even reading Response's property
  // descriptor loads fetch (its lazy global materializes).
  const navigator = (globalThis as { navigator?: { userAgent?: unknown } | null }).navigator;
  if (typeof navigator === 'object' && navigator !== null && typeof navigator.userAgent === 'string') return require('pg') as typeof Pg;
  const response = Object.getOwnPropertyDescriptor(globalThis, 'Response');
  if (!response?.configurable) return require('pg') as typeof Pg;
  Object.defineProperty(globalThis, 'Response', { value: undefined, configurable: true, writable: true });
  try {
    return require('pg') as typeof Pg;
  } finally {
    Object.defineProperty(globalThis, 'Response', response);
  }
}

export const pg = loadPg();
