/** The requests the benches send: each rotates over the loaded clients, one client per request. */
import type autocannon from 'autocannon';
import type { ServeInfo } from './server.js';

export type RequestSpec = NonNullable<Parameters<typeof autocannon>[0]['requests']>[number];

/** The generation a stale shim caller presents: never the current one, so the broker answers with its tokens. */
export const STALE_GENERATION = 'AAAAAAAAAAAA';

/** A stale caller's refresh request to the shim, as codex sends it. */
export function shimBody(refresh: string, staleGeneration: string): string {
  return JSON.stringify({ grant_type: 'refresh_token', refresh_token: `${refresh}.${staleGeneration}`, client_id: 'app_bench' });
}

/** A request whose headers or body rotate over the loaded clients, one per request. */
function rotating(make: (c: ServeInfo['clients'][number]) => Omit<RequestSpec, 'setupRequest'>, clients: ServeInfo['clients']): RequestSpec {
  let i = 0;
  return {
    setupRequest: (req) => {
      const c = clients[i++ % clients.length];
      if (!c) return req;
      return { ...req, ...make(c) };
    },
  };
}

/** Every served request the bench sends, each rotating over the given clients. */
export function requestSpecs(clients: ServeInfo['clients'], staleGeneration: string) {
  const bearer = (c: ServeInfo['clients'][number]) => ({ authorization: `Bearer ${c.token}` });
  const get200 = () => rotating((c) => ({ method: 'GET', path: '/codex-auth', headers: bearer(c) }), clients);
  return {
    /** A fresh spec per use: each keeps its own rotation counter. */
    get200,
    get304: rotating((c) => ({ method: 'GET', path: '/codex-auth', headers: { ...bearer(c), 'if-none-match': c.etag } }), clients),
    dropIn: rotating((c) => ({ method: 'GET', path: `/workspaces/${c.workspaceId}/secrets/values`, headers: bearer(c) }), clients),
    shim: rotating(
      (c) => ({
        method: 'POST',
        path: '/oauth/token',
        headers: { 'content-type': 'application/json' },
        body: shimBody(c.refresh, staleGeneration),
      }),
      clients,
    ),
    healthz: rotating(() => ({ method: 'GET', path: '/healthz' }), clients),
    metrics: rotating(() => ({ method: 'GET', path: '/metrics' }), clients),
  };
}

/**
 * The cases `npm run bench:ab` and `npm run bench:profile` take by name (AB_CASES,
 * PROFILE_CASES): `bare` is the bare route inside the broker's process, loaded with GET
 * /codex-auth's requests; the rest are the broker's routes, each with a fresh rotation.
 */
export const NAMED_CASES: Record<string, { bare: boolean; spec: (clients: ServeInfo['clients']) => RequestSpec }> = {
  bare: { bare: true, spec: (cl) => requestSpecs(cl, '').get200() },
  '200': { bare: false, spec: (cl) => requestSpecs(cl, '').get200() },
  '304': { bare: false, spec: (cl) => requestSpecs(cl, '').get304 },
  dropin: { bare: false, spec: (cl) => requestSpecs(cl, '').dropIn },
  healthz: { bare: false, spec: (cl) => requestSpecs(cl, '').healthz },
  shim: { bare: false, spec: (cl) => requestSpecs(cl, STALE_GENERATION).shim },
};
