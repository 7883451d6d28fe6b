/**
 * The broker's outbound HTTP client: undici's dispatcher, request API and EnvHttpProxyAgent,
 * loaded file by file instead of through undici's index.
 *
 * undici's index requires all of undici at once: fetch, WebSocket, EventSource, the cache
 * stores, the mock agents and every interceptor, with the node internals they pull in
 * (web streams, zlib, sqlite, worker threads …). The broker uses none of them. Loaded
 * whole, undici costs a process 4.7 MB of heap and about 20 MB of RSS; the parts below
 * 2.0 MB and 11 MB (measured with `require` after a full GC; BENCHMARKS.md, history,
 * session 10). undici has no `exports` map, so these paths are public to node; the test
 * "the broker process loads undici's client and proxy agent, not the rest of undici …"
 * fails if an upgrade moves them or the index comes back.
 *
 * Semantics are undici's `request(url, opts)`: the URL gives origin and path, the
 * dispatcher defaults to undici's global one (what the index's `request` uses), and the
 * answer is the dispatcher's `request()` (the documented Dispatcher API).
 */
import { createRequire } from 'node:module';
import type { Dispatcher, EnvHttpProxyAgent as EnvHttpProxyAgentClass } from 'undici';

const require = createRequire(import.meta.url);

const DispatcherBase = require('undici/lib/dispatcher/dispatcher.js') as { prototype: object };
const api = require('undici/lib/api/index.js') as object;
// What undici's index does once: the request/stream/pipeline/… methods on every dispatcher.
Object.assign(DispatcherBase.prototype, api);
const { getGlobalDispatcher } = require('undici/lib/global.js') as { getGlobalDispatcher: () => Dispatcher };

export const EnvHttpProxyAgent = require('undici/lib/dispatcher/env-http-proxy-agent.js') as typeof EnvHttpProxyAgentClass;

export type RequestOptions = Omit<Dispatcher.RequestOptions, 'origin' | 'path' | 'method'> & {
  method: Dispatcher.HttpMethod;
  dispatcher?: Dispatcher | undefined;
};

/** undici's `request(url, opts)`, on the dispatcher given or undici's global one. */
export function request(url: string, opts: RequestOptions): Promise<Dispatcher.ResponseData> {
  const u = new URL(url);
  const { dispatcher = getGlobalDispatcher(), ...rest } = opts;
  return dispatcher.request({ ...rest, origin: u.origin, path: `${u.pathname}${u.search}` });
}
