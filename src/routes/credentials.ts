import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { validateSeed } from '../auth-json.js';
import type { BrokerCore } from '../broker.js';
import { assignedClients, registerCredential, removeCredential } from '../credential/catalog.js';
import { DEFAULT_CREDENTIAL, isCredentialName, secretKeyOf } from '../credential/names.js';
import type { HeldCredential } from '../credential/set.js';
import { AuthJsonError } from '../errors.js';
import { sendProblem } from '../http/problem.js';
import type { Logger } from '../logger.js';
import type { BrokerMetrics } from '../metrics.js';
import { revokeStoredLogin } from '../revocation.js';
import { seedCredential, staleSeedProblem } from '../seed-guard.js';

export interface CredentialRoutesOptions {
  core: Pick<BrokerCore, 'credentials' | 'store' | 'pool' | 'revoke' | 'assignments' | 'usage'>;
  defaultKey: string;
  replicaId: string;
  metrics: BrokerMetrics;
}

const NAME_RULE = 'lower-case letters, digits and -, starting with a letter or digit, at most 40 characters';

function badName(reply: FastifyReply, field: string, value: string) {
  return sendProblem(reply, { status: 400, code: `invalid_${field}`, title: 'Bad Request', detail: `${JSON.stringify(value)} is not a valid ${field} name: ${NAME_RULE}`, extra: { field } });
}

function notHeld(reply: FastifyReply, name: string) {
  return sendProblem(reply, { status: 404, code: 'not_found', title: 'Not Found', detail: `no credential named ${name}; GET /admin/credentials lists them` });
}

/** What the admin API says about one credential: its pool and its refresher's status. No secret. */
export function describeCredential(h: HeldCredential) {
  return { name: h.name, pool: h.pool, ...h.refresher.status() };
}

/**
 * Named credentials (several logins side by side), inside the admin scope. Thin: the
 * stale-seed guard, the catalog and the refreshers do the work. The old single routes stay
 * as the `default` credential's: `PUT /admin/credential` here, `POST /admin/refresh` in admin.ts.
 */
