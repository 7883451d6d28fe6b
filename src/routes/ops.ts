import { readFile } from 'node:fs/promises';
import type { FastifyInstance } from 'fastify';
import type { BrokerCore } from '../broker.js';
import type { Client } from '../clients/registry.js';
import { unusable } from '../credential.js';
import { sha256 } from '../clients/credentials.js';
import { AuthFailures, bearerToken, sameSecret } from '../http/auth.js';
import { type FastLane, writeAnswer } from '../http/lane.js';
import { isAscii } from '../serving.js';
import { sendProblem, sendUnauthorized } from '../http/problem.js';
import { isoFromSeconds } from '../lib/time.js';
import type { BrokerMetrics } from '../metrics.js';

export interface OpsRoutesOptions {
  /** Serves /healthz in front of Fastify (see http/lane.ts). */
  lane?: FastLane;
  core: BrokerCore;
  metrics: BrokerMetrics;
  adminToken: string | undefined;
  metricsToken: string | undefined;
  now: () => number;
  /** Extra authorisation for /status: the client a token belongs to (admin is always accepted). */
  clientFor?: (token: string) => Client | undefined;
  /** Refresh gauges that are computed rather than tracked (clients by state). */
  beforeScrape?: () => void;
  /** Shared with the admin routes: a wrong token here is slowed and counted the same way. */
  authFailures?: AuthFailures;
}

const SPEC_URL = new URL('../../openapi.yaml', import.meta.url);

