import type { FastifyInstance } from 'fastify';
import { ClientInputError, createClient, listClients, revokeClient } from '../clients/client-store.js';
import type { ClientRegistry } from '../clients/registry.js';
import type { Pool } from '../db.js';
import { sha256 } from '../clients/credentials.js';
import { AuthFailures, bearerToken, sameSecret } from '../http/auth.js';
import { sendProblem, sendUnauthorized } from '../http/problem.js';
import { latestEvents } from '../audit.js';
import type { BrokerMetrics } from '../metrics.js';
import { credentialRoutes, type CredentialRoutesOptions } from './credentials.js';
import { loginRoutes } from './logins.js';
import type { LoginManager } from '../login/logins.js';
import type { Refresher } from '../refresher.js';
import type { DocumentRenderer, ServedCredentials } from '../serving.js';

export interface AdminRoutesOptions {
  adminToken: string;
  pool: Pool;
  secretKey: string;
  refresher: Refresher;
  clients: ClientRegistry;
  renderer: DocumentRenderer;
  /** Which credential each client is served (GET /admin/clients shows it). */
  served?: ServedCredentials;
  credentialSecret: Buffer;
  /** Named credentials, their seeding, refresh and upstream revocation (routes/credentials.ts). */
  core: CredentialRoutesOptions['core'];
  metrics: BrokerMetrics;
  logins?: LoginManager;
  /** Shared with /status, so one count and one cap cover every admin-token check. */
  authFailures?: AuthFailures;
}

/** Operator routes behind ADMIN_TOKEN. Registered only when ADMIN_TOKEN is set. */
export async function adminRoutes(app: FastifyInstance, o: AdminRoutesOptions): Promise<void> {
  const adminSha = sha256(o.adminToken);
  const failures = o.authFailures ?? new AuthFailures({ logger: app.log });
  app.addHook('onRequest', async (req, reply) => {
    const t = bearerToken(req);
    if (!t) return sendUnauthorized(reply, 'the ADMIN_TOKEN bearer token is required');
    if (failures.saturated) return failures.throttle(req, reply);
    // A wrong token is a guess (or a misconfiguration): slowed, capped and counted.
    if (!sameSecret(t, adminSha)) return failures.reject(req, reply, 'the ADMIN_TOKEN bearer token is required');
    return undefined;
  });
  // In this plugin's scope, so the admin check above guards the login routes too.
  if (o.logins) await app.register(loginRoutes, { logins: o.logins });

  app.post('/admin/refresh', async () => {
    const report = await o.refresher.runCycle({ force: true, waitForLock: true, ignoreBackoff: true, reason: 'admin' });
    return { outcome: report.attempt ?? report.check, report, status: o.refresher.status() };
  });

  // Named credentials, and the old PUT /admin/credential as `default`'s.
  await app.register(credentialRoutes, { core: o.core, defaultKey: o.secretKey, replicaId: o.refresher.replicaId, metrics: o.metrics });

  app.get<{ Querystring: { limit?: string } }>('/admin/events', async (req, reply) => {
    const limit = req.query.limit === undefined ? 50 : Number(req.query.limit);
    if (!Number.isInteger(limit) || limit < 1 || limit > 1000) {
      return sendProblem(reply, { status: 400, code: 'invalid_limit', title: 'Bad Request', detail: 'limit must be an integer from 1 to 1000', extra: { field: 'limit' } });
    }
    return { events: await latestEvents(o.pool, o.secretKey, limit) };
  });

  app.post('/admin/clients', async (req, reply) => {
    const b = (req.body ?? {}) as Record<string, unknown>;
    try {
      const created = await createClient(o.pool, o.credentialSecret, b['name'], b['workspaceId'], b['pool']);
      await o.clients.reload();
      req.log.info({ event: 'client_added', client: created.name }, `added client ${created.name}`);
      return reply.code(201).header('cache-control', 'no-store').send(created);
    } catch (err) {
      if (err instanceof ClientInputError) {
        const conflict = /already exists/.test(err.message);
        return sendProblem(reply, { status: conflict ? 409 : 400, code: conflict ? 'client_exists' : 'invalid_client', title: conflict ? 'Conflict' : 'Bad Request', detail: err.message, extra: { field: err.field } });
      }
      throw err;
    }
  });

  app.get('/admin/clients', async () => {
    // This replica's latest sightings first; the others flush theirs every few seconds.
    await o.clients.flush().catch(() => 0);
    const rows = await listClients(o.pool);
    const live = new Map([...o.clients.all()].map((c) => [c.name, c]));
    return {
      clients: rows.map((r) => {
        const c = live.get(r.name);
        // What this client is served now, and whether it holds that credential's current token.
        const served = c && o.served ? o.served.for(c) : undefined;
        const current = served ? served.renderer.currentGeneration() : o.renderer.currentGeneration();
        return {
        name: r.name,
        workspaceId: r.workspaceId,
        pool: r.pool,
        assignedCredential: served?.name ?? r.assignedCredential,
        createdAt: r.createdAt,
        lastUsedAt: r.lastUsedAt,
        holdsCurrentToken: current !== undefined && r.lastServedGeneration === current,
        state: r.lastUsedAt === null ? 'never_seen' : r.lastServedGeneration === current ? 'active' : 'stale',
        };
      }),
    };
  });

  app.delete<{ Params: { name: string } }>('/admin/clients/:name', async (req, reply) => {
    if (!(await revokeClient(o.pool, req.params.name))) {
      return sendProblem(reply, { status: 404, code: 'not_found', title: 'Not Found', detail: `no live client named ${req.params.name}` });
    }
    await o.clients.reload();
    req.log.info({ event: 'client_revoked', client: req.params.name }, `revoked client ${req.params.name}`);
    return reply.code(204).send();
  });
}
