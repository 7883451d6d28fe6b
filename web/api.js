// The admin API, with the token from this tab's session storage as a bearer header.
// Never a cookie (so no CSRF), never the URL, never the console.

const KEY = 'codex-auth-broker.admin-token';

export const session = {
  token: () => sessionStorage.getItem(KEY),
  signIn: (token) => sessionStorage.setItem(KEY, token),
  signOut: () => sessionStorage.removeItem(KEY),
};

/** A refusal from the broker: its problem+json `code` and `detail`, or why there was no answer. */
export class ApiError extends Error {
  constructor(status, problem) {
    const detail = typeof problem?.detail === 'string' ? problem.detail : status === 0 ? 'the broker did not answer; is it running?' : `the broker answered HTTP ${status}`;
    super(detail);
    this.status = status;
    this.code = typeof problem?.code === 'string' ? problem.code : undefined;
    this.detail = detail;
    this.problem = problem;
  }
}

/** One call; resolves with the parsed JSON body (undefined for 204), rejects with ApiError. */
export async function api(method, path, { json, text, query } = {}) {
  const headers = { accept: 'application/json, application/problem+json' };
  const token = session.token();
  if (token) headers.authorization = `Bearer ${token}`;
  let body;
  if (json !== undefined) body = JSON.stringify(json);
  else if (text !== undefined) body = text;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const url = query ? `${path}?${new URLSearchParams(query)}` : path;
  let res;
  try {
    res = await fetch(url, { method, headers, body, cache: 'no-store', credentials: 'omit', redirect: 'error' });
  } catch {
    throw new ApiError(0, undefined);
  }
  const data = (res.headers.get('content-type') ?? '').includes('json') ? await res.json().catch(() => undefined) : undefined;
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

/** The broker runs without ADMIN_TOKEN: any /admin/ route answers 404 "admin routes are off". */
export const isAdminOff = (err) => err instanceof ApiError && err.status === 404 && err.detail.startsWith('admin routes are off');
