import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { splitServedRefreshToken } from '../clients/credentials.js';
import type { ClientRegistry } from '../clients/registry.js';
import { sha256Hex } from '../credential.js';
import { errorHandler } from '../http/problem.js';
import type { BrokerMetrics } from '../metrics.js';
import type { Refresher } from '../refresher.js';

export interface RevokeRoutesOptions {
  clients: ClientRegistry;
  refresher: Refresher;
  metrics: BrokerMetrics;
}

const ROUTE = '/oauth/revoke';
/** A revocation body is a token and two short fields; anything bigger is not one. */
const MAX_BODY_BYTES = 64 * 1024;
// Logged only when they look like what they claim to be: never prose, never a token.
const HINTS = new Set(['refresh_token', 'access_token']);
const CLIENT_ID_SHAPE = /^[A-Za-z0-9_.-]{1,64}$/;

/** The fields of a JSON or form body, whatever the Content-Type claims; a body that is neither has none. */
function revokeFields(contentType: string | undefined, raw: unknown): Record<string, unknown> {
  const text = typeof raw === 'string' ? raw : '';
  const media = (contentType ?? '').split(';')[0]?.trim().toLowerCase();
  if (media === 'application/x-www-form-urlencoded') return Object.fromEntries(new URLSearchParams(text));
  try {
    const v: unknown = JSON.parse(text);
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : {};
  } catch {
    return {};
  }
}

/**
 * Where codex's logout lands when the shim override is set (codex 0.169 posts
 * `/oauth/revoke` on the shim's host). A workspace logging out must not revoke the login
 * the whole fleet shares, so nothing is forwarded upstream: the answer is RFC 7009's 200
 * `{}` for any token, even a body that is not one, and the shared login and the client's
 * own credential keep working. An operator who wants the login revoked uses
 * POST /admin/credentials/:name/revoke.
 */
export async function revokeRoutes(app: FastifyInstance, o: RevokeRoutesOptions): Promise<void> {
  const answer = (req: FastifyRequest, reply: FastifyReply, fields: Record<string, unknown>) => {
    o.metrics.revocations.inc({ source: 'client_logout' });
    const token = typeof fields['token'] === 'string' ? fields['token'] : '';
    const client = token ? o.clients.byRefreshCredential(splitServedRefreshToken(token).credential) : undefined;
    // Compared by hash: a plain string compare against the live token would time-leak it.
    const shared = !client && token !== '' && sha256Hex(token) === o.refresher.current()?.refreshTokenSha;
    const hint = fields['token_type_hint'];
    const clientId = fields['client_id'];
    const facts = {
      event: 'client_logout',
      client: client?.name ?? 'unknown',
      tokenKind: client ? 'broker_credential' : shared ? 'shared_login' : token ? 'unknown' : 'none',
      tokenTypeHint: typeof hint === 'string' && HINTS.has(hint) ? hint : hint === undefined ? null : 'other',
      clientId: typeof clientId === 'string' && CLIENT_ID_SHAPE.test(clientId) ? clientId : null,
    };
    if (shared) {
      // Only a raw-exposure workspace or a copy of auth.json holds the upstream token itself.
      req.log.warn(facts, 'the shared login\'s own refresh token was presented for revocation (REFRESH_TOKEN_EXPOSURE=raw, or a copy of auth.json): not forwarded, the login is unchanged; find and delete that copy');
    } else {
      req.log.info(facts, `a codex logout (client ${facts.client}) was answered without forwarding it: the shared login is unchanged`);
    }
    return reply.code(200).header('cache-control', 'no-store').send({});
  };

  // Every body is read as bounded text and judged by the route: a malformed or unexpected
  // body still gets 200, only an oversized one is refused (413) before it is read whole.
  app.removeAllContentTypeParsers();
  app.addContentTypeParser('*', { parseAs: 'string', bodyLimit: MAX_BODY_BYTES }, (_req, body, done) => done(null, body));
  app.setErrorHandler((err: FastifyError, req, reply) => {
    const status = err.statusCode ?? 500;
    if (status >= 400 && status < 500 && status !== 413) return answer(req, reply, {});
    return errorHandler(err, req, reply);
  });

  app.post(ROUTE, async (req, reply) => answer(req, reply, revokeFields(req.headers['content-type'], req.body)));
}
