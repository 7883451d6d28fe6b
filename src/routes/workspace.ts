import type { IncomingMessage, ServerResponse } from 'node:http';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { UUID } from '../clients/client-store.js';
import type { Client, ClientRegistry } from '../clients/registry.js';
import { bearerOf } from '../http/auth.js';
import { digits, type FastLane, writeAnswer } from '../http/lane.js';
import { sendProblem, sendUnauthorized } from '../http/problem.js';
import { labelled, type BrokerMetrics } from '../metrics.js';
import type { Rendered, ServedCredentials } from '../serving.js';

export interface WorkspaceRoutesOptions {
  /** Serves the routes' plain successes in front of Fastify (see http/lane.ts). */
  lane?: FastLane;
  clients: ClientRegistry;
  /** Which credential each client is served (its assignment in its pool). */
  served: ServedCredentials;
  metrics: BrokerMetrics;
  now: () => number;
  /**
   * The lane's clock: the wall time at a performance.now() reading the lane already took
   * (lib/time.ts, wallClock; the app passes an injected clock through instead).
   */
  nowAt: (perfNow: number) => number;
  /** Platform workspace tokens are accepted on the drop-in route only. */
  platformTokens: boolean;
}

function matches(ifNoneMatch: string | undefined, etag: string): boolean {
  if (!ifNoneMatch) return false;
  // What a workspace sends back: the one ETag it was given.
  if (ifNoneMatch === etag) return true;
  if (ifNoneMatch.trim() === '*') return true;
  return ifNoneMatch.split(',').some((t) => t.trim().replace(/^W\//, '') === etag);
}

/** What every workspace polls: the current login, at no database cost. */
export async function workspaceRoutes(app: FastifyInstance, o: WorkspaceRoutesOptions): Promise<void> {
  const tokenServed = labelled(o.metrics.tokenServed);
  const served = (route: string, result: string) => tokenServed(route, result).inc();

  /** The client an Authorization header names, if it may read this route (both paths ask this). */
  const clientOf = (authorization: string | undefined, allowPlatform: boolean): Client | undefined => {
    // A token matched before is found as the header's tail, without reading the header
    // character by character: it came out of bearerOf, so bearerOf would read exactly it.
    let client = authorization !== undefined && authorization.startsWith('Bearer ') ? o.clients.matchedBefore(authorization.slice(7)) : undefined;
    if (client === undefined) {
      const token = bearerOf(authorization);
      client = token ? o.clients.authenticate(token) : undefined;
    }
    return client && (client.kind !== 'platform' || allowPlatform) ? client : undefined;
  };
  /** Whether a client may read this workspace: unbound, or bound to it (UUIDs compare without case). */
  const mayRead = (client: Client, workspaceId: string): boolean => {
    const bound = client.workspaceId;
    return bound === null || bound === workspaceId || bound.toLowerCase() === workspaceId.toLowerCase();
  };

  const unauthorized = (reply: FastifyReply, route: string) => {
    served(route, 'unauthorized');
    return sendUnauthorized(reply, 'a valid client bearer token is required (missing, unknown or revoked)');
  };

  /** Authenticate, check availability, render; undefined when a reply was already sent. */
  const prepare = (req: FastifyRequest, reply: FastifyReply, route: string, allowPlatform: boolean): { client: Client; doc: Rendered } | undefined => {
    const client = clientOf(req.headers.authorization, allowPlatform);
    if (!client) {
      unauthorized(reply, route);
      return undefined;
    }
    const credential = o.served.for(client);
    const why = credential
      ? credential.renderer.unavailable()
      : { code: 'no_credential' as const, detail: `the client's pool ${client.pool} holds no credential; an operator must seed one into it` };
    if (why || !credential) {
      served(route, 'unavailable');
      sendProblem(reply, { status: 503, code: why?.code ?? 'no_credential', title: 'Service Unavailable', detail: why?.detail ?? '', headers: { 'retry-after': '30' } });
      return undefined;
    }
    // Names the login served (never a secret): operators and agents can tell accounts apart.
    reply.header('x-codex-credential', credential.name);
    return { client, doc: credential.renderer.render(client) };
  };

  /** A 304 when the caller's ETag matches (the body is never built), else the document. */
  const send = (req: FastifyRequest, reply: FastifyReply, route: string, client: Client, etag: string, doc: Rendered, platformShape: boolean) => {
    o.clients.markServed(client, doc.generation, o.now());
    reply.header('etag', etag).header('cache-control', 'no-store');
    if (matches(req.headers['if-none-match'], etag)) {
      served(route, 'not_modified');
      return reply.code(304).send();
    }
    served(route, 'ok');
    return reply.type('application/json; charset=utf-8').send(platformShape ? doc.platformBody : doc.body);
  };

  // Synchronous handlers that send: no promise and no extra microtask per request.
  app.get('/codex-auth', (req, reply) => {
    const ready = prepare(req, reply, '/codex-auth', false);
    if (ready) send(req, reply, '/codex-auth', ready.client, ready.doc.etag, ready.doc, false);
  });

  const dropIn = '/workspaces/:id/secrets/values';
  app.get<{ Params: { id: string } }>(dropIn, (req, reply) => {
    if (!UUID.test(req.params.id)) {
      served(dropIn, 'bad_request');
      sendProblem(reply, { status: 400, code: 'invalid_workspace_id', title: 'Bad Request', detail: 'the workspace id must be a UUID' });
      return;
    }
    const ready = prepare(req, reply, dropIn, o.platformTokens);
    if (!ready) return;
    if (!mayRead(ready.client, req.params.id)) {
      served(dropIn, 'not_found');
      sendProblem(reply, { status: 404, code: 'not_found', title: 'Not Found', detail: 'no such workspace for this token' });
      return;
    }
    // The platform's shape: a flat object whose CODEX_AUTH_JSON member is auth.json as a string.
    send(req, reply, dropIn, ready.client, ready.doc.platformEtag, ready.doc, true);
  });

  // The plain successes again, in front of Fastify (http/lane.ts): the same checks
  // (clientOf, mayRead, a servable credential), and the same headers and body as send()
  // above. Anything that would not succeed declines (0) and Fastify answers it through the
  // routes above.
  const lane = o.lane;
  if (!lane) return;
  /**
   * A lane route's two counts, looked up once instead of by two labels per request, and
   * its content-length as text: the same number request after request (every client's
   * credential has one length), converted once instead of twice per request by Node.
   */
  const counts = (route: string) => ({ ok: tokenServed(route, 'ok'), notModified: tokenServed(route, 'not_modified'), length: digits() });
  const nowAt = o.nowAt;
  const answer = (req: IncomingMessage, res: ServerResponse, count: ReturnType<typeof counts>, allowPlatform: boolean, workspaceId: string | undefined, t0: number): number => {
    const client = clientOf(req.headers.authorization, allowPlatform);
    if (!client || (workspaceId !== undefined && !mayRead(client, workspaceId))) return 0;
    // One time for the credential's state (whether the client keeps its assignment), the
    // availability check and the last-seen time, from the lane's own clock reading.
    const now = nowAt(t0);
    const credential = o.served.for(client, now);
    if (!credential || credential.renderer.unavailable(now)) return 0;
    // Everything that could throw comes before the first side effect (markServed, the
    // count): a fault declines to Fastify with nothing yet counted or marked.
    const doc = credential.renderer.render(client);
    const platformShape = workspaceId !== undefined;
    const etag = platformShape ? doc.platformEtag : doc.etag;
    const id = lane.requestId(req);
    // Flat lists of names and values: Node writes them as it writes an object's, without a hasOwnProperty per name.
    if (matches(req.headers['if-none-match'], etag)) {
      const headers = ['x-request-id', id, 'x-codex-credential', credential.name, 'etag', etag, 'cache-control', 'no-store'];
      o.clients.markServed(client, doc.generation, now);
      count.notModified.inc();
      res.writeHead(304, headers);
      res.end();
      return 304;
    }
    const body = platformShape ? doc.platformBody : doc.body;
    const headers = [
      'x-request-id',
      id,
      'x-codex-credential',
      credential.name,
      'etag',
      etag,
      'cache-control',
      'no-store',
      'content-type',
      'application/json; charset=utf-8',
      'content-length',
      count.length(platformShape ? doc.platformBodyBytes : doc.bodyBytes),
    ];
    o.clients.markServed(client, doc.generation, now);
    count.ok.inc();
    writeAnswer(res, 200, headers, body, doc.ascii);
    return 200;
  };
  const codexAuthCounts = counts('/codex-auth');
  const dropInCounts = counts(dropIn);
  lane.get('/codex-auth', (req, res, t0) => answer(req, res, codexAuthCounts, false, undefined, t0));
  lane.getParam(dropIn, '/workspaces/', '/secrets/values', (req, res, id, t0) => (UUID.test(id) ? answer(req, res, dropInCounts, o.platformTokens, id, t0) : 0));
}
