/**
 * A strict fake of the OpenAI OAuth token endpoint (`POST /oauth/token`,
 * grant_type=refresh_token), served by a real node:http server on 127.0.0.1.
 *
 * Semantics mirrored from the real endpoint:
 * - refresh tokens are single-use; each `seed()` starts an independent family;
 * - presenting an already-used refresh token answers 401 `refresh_token_reused`
 *   AND invalidates the whole family (its current refresh token dies too);
 * - unknown tokens / tokens of an invalidated family answer 401
 *   `refresh_token_invalidated`;
 * - `POST /oauth/revoke` (RFC 7009, JSON or form `{token, token_type_hint, client_id}`)
 *   answers 200 `{}` for any token and invalidates the family of a refresh token it
 *   knows: that token's refresh then answers 401 `refresh_token_invalidated`.
 *
 * Tokens are HS256 JWTs signed with a random per-instance secret. Signing is done
 * synchronously with node:crypto (byte-for-byte the same compact JWS that jose's
 * `SignJWT` produces, and verifiable with jose `jwtVerify`) because `seed()` is
 * synchronous.
 */
import { createHmac, randomBytes, randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

export interface FakeUpstreamOptions {
  /** Clock in ms, default Date.now; used for iat/exp of issued JWTs. */
  now?: () => number;
  /** Access token lifetime in seconds, default 864000 (10 days). */
  accessLifetimeSec?: number;
  /** Expected client_id; a POST with another client_id gets 400 {"error":"invalid_client"}. */
  clientId?: string;
}

export type Fault =
  | { kind: 'status'; status: number; body?: unknown; headers?: Record<string, string> }
  | { kind: 'delay'; ms: number }
  | { kind: 'hang' }
  | { kind: 'malformed' }
  | { kind: 'oversized' }
  | { kind: 'no-access-token' }
  | { kind: 'non-jwt-access-token' }
  | { kind: 'error-200' };

export interface SeedOptions {
  iatSec?: number;
  expSec?: number;
  accountId?: string;
  planType?: string;
  email?: string;
  flat?: boolean;
  extra?: Record<string, unknown>;
}

export interface RecordedRequest {
  method: string;
  path: string;
  headers: Record<string, string | string[] | undefined>;
  rawBody: string;
  /** Parsed JSON / form body, or undefined when it could not be parsed. */
  body: unknown;
}

export const DEFAULT_CLIENT_ID = 'app_EMoamEEZ73f0CkXaXp7hrann';
export const TOKEN_PATH = '/oauth/token';
export const REVOKE_PATH = '/oauth/revoke';
const AUTH_CLAIM = 'https://api.openai.com/auth';
const ISSUER = 'https://auth.openai.com';
const MAX_REQUEST_BODY = 1024 * 1024;
const ID_TOKEN_LIFETIME_SEC = 3600;

const REUSED_MESSAGE =
  'Your refresh token has already been used to generate a new access token. Please try signing in again.';
const INVALIDATED_MESSAGE = 'Your refresh token has been invalidated. Please try signing in again.';

interface Family {
  accountId: string;
  userId: string;
  planType: string;
  email: string;
  current: string;
  used: Set<string>;
  valid: boolean;
}

interface IssuedSet {
  access_token: string;
  id_token: string;
  refresh_token: string;
}

function b64url(data: string | Buffer): string {
  return Buffer.from(data).toString('base64url');
}

function mediaType(header: string | undefined): string {
  return (header ?? '').split(';')[0]!.trim().toLowerCase();
}

export class FakeUpstream {
  readonly url: string;
  /** Every POST received (any path), counted when the request arrives. */
  posts = 0;
  /** Successful rotations. */
  rotations = 0;
  /** Number of refresh_token_reused answers sent. */
  reuseAnswers = 0;
  /** Revocations answered 200 (any token). */
  revocations = 0;
  /** Every request received (any method, any path), in arrival-completion order. */
  readonly requests: RecordedRequest[] = [];

  readonly #server: Server;
  readonly #now: () => number;
  readonly #clientId: string;
  readonly #secret = randomBytes(32);
  #accessLifetimeSec: number;
  readonly #faults: Fault[] = [];
  readonly #revokeFaults: Fault[] = [];
  readonly #families: Family[] = [];
  readonly #byRefreshToken = new Map<string, Family>();
  readonly #issued: string[] = [];
  #lastAccess: string | undefined;
  readonly #sockets = new Set<Socket>();
  readonly #timers = new Set<NodeJS.Timeout>();
  #closed = false;

  private constructor(server: Server, url: string, opts: FakeUpstreamOptions) {
    this.#server = server;
    this.url = url;
    this.#now = opts.now ?? Date.now;
    this.#clientId = opts.clientId ?? DEFAULT_CLIENT_ID;
    this.#accessLifetimeSec = opts.accessLifetimeSec ?? 864000;
  }

  static async start(opts: FakeUpstreamOptions = {}): Promise<FakeUpstream> {
    const server = createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
    const { port } = server.address() as AddressInfo;
    const fake = new FakeUpstream(server, `http://127.0.0.1:${port}${TOKEN_PATH}`, opts);
    server.on('connection', (socket: Socket) => {
      fake.#sockets.add(socket);
      socket.once('close', () => fake.#sockets.delete(socket));
    });
    server.on('request', (req: IncomingMessage, res: ServerResponse) => {
      fake.#onRequest(req, res);
    });
    return fake;
  }

  // ---------------------------------------------------------------- public API

  seed(opts: SeedOptions = {}): Record<string, unknown> {
    const nowSec = this.#nowSec();
    const iat = opts.iatSec ?? nowSec;
    const exp = opts.expSec ?? iat + this.#accessLifetimeSec;
    const family: Family = {
      accountId: opts.accountId ?? randomUUID(),
      userId: `user-${randomBytes(12).toString('base64url')}`,
      planType: opts.planType ?? 'pro',
      email: opts.email ?? 'fleet@example.com',
      current: '',
      used: new Set(),
      valid: true,
    };
    const set = this.#issue(family, iat, exp);
    this.#families.push(family);
    const tokens = { ...set, account_id: family.accountId };
    if (opts.flat) {
      return {
        id_token: tokens.id_token,
        access_token: tokens.access_token,
        refresh_token: tokens.refresh_token,
        account_id: tokens.account_id,
        ...opts.extra,
      };
    }
    return {
      OPENAI_API_KEY: null,
      tokens: {
        id_token: tokens.id_token,
        access_token: tokens.access_token,
        refresh_token: tokens.refresh_token,
        account_id: tokens.account_id,
      },
      last_refresh: new Date(this.#now()).toISOString(),
      ...opts.extra,
    };
  }

  fault(f: Fault): void {
    this.#faults.push(f);
  }

  /** Faults queued and not yet applied. */
  get queuedFaults(): number {
    return this.#faults.length;
  }

  /** A fault for the next revocation (only `status` is meaningful there). */
  revokeFault(f: Fault): void {
    this.#revokeFaults.push(f);
  }

  /** POSTs to the token endpoint (refreshes), as opposed to revocations. */
  get tokenPosts(): number {
    return this.requests.filter((r) => r.method === 'POST' && r.path === TOKEN_PATH).length;
  }

  setAccessLifetime(sec: number): void {
    this.#accessLifetimeSec = sec;
  }

  currentRefreshToken(accountId?: string): string | undefined {
    const family = this.#family(accountId);
    return family?.valid ? family.current : undefined;
  }

  issuedTokens(): string[] {
    return [...this.#issued];
  }

  lastAccessToken(): string | undefined {
    return this.#lastAccess;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
    const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
    this.#server.closeAllConnections();
    for (const s of this.#sockets) s.destroy();
    await closed;
  }

  // ------------------------------------------------------------------ internals

  #nowSec(): number {
    return Math.floor(this.#now() / 1000);
  }

  #family(accountId?: string): Family | undefined {
    for (let i = this.#families.length - 1; i >= 0; i--) {
      const f = this.#families[i]!;
      if (accountId === undefined || f.accountId === accountId) return f;
    }
    return undefined;
  }

  #sign(payload: Record<string, unknown>): string {
    const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
    const body = b64url(JSON.stringify(payload));
    const sig = createHmac('sha256', this.#secret).update(`${header}.${body}`).digest('base64url');
    return `${header}.${body}.${sig}`;
  }

  /** Issues a fresh token set for the family and makes its refresh token current. */
  #issue(family: Family, iat: number, exp: number): IssuedSet {
    const access_token = this.#sign({
      iss: ISSUER,
      aud: ['https://api.openai.com/v1'],
      sub: family.userId,
      iat,
      exp,
      jti: randomUUID(),
      [AUTH_CLAIM]: { chatgpt_account_id: family.accountId },
    });
    const id_token = this.#sign({
      iss: ISSUER,
      aud: [this.#clientId],
      sub: family.userId,
      email: family.email,
      iat,
      exp: iat + ID_TOKEN_LIFETIME_SEC,
      jti: randomUUID(),
      [AUTH_CLAIM]: {
        chatgpt_account_id: family.accountId,
        chatgpt_plan_type: family.planType,
        chatgpt_user_id: family.userId,
      },
    });
    const refresh_token = `rt_${randomBytes(32).toString('base64url')}`;
    if (family.current) family.used.add(family.current);
    family.current = refresh_token;
    this.#byRefreshToken.set(refresh_token, family);
    this.#issued.push(access_token, refresh_token, id_token);
    this.#lastAccess = access_token;
    return { access_token, id_token, refresh_token };
  }

  #onRequest(req: IncomingMessage, res: ServerResponse): void {
    const method = req.method ?? 'GET';
    const path = (req.url ?? '/').split('?')[0]!;
    const isPost = method === 'POST';
    if (isPost) this.posts++;
    const isToken = isPost && path === TOKEN_PATH;
    const isRevoke = isPost && path === REVOKE_PATH;
    // Faults are dequeued at arrival so that concurrent requests consume them in arrival order.
    const fault = isToken ? this.#faults.shift() : isRevoke ? this.#revokeFaults.shift() : undefined;

    res.on('error', () => {});
    req.on('error', () => {});

    const chunks: Buffer[] = [];
    let size = 0;
    let tooLarge = false;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_REQUEST_BODY) {
        tooLarge = true;
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => {
      const rawBody = Buffer.concat(chunks).toString('utf8');
      const body = parseBody(req.headers['content-type'], rawBody);
      this.requests.push({ method, path, headers: { ...req.headers }, rawBody, body });
      if (this.#closed) return;
      if (!isToken && !isRevoke) {
        sendJson(res, 404, { error: 'not_found' });
        return;
      }
      if (tooLarge) {
        sendJson(res, 413, { error: 'request_too_large' });
        return;
      }
      if (fault) {
        this.#applyFault(fault, res, body);
        return;
      }
      if (isRevoke) this.#handleRevoke(res, body);
      else this.#handleToken(res, body);
    });
  }

  #applyFault(fault: Fault, res: ServerResponse, body: unknown): void {
    switch (fault.kind) {
      case 'status': {
        const isRaw = typeof fault.body === 'string';
        const payload = isRaw
          ? (fault.body as string)
          : JSON.stringify(
              fault.body ?? { error: { message: 'injected fault', type: 'server_error', code: null } },
            );
        res.writeHead(fault.status, {
          'content-type': isRaw ? 'text/plain; charset=utf-8' : 'application/json; charset=utf-8',
          'content-length': Buffer.byteLength(payload),
          ...fault.headers,
        });
        res.end(payload);
        return;
      }
      case 'delay': {
        const timer = setTimeout(() => {
          this.#timers.delete(timer);
          if (this.#closed) return;
          // The rotation happens after the delay even if the client has given up.
          this.#handleToken(res, body);
        }, fault.ms);
        this.#timers.add(timer);
        return;
      }
      case 'hang':
        return; // never answered; close() destroys the socket
      case 'malformed': {
        const payload = '<html><body>502 Bad Gateway</body></html>{"access_token":';
        res.writeHead(200, {
          'content-type': 'application/json',
          'content-length': Buffer.byteLength(payload),
        });
        res.end(payload);
        return;
      }
      case 'oversized': {
        // Valid JSON, ~2 MiB, streamed chunked (no content-length) so the client must
        // enforce its limit while reading, not just from a header.
        res.writeHead(200, { 'content-type': 'application/json' });
        res.write('{"access_token":"x","token_type":"Bearer","padding":"');
        const chunk = 'a'.repeat(64 * 1024);
        let i = 0;
        const writeMore = (): void => {
          while (i < 32) {
            i++;
            if (res.destroyed) return;
            if (!res.write(chunk)) {
              res.once('drain', writeMore);
              return;
            }
          }
          res.end('"}');
        };
        writeMore();
        return;
      }
      case 'no-access-token':
        sendJson(res, 200, { token_type: 'Bearer' });
        return;
      case 'non-jwt-access-token':
        sendJson(res, 200, {
          access_token: 'not-a-jwt',
          id_token: 'not-a-jwt',
          refresh_token: `rt_${randomBytes(32).toString('base64url')}`,
          token_type: 'Bearer',
          expires_in: this.#accessLifetimeSec,
        });
        return;
      case 'error-200':
        sendJson(res, 200, { error: { code: 'server_error', message: 'x' } });
        return;
    }
  }

  /** RFC 7009: 200 for any token, even an unknown one; a known refresh token's family dies. */
  #handleRevoke(res: ServerResponse, body: unknown): void {
    const b = typeof body === 'object' && body !== null && !Array.isArray(body) ? (body as Record<string, unknown>) : {};
    if (typeof b['token'] !== 'string' || b['token'] === '') {
      sendJson(res, 400, { error: 'invalid_request' });
      return;
    }
    if (b['client_id'] !== this.#clientId) {
      sendJson(res, 401, { error: 'invalid_client' });
      return;
    }
    const family = this.#byRefreshToken.get(b['token']);
    if (family) family.valid = false;
    this.revocations++;
    sendJson(res, 200, {});
  }

  #handleToken(res: ServerResponse, body: unknown): void {
    if (
      typeof body !== 'object' ||
      body === null ||
      Array.isArray(body) ||
      (body as Record<string, unknown>).grant_type !== 'refresh_token' ||
      typeof (body as Record<string, unknown>).client_id !== 'string' ||
      typeof (body as Record<string, unknown>).refresh_token !== 'string'
    ) {
      sendJson(res, 400, { error: 'invalid_request' });
      return;
    }
    const { client_id, refresh_token } = body as { client_id: string; refresh_token: string };
    if (client_id !== this.#clientId) {
      sendJson(res, 400, { error: 'invalid_client' });
      return;
    }
    const family = this.#byRefreshToken.get(refresh_token);
    if (!family) {
      sendJson(res, 401, oauthError('refresh_token_invalidated', INVALIDATED_MESSAGE));
      return;
    }
    if (family.used.has(refresh_token)) {
      family.valid = false;
      this.reuseAnswers++;
      sendJson(res, 401, oauthError('refresh_token_reused', REUSED_MESSAGE));
      return;
    }
    if (!family.valid || family.current !== refresh_token) {
      sendJson(res, 401, oauthError('refresh_token_invalidated', INVALIDATED_MESSAGE));
      return;
    }
    const iat = this.#nowSec();
    const lifetime = this.#accessLifetimeSec;
    const set = this.#issue(family, iat, iat + lifetime);
    this.rotations++;
    sendJson(res, 200, {
      access_token: set.access_token,
      id_token: set.id_token,
      refresh_token: set.refresh_token,
      token_type: 'Bearer',
      expires_in: lifetime,
      scope: 'openid profile email offline_access',
    });
  }
}

function oauthError(code: string, message: string): unknown {
  return { error: { message, type: 'invalid_request_error', param: null, code } };
}

function parseBody(contentType: string | undefined, raw: string): unknown {
  const type = mediaType(contentType);
  try {
    if (type === 'application/json') return JSON.parse(raw) as unknown;
    if (type === 'application/x-www-form-urlencoded') {
      return Object.fromEntries(new URLSearchParams(raw));
    }
  } catch {
    return undefined;
  }
  return undefined;
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  if (res.destroyed || res.headersSent) return;
  const payload = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json; charset=utf-8',
    'content-length': Buffer.byteLength(payload),
    'cache-control': 'no-store',
  });
  res.end(payload);
}