/** Liveness, readiness, metrics and status: what operators, Prometheus and dashboards read. */
export async function opsRoutes(app: FastifyInstance, o: OpsRoutesOptions): Promise<void> {
  const adminSha = o.adminToken ? sha256(o.adminToken) : undefined;
  const metricsSha = o.metricsToken ? sha256(o.metricsToken) : undefined;
  const { refresher } = o.core;
  const failures = o.authFailures ?? new AuthFailures({ logger: app.log });

  // Readiness asks the database at most once a second, however often it is probed.
  let storeCheck: { at: number; ok: boolean; message?: string } | undefined;
  const storeReachable = async (): Promise<{ ok: boolean; message?: string }> => {
    const t = Date.now();
    if (storeCheck && t - storeCheck.at < 1_000) return storeCheck;
    try {
      await o.core.pool.query('SELECT 1');
      storeCheck = { at: t, ok: true };
    } catch (err) {
      storeCheck = { at: t, ok: false, message: (err as Error).message };
    }
    return storeCheck;
  };

  // Probed often: the body is written as JSON.stringify would write it (every field but
  // the replica id is a fixed word, a boolean or an integer), in a synchronous handler, and
  // built again only when what it says changed (at most once a second: the uptime), with
  // its content-length as text.
  interface Health {
    state: string;
    pending: boolean;
    connected: boolean;
    replicaId: string;
    uptime: number;
    body: string;
    bytes: string;
    /** The body is ASCII (unless the replica id is not): written as Latin-1, copied instead of encoded. */
    ascii: boolean;
  }
  let last: Health | undefined;
  const health = (): Health => {
    const state = refresher.state();
    const pending = refresher.pending !== undefined;
    const connected = o.core.listener.connected;
    const replicaId = refresher.replicaId;
    const uptime = Math.round(process.uptime());
    const l = last;
    if (l !== undefined && l.state === state && l.pending === pending && l.connected === connected && l.replicaId === replicaId && l.uptime === uptime) return l;
    const status = state === 'fresh' || state === 'due' ? 'ok' : 'degraded';
    const listener = connected ? 'connected' : 'disconnected';
    const body = `{"status":"${status}","credentialState":"${state}","writebackPending":${pending},"listener":"${listener}","replicaId":${JSON.stringify(replicaId)},"uptimeSeconds":${uptime}}`;
    const bytes = Buffer.byteLength(body);
    last = { state, pending, connected, replicaId, uptime, body, bytes: String(bytes), ascii: isAscii(body, bytes) };
    return last;
  };
  app.get('/healthz', (_req, reply) => {
    reply.type('application/json; charset=utf-8').send(health().body);
  });
  const lane = o.lane;
  lane?.get('/healthz', (req, res) => {
    const h = health();
    writeAnswer(res, 200, ['x-request-id', lane.requestId(req), 'content-type', 'application/json; charset=utf-8', 'content-length', h.bytes], h.body, h.ascii);
    return 200;
  });

  app.get('/readyz', async (_req, reply) => {
    const store = await storeReachable();
    const snap = refresher.current();
    const state = refresher.state();
    // The same rule GET /codex-auth serves by: ready exactly when a workspace would get a token.
    const why = unusable(snap, o.now());
    const pending = refresher.pending !== undefined;
    // A pending rotation is the only valid token: keep serving it even with the store down.
    if (!store.ok && !pending) {
      return sendProblem(reply, {
        status: 503,
        code: 'store_unreachable',
        title: 'Service Unavailable',
        detail: 'the database is unreachable; check DATABASE_URL and the database',
        headers: { 'retry-after': '5' },
      });
    }
    if (why) {
      const code = !snap && state === 'invalid' ? 'credential_unreadable' : why;
      const detail =
        code === 'no_credential'
          ? 'no usable credential is stored: log in (`npx codex-auth-broker login`) or seed (`npx codex-auth-broker seed auth.json`) or PUT /admin/credential'
          : code === 'credential_unreadable'
            ? `the stored credential cannot be read (${refresher.readError?.code ?? 'unknown'}); see /status and the logs`
            : 'the held access token has expired; see /status for the last refresh error';
      return sendProblem(reply, { status: 503, code, title: 'Service Unavailable', detail, headers: { 'retry-after': '30' } });
    }
    return { status: 'ready', credentialState: state, accessTokenExpiresAt: isoFromSeconds(snap?.claims.exp), writebackPending: pending };
  });

  app.get('/metrics', async (req, reply) => {
    if (metricsSha) {
      const t = bearerToken(req);
      if (!t || !sameSecret(t, metricsSha)) {
        return sendUnauthorized(reply, 'a valid METRICS_TOKEN bearer token is required');
      }
    }
    o.beforeScrape?.();
    const body = await o.metrics.registry.metrics();
    return reply.type(o.metrics.registry.contentType).send(body);
  });

  app.get('/status', async (req, reply) => {
    const t = bearerToken(req);
    if (t !== undefined && failures.saturated) return failures.throttle(req, reply);
    const admin = t !== undefined && adminSha !== undefined && sameSecret(t, adminSha);
    const caller = !admin && t !== undefined ? o.clientFor?.(t) : undefined;
    if (!admin && !caller) {
      const detail = adminSha ? 'an ADMIN_TOKEN or client bearer token is required' : 'a client bearer token is required (ADMIN_TOKEN is not set)';
      return t === undefined ? sendUnauthorized(reply, detail) : failures.reject(req, reply, detail);
    }
    const credentials = o.core.credentials.list().map((h) => {
      const s = h.refresher.status();
      // The whole description of each login (plan, rotations, next check, usage), so a
      // dashboard or the operator page shows every credential as fully as `default`.
      return { ...s, name: h.name, pool: h.pool, clientsAssigned: o.core.assignments.clientsOf(h.name), usage: o.core.usage.view(s.secretKey) };
    });
    // Which credential each client is served now, from memory. A client token sees only its own entry, never another client's name.
    const served = (c: Client) => ({ name: c.name, pool: c.pool, credential: o.core.assignments.credentialFor(c)?.name ?? null });
    const who = caller
      ? { client: served(caller) }
      : { clients: [...o.core.clients.all()].filter((c) => c.kind === 'broker').map(served).sort((x, y) => (x.name < y.name ? -1 : x.name > y.name ? 1 : 0)) };
    const status = refresher.status();
    return {
      ...status,
      credentials,
      ...who,
      // Pools whose every login is at or over POOL_SWITCH_PERCENT: nobody can move (`status` exits 5).
      exhaustedPools: o.core.assignments.exhaustedPools(),
      listener: o.core.listener.connected ? 'connected' : 'disconnected',
      usage: o.core.usage.view(status.secretKey),
    };
  });

  app.get('/openapi.yaml', async (_req, reply) => reply.type('application/yaml').send(await readFile(SPEC_URL, 'utf8')));
}