export async function credentialRoutes(app: FastifyInstance, o: CredentialRoutesOptions): Promise<void> {
  const { credentials } = o.core;

  app.get('/admin/credentials', async () => ({
    // With each login's usage (plan, both windows, resets, age): what the pool moves by.
    credentials: credentials.list().map((h) => ({ ...describeCredential(h), clientsAssigned: o.core.assignments.clientsOf(h.name), usage: o.core.usage.view(h.secretKey) })),
  }));

  /**
   * The one seed over HTTP, for `PUT /admin/credentials/:name` and the old
   * `PUT /admin/credential` (which is `default`): the stale-seed guard, the list entry, this
   * replica's reload. The held credential, or undefined once a problem was sent.
   */
  const seed = async (req: FastifyRequest<{ Querystring: { force?: string } }>, reply: FastifyReply, name: string, pool: string | undefined): Promise<HeldCredential | undefined> => {
    const { force } = req.query;
    if (force !== undefined && force !== 'true' && force !== 'false') {
      sendProblem(reply, { status: 400, code: 'invalid_force', title: 'Bad Request', detail: 'force must be true or false', extra: { field: 'force' } });
      return undefined;
    }
    let parsed;
    try {
      parsed = validateSeed(req.body);
    } catch (err) {
      if (!(err instanceof AuthJsonError)) throw err;
      sendProblem(reply, { status: 400, code: 'invalid_credential', title: 'Bad Request', detail: err.message, extra: { field: err.field } });
      return undefined;
    }
    const seeded = await seedCredential({
      store: o.core.store,
      secretKey: secretKeyOf(name, o.defaultKey),
      parsed,
      source: 'admin_api',
      force: force === 'true',
      replicaId: o.replicaId,
      logger: req.log as Logger,
    });
    if (!seeded.stored) {
      sendProblem(reply, staleSeedProblem(seeded.refusal));
      return undefined;
    }
    // `default` has a row only once it is given a pool: a platform database stays untouched otherwise.
    if (name !== DEFAULT_CREDENTIAL || pool !== undefined) {
      await registerCredential(o.core.pool, name, o.defaultKey, pool);
      await credentials.sync();
    }
    const held = credentials.get(name);
    if (!held) {
      notHeld(reply, name);
      return undefined;
    }
    await held.refresher.reload();
    return held;
  };

  // The seed body is read as text and parsed by validateSeed, which names the bad field
  // (the framework's parser refuses a `__proto__` key as "not valid JSON" without naming it;
  // only JSON: a text/plain body would otherwise reach validateSeed through the default parser).
  await app.register(async (scope) => {
    scope.removeAllContentTypeParsers();
    scope.addContentTypeParser('application/json', { parseAs: 'string' }, (_req, body, done) => done(null, body));
    scope.put<{ Params: { name: string }; Querystring: { force?: string; pool?: string } }>('/admin/credentials/:name', async (req, reply) => {
      const { name } = req.params;
      const { pool } = req.query;
      if (!isCredentialName(name)) return badName(reply, 'credential', name);
      if (pool !== undefined && !isCredentialName(pool)) return badName(reply, 'pool', pool);
      const held = await seed(req, reply, name, pool);
      if (!held) return reply;
      held.refresher.poke();
      return describeCredential(held);
    });
    scope.put<{ Querystring: { force?: string } }>('/admin/credential', async (req, reply) => {
      const held = await seed(req, reply, DEFAULT_CREDENTIAL, undefined);
      return held ? held.refresher.status() : reply;
    });
  });

  app.delete<{ Params: { name: string }; Querystring: { reassign?: string } }>('/admin/credentials/:name', async (req, reply) => {
    const { name } = req.params;
    const { reassign } = req.query;
    if (reassign !== undefined && reassign !== 'true' && reassign !== 'false') {
      return sendProblem(reply, { status: 400, code: 'invalid_reassign', title: 'Bad Request', detail: 'reassign must be true or false', extra: { field: 'reassign' } });
    }
    if (name === DEFAULT_CREDENTIAL) {
      return sendProblem(reply, { status: 409, code: 'default_credential', title: 'Conflict', detail: 'the default credential cannot be removed; seed or log in another login over it instead' });
    }
    const held = credentials.get(name);
    if (!held) return notHeld(reply, name);
    const assigned = await assignedClients(o.core.pool, name);
    if (assigned > 0 && reassign !== 'true') {
      return sendProblem(reply, {
        status: 409,
        code: 'credential_in_use',
        title: 'Conflict',
        detail: `${assigned} client(s) are assigned to ${name}; repeat with ?reassign=true to move them to the other credentials of pool ${held.pool} (running agents switch accounts)`,
        extra: { clientsAssigned: assigned },
      });
    }
    // Under the credential's lock: never between a refresher's POST and its write-back.
    await removeCredential(o.core.store, name, held.secretKey);
    await credentials.sync();
    // Its clients move now (reason `removed`), not at their next request.
    await o.core.assignments.rebalance();
    req.log.info({ event: 'credential_deleted', credential: name, clientsReassigned: assigned }, `removed credential ${name} and its stored login`);
    return reply.code(204).send();
  });

  app.post<{ Params: { name: string } }>('/admin/credentials/:name/refresh', async (req, reply) => {
    const held = credentials.get(req.params.name);
    if (!held) return notHeld(reply, req.params.name);
    const report = await held.refresher.runCycle({ force: true, waitForLock: true, ignoreBackoff: true, reason: 'admin' });
    return { outcome: report.attempt ?? report.check, report, status: held.refresher.status() };
  });

  app.post<{ Params: { name: string } }>('/admin/credentials/:name/revoke', async (req, reply) => {
    const { name } = req.params;
    const held = credentials.get(name);
    if (!held) return notHeld(reply, name);
    const r = await revokeStoredLogin({ store: o.core.store, secretKey: held.secretKey, revoke: o.core.revoke, replicaId: o.replicaId, logger: req.log as Logger, metrics: o.metrics });
    if (r.outcome === 'absent') {
      return sendProblem(reply, { status: 404, code: 'credential_absent', title: 'Not Found', detail: `no login is stored under ${name}: nothing to revoke` });
    }
    if (r.outcome === 'revoke_failed') {
      return sendProblem(reply, {
        status: 502,
        code: 'revoke_failed',
        title: 'Bad Gateway',
        detail: `the upstream did not revoke the login (${r.message}); nothing changed and the login is still in use. Retry to revoke it`,
        extra: { outcome: r.outcome, upstreamStatus: r.upstreamStatus ?? null, upstreamCode: r.upstreamCode ?? null },
      });
    }
    await held.refresher.reload().catch(() => undefined);
    held.refresher.adoptLatch(r.latch);
    return { outcome: r.outcome, status: held.refresher.status() };
  });
}
