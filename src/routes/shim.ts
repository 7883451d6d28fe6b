import type { FastifyError, FastifyInstance, FastifyReply } from 'fastify';
import { splitServedRefreshToken } from '../clients/credentials.js';
import type { Client, ClientRegistry } from '../clients/registry.js';
import { digits, type FastLane, writeAnswer } from '../http/lane.js';
import { labelled, type BrokerMetrics } from '../metrics.js';
import type { Refresher } from '../refresher.js';
import type { ServedCredential, ServedCredentials, ShimTokens } from '../serving.js';
import type { TokenVerifier } from '../token-check.js';

export interface ShimRoutesOptions {
  /** Serves the stale caller's answer in front of Fastify (see http/lane.ts). */
  lane?: FastLane;
  clients: ClientRegistry;
  /** Which credential each client is served (its assignment in its pool). */
  served: ServedCredentials;
  verifier: TokenVerifier;
  metrics: BrokerMetrics;
  now: () => number;
  forcedRefreshFloorMs: number;
}

const ROUTE = '/oauth/token';

/** Errors shaped like the upstream token endpoint's, which is what codex parses. */
function oauthError(reply: FastifyReply, status: number, code: string, message: string, type = 'invalid_request_error') {
  return reply.code(status).type('application/json; charset=utf-8').send({ error: { message, type, code } });
}

/** A request the shim refuses before it looks at the tokens: the answer, and the token_served result. */
interface Refusal {
  status: number;
  result: 'bad_request' | 'unauthorized' | 'unavailable';
  code: string;
  message: string;
  type?: string;
  retryAfter?: boolean;
}

/** Whether the tokens can be handed out now: present, and not expired. */
function unexpired(current: ShimTokens | undefined, nowSec: number): current is ShimTokens {
  return current !== undefined && (current.exp === undefined || current.exp > nowSec);
}

/** The seconds left on the access token, as the answer states them. */
function expiresIn(current: ShimTokens, nowSec: number): string {
  return String(current.exp !== undefined ? Math.max(0, Math.floor(current.exp - nowSec)) : 0);
}

/** Whom a body names: its client, the credential the client is served, and the generation it holds. */
interface Caller {
  client: Client;
  assigned: ServedCredential;
  generation: string | undefined;
  reason: unknown;
}

/**
 * The refresh shim stock codex points at (CODEX_REFRESH_TOKEN_URL_OVERRIDE). Usually the
 * caller simply holds an older token than the broker: it gets the current one and the
 * upstream hears nothing. Only a caller that already holds the current token, reports it
 * rejected, past the floor, and whose token the backend really rejects, triggers one forced
 * refresh shared by every caller and replica waiting at that moment: a storm costs at most
 * one upstream POST, and a client that merely claims a rejection costs none.
 */
