/**
 * A fake of the OpenAI OAuth issuer's login endpoints, as codex 0.169.0 uses them (the
 * real codex CLI runs its device flow against this fake in test/login-codex.test.ts):
 *
 * - `POST /api/accounts/deviceauth/usercode` JSON {client_id} -> {device_auth_id, user_code,
 *   interval: "<seconds as a string>"}, or 404 when device login is off;
 * - `POST /api/accounts/deviceauth/token` JSON {device_auth_id, user_code} -> 403 until the
 *   test approves the code, then {authorization_code, code_challenge, code_verifier} (the
 *   server made the PKCE pair);
 * - `GET /oauth/authorize?…` -> checks codex's parameters, then (once the test approves)
 *   a redirect to redirect_uri with code and state, or error=access_denied;
 * - `POST /oauth/token` form grant_type=authorization_code: single-use code, redirect_uri
 *   and PKCE verifier checked, -> {id_token, access_token, refresh_token} (JWTs shaped like
 *   the real ones).
 *
 * Plain http on 127.0.0.1. Every secret it hands out is kept for leak scans.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { CODEX_CLIENT_ID, makeChatgptLogin } from './codex.js';

export interface IssuedLoginTokens {
  id_token: string;
  access_token: string;
  refresh_token: string;
}

export interface FakeIssuerOptions {
  clientId?: string;
  /** The poll interval the usercode answer names (a string of seconds, as the real server sends). Default "1". */
  interval?: string;
  /** Answer the usercode request 404 (device login not enabled). */
  deviceDisabled?: boolean;
  /** Approve a device code by itself on its Nth poll (default: only approveDevice() approves). */
  autoApproveAfterPolls?: number;
  /** What an authorize request gets: a redirect with a code, a redirect with error=access_denied, or a sign-in page. */
  browser?: 'approve' | 'deny' | 'wait';
  /** The tokens an exchange issues (default: a fresh makeChatgptLogin()). */
  mint?: () => IssuedLoginTokens;
  accountId?: string;
  planType?: string;
}

export interface IssuerRequest {
  method: string;
  path: string;
  query: URLSearchParams;
  contentType: string | undefined;
  body: Record<string, unknown> | undefined;
}

interface DeviceCode {
  deviceAuthId: string;
  userCode: string;
  polls: number;
  approved: boolean;
  answer?: { authorization_code: string; code_challenge: string; code_verifier: string };
}

interface AuthCode {
  challenge: string;
  redirectUri: string;
  used: boolean;
}

const ALLOWED_REDIRECTS = [1455, 1457].flatMap((p) => [`http://localhost:${p}/auth/callback`, `http://127.0.0.1:${p}/auth/callback`]);
const b64url = (n: number) => randomBytes(n).toString('base64url');
const s256 = (v: string) => createHash('sha256').update(v).digest('base64url');

export class FakeIssuer {
  readonly url: string;
  readonly requests: IssuerRequest[] = [];
  /** Each authorize request's query, as received. */
  readonly authorizeRequests: URLSearchParams[] = [];
  exchanges = 0;
  readonly #server: Server;
  readonly #o: FakeIssuerOptions;
  readonly #devices: DeviceCode[] = [];
  readonly #codes = new Map<string, AuthCode>();
  readonly #secrets: string[] = [];
  readonly #sockets = new Set<Socket>();
  #nextExchange: { status: number; body: unknown } | undefined;

  private constructor(server: Server, url: string, o: FakeIssuerOptions) {
    this.#server = server;
    this.url = url;
    this.#o = o;
  }

