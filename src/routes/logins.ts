import type { FastifyInstance, FastifyReply } from 'fastify';
import { sendProblem } from '../http/problem.js';
import { LoginError, type LoginFailure } from '../login/errors.js';
import type { LoginManager } from '../login/logins.js';

export interface LoginRoutesOptions {
  logins: LoginManager;
}

const STATUS: Record<LoginFailure, number> = {
  unknown_credential: 404,
  unknown_login: 404,
  login_in_progress: 409,
  login_finished: 409,
  login_busy: 409,
  wrong_method: 409,
  expired: 409,
  state_mismatch: 400,
  bad_callback: 400,
  authorization_denied: 400,
  cancelled: 409,
  device_login_unavailable: 502,
  exchange_failed: 502,
  issuer_unreachable: 502,
  issuer_error: 502,
  invalid_login: 502,
  stale_login: 409,
};
const TITLES: Record<number, string> = { 400: 'Bad Request', 404: 'Not Found', 409: 'Conflict', 502: 'Bad Gateway' };

function loginProblem(reply: FastifyReply, err: unknown): FastifyReply {
  if (!(err instanceof LoginError)) throw err;
  const status = STATUS[err.reason];
  return sendProblem(reply, { status, code: err.reason, title: TITLES[status] ?? 'Error', detail: err.message });
}

/**
 * Log in from the broker. Registered inside the admin plugin, so its ADMIN_TOKEN check
 * runs first. Thin: the login state machine lives in login/logins.ts.
 */
export async function loginRoutes(app: FastifyInstance, o: LoginRoutesOptions): Promise<void> {
  app.post<{ Params: { name: string } }>('/admin/credentials/:name/login', async (req, reply) => {
    const method = (req.body as { method?: unknown } | undefined)?.method;
    if (method !== 'device' && method !== 'browser') {
      return sendProblem(reply, { status: 400, code: 'invalid_method', title: 'Bad Request', detail: 'expected a JSON body {"method": "device"} or {"method": "browser"}', extra: { field: 'method' } });
    }
    try {
      const started = await o.logins.begin(req.params.name, method);
      return reply.code(202).header('cache-control', 'no-store').send(started);
    } catch (err) {
      return loginProblem(reply, err);
    }
  });

  app.get<{ Params: { id: string } }>('/admin/logins/:id', async (req, reply) => {
    const login = await o.logins.get(req.params.id);
    if (!login) return sendProblem(reply, { status: 404, code: 'unknown_login', title: 'Not Found', detail: `no login ${req.params.id}` });
    return reply.header('cache-control', 'no-store').send(login);
  });

  app.post<{ Params: { id: string } }>('/admin/logins/:id/callback', async (req, reply) => {
    const url = (req.body as { callback_url?: unknown } | undefined)?.callback_url;
    if (typeof url !== 'string' || url.trim() === '') {
      return sendProblem(reply, {
        status: 400,
        code: 'invalid_callback',
        title: 'Bad Request',
        detail: 'expected a JSON body {"callback_url": "<the address the browser landed on>"}',
        extra: { field: 'callback_url' },
      });
    }
    try {
      return reply.header('cache-control', 'no-store').send(await o.logins.completeBrowser(req.params.id, url));
    } catch (err) {
      return loginProblem(reply, err);
    }
  });
}
