import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';

export const PROBLEM_TYPE_BASE = 'https://codex-auth-broker.dev/problems/';

export interface Problem {
  status: number;
  code: string;
  title: string;
  detail: string;
  headers?: Record<string, string>;
  extra?: Record<string, unknown>;
}

/** The one place problem+json is produced. Details never carry a token or a document. */
export function sendProblem(reply: FastifyReply, p: Problem): FastifyReply {
  for (const [k, v] of Object.entries(p.headers ?? {})) reply.header(k, v);
  return reply
    .code(p.status)
    .type('application/problem+json')
    .send({ type: `${PROBLEM_TYPE_BASE}${p.code}`, title: p.title, status: p.status, detail: p.detail, code: p.code, ...p.extra });
}

/** 401 with the challenge every client route sends. */
export function sendUnauthorized(reply: FastifyReply, detail: string): FastifyReply {
  return sendProblem(reply, { status: 401, code: 'unauthorized', title: 'Unauthorized', detail, headers: { 'www-authenticate': 'Bearer' } });
}

const TITLES: Record<number, string> = {
  400: 'Bad Request',
  401: 'Unauthorized',
  403: 'Forbidden',
  404: 'Not Found',
  405: 'Method Not Allowed',
  413: 'Payload Too Large',
  415: 'Unsupported Media Type',
  429: 'Too Many Requests',
  431: 'Request Header Fields Too Large',
  500: 'Internal Server Error',
  503: 'Service Unavailable',
};

/**
 * A 4xx code a client may see: a framework name such as FST_ERR_CTP_INVALID_MEDIA_TYPE.
 * Anything else (a SQLSTATE like 22021, an errno) names the broker's insides: it is
 * logged, never answered. A 5xx always says internal_error.
 */
function publicCode(code: string | undefined): string {
  return code !== undefined && /^FST_[A-Z0-9_]+$/.test(code) ? code.toLowerCase() : 'bad_request';
}

export function errorHandler(err: FastifyError, req: FastifyRequest, reply: FastifyReply): FastifyReply {
  const status = err.statusCode && err.statusCode >= 400 && err.statusCode < 600 ? err.statusCode : 500;
  if (status >= 500) req.log.error({ event: 'request_failed', err: { message: err.message, code: err.code } }, 'request failed');
  const code = status >= 500 ? 'internal_error' : err.validation ? 'invalid_request' : publicCode(err.code);
  // Validation and parser messages name the field, never echo values; a 500 says nothing internal.
  const detail = status >= 500 ? 'the broker failed to handle this request; see its logs' : err.message;
  return sendProblem(reply, { status, code, title: TITLES[status] ?? 'Error', detail });
}

/** URLs the router cannot decode (bad percent-encoding, a path segment over 100 characters): 400, not the framework's own JSON. */
export function frameworkErrorHandler(err: FastifyError, _req: FastifyRequest, reply: FastifyReply): FastifyReply {
  const detail = err.code === 'FST_ERR_MAX_PARAM_LENGTH' ? 'a path segment is longer than 100 characters' : 'the URL is not valid (bad percent-encoding or invalid UTF-8)';
  return sendProblem(reply, { status: 400, code: 'invalid_url', title: 'Bad Request', detail });
}

export function notFoundHandler(req: FastifyRequest, reply: FastifyReply): FastifyReply {
  return sendProblem(reply, { status: 404, code: 'not_found', title: 'Not Found', detail: `no route ${req.method} ${req.url.split('?')[0]}` });
}