  static async start(o: FakeIssuerOptions = {}): Promise<FakeIssuer> {
    const server = createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    const fake = new FakeIssuer(server, `http://127.0.0.1:${(server.address() as AddressInfo).port}`, o);
    server.on('connection', (s: Socket) => {
      fake.#sockets.add(s);
      s.once('close', () => fake.#sockets.delete(s));
    });
    server.on('request', (req, res) => fake.#onRequest(req, res));
    return fake;
  }

  /** The user codes handed out, oldest first. */
  userCodes(): string[] {
    return this.#devices.map((d) => d.userCode);
  }

  /** How often device codes were polled. */
  get polls(): number {
    return this.#devices.reduce((n, d) => n + d.polls, 0);
  }

  /** The operator enters the code (default: every code handed out so far). */
  approveDevice(userCode?: string): void {
    for (const d of this.#devices) if (userCode === undefined || d.userCode === userCode) d.approved = true;
  }

  /** Turn device login off (the usercode endpoint answers 404) or back on. */
  setDeviceDisabled(disabled: boolean): void {
    this.#o.deviceDisabled = disabled;
  }

  setBrowser(mode: 'approve' | 'deny' | 'wait'): void {
    this.#o.browser = mode;
  }

  /** Answer the next code exchange with this status and body instead of tokens. */
  failNextExchange(status: number, body: unknown = { error: 'invalid_grant', error_description: 'bad code' }): void {
    this.#nextExchange = { status, body };
  }

  /** Every secret this issuer handed out or received (device_auth_ids, codes, verifiers, tokens). */
  secrets(): string[] {
    return [...this.#secrets];
  }

  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
    this.#server.closeAllConnections();
    for (const s of this.#sockets) s.destroy();
    await closed;
  }

  #onRequest(req: IncomingMessage, res: ServerResponse): void {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const url = new URL(req.url ?? '/', this.url);
      const raw = Buffer.concat(chunks).toString('utf8');
      const contentType = req.headers['content-type']?.split(';')[0]?.trim();
      let body: Record<string, unknown> | undefined;
      try {
        body = contentType === 'application/x-www-form-urlencoded' ? Object.fromEntries(new URLSearchParams(raw)) : raw ? (JSON.parse(raw) as Record<string, unknown>) : undefined;
      } catch {
        body = undefined;
      }
      this.requests.push({ method: req.method ?? '', path: url.pathname, query: url.searchParams, contentType, body });
      const json = (status: number, value: unknown) => {
        res.writeHead(status, { 'content-type': 'application/json' });
        res.end(JSON.stringify(value));
      };
      const route = `${req.method} ${url.pathname}`;
      if (route === 'POST /api/accounts/deviceauth/usercode') return this.#usercode(body, json);
      if (route === 'POST /api/accounts/deviceauth/token') return this.#deviceToken(body, json);
      if (route === 'GET /oauth/authorize') return this.#authorize(url.searchParams, res);
      if (route === 'POST /oauth/token') return this.#token(contentType, body, json);
      return json(404, { error: 'not_found' });
    });
  }

  #usercode(body: Record<string, unknown> | undefined, json: (s: number, v: unknown) => void): void {
    if (this.#o.deviceDisabled) return json(404, { error: 'not_found' });
    if (body?.['client_id'] !== (this.#o.clientId ?? CODEX_CLIENT_ID)) return json(400, { error: 'invalid_client' });
    const d: DeviceCode = {
      deviceAuthId: `deviceauth_${b64url(24)}`,
      userCode: `${b64url(3).toUpperCase().replace(/[^A-Z0-9]/g, 'X')}-${randomBytes(2).toString('hex').toUpperCase()}`,
      polls: 0,
      approved: false,
    };
    this.#devices.push(d);
    this.#secrets.push(d.deviceAuthId);
    json(200, { device_auth_id: d.deviceAuthId, user_code: d.userCode, interval: this.#o.interval ?? '1' });
  }

  #deviceToken(body: Record<string, unknown> | undefined, json: (s: number, v: unknown) => void): void {
    const d = this.#devices.find((x) => x.deviceAuthId === body?.['device_auth_id'] && x.userCode === body?.['user_code']);
    if (!d) return json(400, { error: 'invalid_request' });
    d.polls += 1;
    if (this.#o.autoApproveAfterPolls !== undefined && d.polls >= this.#o.autoApproveAfterPolls) d.approved = true;
    if (!d.approved) return json(403, { error: 'authorization_pending' });
    if (!d.answer) {
      const verifier = b64url(64);
      const code = `ac_${b64url(32)}`;
      d.answer = { authorization_code: code, code_challenge: s256(verifier), code_verifier: verifier };
      this.#codes.set(code, { challenge: s256(verifier), redirectUri: `${this.url}/deviceauth/callback`, used: false });
      this.#secrets.push(code, verifier);
    }
    json(200, d.answer);
  }

  #authorize(q: URLSearchParams, res: ServerResponse): void {
    this.authorizeRequests.push(q);
    const problems: string[] = [];
    if (q.get('response_type') !== 'code') problems.push('response_type');
    if (q.get('client_id') !== (this.#o.clientId ?? CODEX_CLIENT_ID)) problems.push('client_id');
    const redirect = q.get('redirect_uri') ?? '';
    if (!ALLOWED_REDIRECTS.includes(redirect)) problems.push('redirect_uri');
    if (!q.get('code_challenge') || q.get('code_challenge_method') !== 'S256') problems.push('code_challenge');
    if (!q.get('state')) problems.push('state');
    const scope = (q.get('scope') ?? '').split(' ');
    if (!scope.includes('openid') || !scope.includes('offline_access')) problems.push('scope');
    if (problems.length) {
      res.writeHead(400, { 'content-type': 'text/plain' });
      res.end(`bad authorize request: ${problems.join(', ')}`);
      return;
    }
    const mode = this.#o.browser ?? 'approve';
    if (mode === 'wait') {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end('<html><body>Sign in</body></html>');
      return;
    }
    const target = new URL(redirect);
    if (mode === 'deny') {
      target.searchParams.set('error', 'access_denied');
      target.searchParams.set('error_description', 'The user denied access');
    } else {
      const code = `ac_${b64url(32)}`;
      this.#codes.set(code, { challenge: q.get('code_challenge') ?? '', redirectUri: redirect, used: false });
      this.#secrets.push(code);
      target.searchParams.set('code', code);
    }
    target.searchParams.set('state', q.get('state') ?? '');
    res.writeHead(302, { location: target.toString() });
    res.end();
  }

  #token(contentType: string | undefined, body: Record<string, unknown> | undefined, json: (s: number, v: unknown) => void): void {
    this.exchanges += 1;
    if (contentType !== 'application/x-www-form-urlencoded' || body?.['grant_type'] !== 'authorization_code') return json(400, { error: 'unsupported_grant_type' });
    if (typeof body['code_verifier'] === 'string') this.#secrets.push(body['code_verifier']);
    if (this.#nextExchange) {
      const f = this.#nextExchange;
      this.#nextExchange = undefined;
      return json(f.status, f.body);
    }
    const code = this.#codes.get(String(body['code']));
    if (!code || code.used) return json(400, { error: 'invalid_grant', error_description: 'unknown or used code' });
    if (body['client_id'] !== (this.#o.clientId ?? CODEX_CLIENT_ID)) return json(400, { error: 'invalid_client' });
    if (body['redirect_uri'] !== code.redirectUri) return json(400, { error: 'invalid_grant', error_description: 'redirect_uri mismatch' });
    if (typeof body['code_verifier'] !== 'string' || s256(body['code_verifier']) !== code.challenge) return json(400, { error: 'invalid_grant', error_description: 'PKCE verification failed' });
    code.used = true;
    const tokens = this.#o.mint?.() ?? this.#defaultTokens();
    this.#secrets.push(tokens.id_token, tokens.access_token, tokens.refresh_token);
    json(200, tokens);
  }

  #defaultTokens(): IssuedLoginTokens {
    const l = makeChatgptLogin({ accountId: this.#o.accountId ?? 'acct-login-0001', planType: this.#o.planType ?? 'pro' });
    return { id_token: l.idToken, access_token: l.accessToken, refresh_token: l.refreshToken };
  }
}