export async function shimRoutes(app: FastifyInstance, o: ShimRoutesOptions): Promise<void> {
  const tokenServed = labelled(o.metrics.tokenServed);
  const served = (result: string) => tokenServed(ROUTE, result).inc();
  app.addContentTypeParser('application/x-www-form-urlencoded', { parseAs: 'string' }, (_req, body, done) => {
    done(null, Object.fromEntries(new URLSearchParams(String(body))));
  });
  // Body-parser failures (malformed or empty JSON, an unsupported media type, too large)
  // reach this scope's error handler before the route runs: answer them like the upstream
  // (400 invalid_request, as OAuth token endpoints do), never with the rest of the API's
  // problem+json, which codex cannot read.
  app.setErrorHandler((err: FastifyError, req, reply) => {
    const status = err.statusCode ?? 500;
    if (status < 400 || status >= 500) {
      req.log.error({ event: 'request_failed', err: { message: err.message, code: err.code } }, 'request failed');
      served('error');
      return oauthError(reply, 500, 'server_error', 'the broker failed to handle this request; see its logs', 'server_error');
    }
    served('bad_request');
    // Parser messages describe the body's shape, never its values.
    return oauthError(reply, 400, 'invalid_request', err.message);
  });

  /** The answer once `current` is what the caller gets: the tokens, or why there are none. */
  const answer = (reply: FastifyReply, client: Client, refresher: Refresher, current: ShimTokens | undefined): void => {
    const nowSec = o.now() / 1000;
    if (!unexpired(current, nowSec)) {
      const latch = refresher.latch;
      if (latch && current) {
        served('unauthorized');
        oauthError(reply, 401, latch.code ?? 'refresh_token_invalidated', 'The shared login was refused upstream; an operator must log in again and re-seed the broker.');
        return;
      }
      served('unavailable');
      reply.header('retry-after', '30');
      oauthError(reply, 503, 'temporarily_unavailable', 'The broker holds no unexpired token right now; retry shortly.', 'server_error');
      return;
    }
    o.clients.markServed(client, current.generation, o.now());
    served('ok');
    reply.header('cache-control', 'no-store').type('application/json; charset=utf-8').send(current.answer(client.refreshCredential, expiresIn(current, nowSec)));
  };

  /** A caller that holds the current token: refresh first when it is due, or when the backend confirms a reported rejection. */
  const holdsCurrent = async (reply: FastifyReply, client: Client, assigned: ServedCredential, current: ShimTokens, reason: unknown): Promise<void> => {
    const { refresher, renderer } = assigned;
    if (reason === 'unauthorized_recovery') {
      // The caller's word is not enough: any client could otherwise rotate the fleet's
      // login at will. Ask the backend (one shared call per token) before forcing.
      if (!refresher.forcedRefreshBlocked(o.forcedRefreshFloorMs)) {
        const check = await o.verifier.verify(current.accessToken, refresher.current()?.account.accountId);
        if (check.verdict === 'rejected') {
          await refresher.runCycle({ force: true, waitForLock: true, onlyIfOlderThanMs: o.forcedRefreshFloorMs, reason: 'shim_unauthorized_recovery' });
        }
      }
    } else if (refresher.state() === 'due' || refresher.state() === 'expired') {
      await refresher.runCycle({ waitForLock: true, reason: 'shim_stale' });
    }
    answer(reply, client, refresher, renderer.tokens());
  };

  /** The caller a parsed body names, or why it is refused (the same for Fastify's route and the lane's). */
  const callerOf = (body: unknown): Caller | Refusal => {
    if (typeof body !== 'object' || body === null || Array.isArray(body)) {
      return { status: 400, result: 'bad_request', code: 'invalid_request', message: 'expected a JSON or form body with grant_type=refresh_token and refresh_token' };
    }
    const b = body as Record<string, unknown>;
    if (b['grant_type'] !== 'refresh_token') {
      return { status: 400, result: 'bad_request', code: 'unsupported_grant_type', message: 'only grant_type=refresh_token is supported' };
    }
    const presented = b['refresh_token'];
    if (typeof presented !== 'string' || presented === '') {
      return { status: 400, result: 'bad_request', code: 'invalid_request', message: 'refresh_token must be a non-empty string' };
    }
    const { credential, generation } = splitServedRefreshToken(presented);
    const client = o.clients.byRefreshCredential(credential);
    if (!client) {
      return {
        status: 401,
        result: 'unauthorized',
        code: 'refresh_token_invalidated',
        message: 'This refresh token is not a live credential of this broker. Run the workspace sync again or ask an operator for a client.',
      };
    }
    const assigned = o.served.for(client);
    if (!assigned) {
      return { status: 503, result: 'unavailable', code: 'temporarily_unavailable', message: "The client's pool holds no credential right now; retry shortly.", type: 'server_error', retryAfter: true };
    }
    return { client, assigned, generation, reason: b['refresh_reason'] };
  };

  // Synchronous but for a caller that holds the current token: a stale caller (the usual
  // one) costs no promise.
  app.post(ROUTE, (req, reply) => {
    const caller = callerOf(req.body);
    if ('status' in caller) {
      served(caller.result);
      if (caller.retryAfter) reply.header('retry-after', '30');
      oauthError(reply, caller.status, caller.code, caller.message, caller.type);
      return;
    }
    const { client, assigned, generation } = caller;
    reply.header('x-codex-credential', assigned.name);
    // A caller that held another credential's token (it was switched) just gets this one's.
    const current = assigned.renderer.tokens();
    if (current && generation === current.generation) return holdsCurrent(reply, client, assigned, current, caller.reason);
    answer(reply, client, assigned.refresher, current);
    return undefined;
  });

  // The stale caller's answer again, in front of Fastify (http/lane.ts), from the same
  // callerOf and the same bytes as answer() above. Anything else declines (0) and Fastify
  // answers it from the body the lane read (replayBody): a body that is not plain JSON
  // (escapes, __proto__ or constructor, which Fastify's parser checks), a refusal, a
  // caller that holds the current token (which may refresh), or no unexpired token.
  const lane = o.lane;
  if (!lane) return;
  app.addHook('preParsing', lane.replayBody);
  /** The answer's content-length as text: the same number until the seconds lose a digit. */
  const answerLength = digits();
  lane.post(ROUTE, (req, res, raw) => {
    const text = raw.toString('utf8');
    if (text.includes('\\') || text.includes('__proto__') || text.includes('constructor') || text.includes('\ufffd')) return 0;
    let body: unknown;
    try {
      body = JSON.parse(text);
    } catch {
      return 0;
    }
    const caller = callerOf(body);
    if ('status' in caller) return 0;
    const { client, assigned } = caller;
    const current = assigned.renderer.tokens();
    const nowMs = o.now();
    const nowSec = nowMs / 1000;
    if (!unexpired(current, nowSec) || caller.generation === current.generation) return 0;
    // Everything that could throw comes before the first side effect: a fault declines to
    // Fastify with nothing yet counted or marked.
    const seconds = expiresIn(current, nowSec);
    const out = current.answer(client.refreshCredential, seconds);
    // A flat list of names and values: Node writes it as it writes an object's, without a hasOwnProperty per name.
    const headers = [
      // The id drawn when the request arrived (the lane read its body since).
      'x-request-id',
      lane.arrivalId(req) ?? lane.requestId(req),
      'x-codex-credential',
      assigned.name,
      'cache-control',
      'no-store',
      'content-type',
      'application/json; charset=utf-8',
      'content-length',
      answerLength(current.answerBytes(client.refreshCredential, seconds)),
    ];
    o.clients.markServed(client, current.generation, nowMs);
    served('ok');
    writeAnswer(res, 200, headers, out, current.ascii);
    return 200;
  });
}
