/**
 * A fake ChatGPT backend for driving the real `codex exec` (0.169.0) without the internet.
 *
 * What codex 0.169.0 needs (found by experiment, see test/codex-cli.test.ts):
 *
 * - HTTPS. codex resolves "workspace routing" before any model request and refuses a
 *   `chatgpt_base_url` that is not an HTTPS origin ("workspace backend must use an HTTPS
 *   origin without credentials"). So this server speaks TLS with a fixed test-only
 *   certificate, and codex is told to trust its CA with `CODEX_CA_CERTIFICATE`.
 * - `GET /backend-api/wham/accounts/check` answering the workspace of the caller's
 *   `chatgpt-account-id` with `workspace_backend_origin` and `account_routing_override`
 *   both "NO_CONSTRAINT" (then codex keeps `chatgpt_base_url`'s origin).
 * - `POST /backend-api/codex/responses` answering a Responses API SSE stream
 *   (`response.created`, `response.output_item.done` with an assistant message,
 *   `response.completed`). codex first tries a WebSocket on the same path; it is refused
 *   with 426, which makes codex fall back to HTTPS at once (a 404 costs ~10 s of retries).
 * - Everything else may be 404. codex also calls `/backend-api/ps/plugins/installed`,
 *   `/ps/plugins/suggested/codex`, `/ps/mcp` (no bearer), `/wham/settings/user`,
 *   `/codex/analytics-events/events`, and, ignoring `chatgpt_base_url`,
 *   `https://chatgpt.com/backend-api/codex/models` and `https://ab.chatgpt.com/otlp/...`.
 *   Those go through `HTTPS_PROXY`, which points at this fake's CONNECT proxy: it tunnels
 *   every CONNECT to this same TLS server (whose certificate also names chatgpt.com and
 *   *.chatgpt.com), so nothing leaves 127.0.0.1, no DNS lookup happens, and codex gets a
 *   quick 404 instead of retrying connection errors for ~6 s.
 *
 * Authentication: every request whose bearer is not the current access token gets
 * 401 `{"error":{"message":"token expired","code":"token_expired"}}`, which makes codex run
 * its `unauthorized_recovery` refresh (POST to CODEX_REFRESH_TOKEN_URL_OVERRIDE).
 * Requests without any bearer (codex's MCP client, OTLP metrics) get 404.
 *
 * Use: `codexEnv()` for the environment, `execArgs(prompt)` for the argv.
 */
import { createServer as createHttpServer } from 'node:http';
import type { IncomingMessage, Server as HttpServer, ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { Server as HttpsServer } from 'node:https';
import * as fs from 'node:fs';
import * as net from 'node:net';
import type { AddressInfo } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Duplex } from 'node:stream';

/*
 * Test-only TLS material (ECDSA P-256, valid 2020-2120). The CA's private key was thrown
 * away after signing the leaf, so this CA can vouch for nothing but this leaf, whose
 * names are 127.0.0.1, localhost, chatgpt.com and *.chatgpt.com. Only the codex child
 * processes of the tests trust it (CODEX_CA_CERTIFICATE).
 */
export const TEST_CA_PEM = `-----BEGIN CERTIFICATE-----
MIIBfDCCASKgAwIBAgICEAAwCgYIKoZIzj0EAwIwJDEiMCAGA1UEAwwZY29kZXgt
YXV0aC1icm9rZXIgdGVzdCBDQTAgFw0yMDAxMDEwMDAwMDBaGA8yMTIwMDEwMTAw
MDAwMFowJDEiMCAGA1UEAwwZY29kZXgtYXV0aC1icm9rZXIgdGVzdCBDQTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABOllf4yEnKEnYMYLkUkKny9JafAKxP+dwj/S
HpKuWhKCXh15zRKrkk6SPt438u9xP0w66MxF7X63opEbDQPflO2jQjBAMA8GA1Ud
EwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgEGMB0GA1UdDgQWBBRNPEh9ymEbWJGp
vUArXf0DKtd0mDAKBggqhkjOPQQDAgNIADBFAiAfvKTAP7bnYCx0qO38mH1NaymA
g469Uc+Z2I8eWP1NOAIhANgvlYVBDjun2xuJ/CowMtCzZWgastqH42SAk0dwi/ec
-----END CERTIFICATE-----
`;

const LEAF_CERT_PEM = `-----BEGIN CERTIFICATE-----
MIIB2jCCAX+gAwIBAgICEAIwCgYIKoZIzj0EAwIwJDEiMCAGA1UEAwwZY29kZXgt
YXV0aC1icm9rZXIgdGVzdCBDQTAgFw0yMDAxMDEwMDAwMDBaGA8yMTIwMDEwMTAw
MDAwMFowFDESMBAGA1UEAwwJMTI3LjAuMC4xMFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAEyf9jACS7eZYLrj58l4Uvzp6gKUjm6+PUlj65Xp9Mcc4q06XsUmNAh81e
lUpzHgv41VKfKukdqk/R2916dQ2oBaOBrjCBqzAMBgNVHRMBAf8EAjAAMA4GA1Ud
DwEB/wQEAwIHgDATBgNVHSUEDDAKBggrBgEFBQcDATA2BgNVHREELzAthwR/AAAB
gglsb2NhbGhvc3SCC2NoYXRncHQuY29tgg0qLmNoYXRncHQuY29tMB8GA1UdIwQY
MBaAFE08SH3KYRtYkam9QCtd/QMq13SYMB0GA1UdDgQWBBTA94Vtp+sM2dVnivhg
TGARoyfWODAKBggqhkjOPQQDAgNJADBGAiEA/wcOQJd2S85nwdNtadVUOZeY/Scp
LqcAAtim6hVze8ICIQCnfcGpa9RA4AK46Gl6UuZZ6PXdJDKBi6fGu0reG5/hGg==
-----END CERTIFICATE-----
`;

const LEAF_KEY_PEM = `-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgPegAqvxqQIuJakCw
y6ZVCAH5NaWHgrHjPicED0BXN6qhRANCAATJ/2MAJLt5lguuPnyXhS/OnqApSObr
49SWPrlen0xxzirTpexSY0CHzV6VSnMeC/jVUp8q6R2qT9Hb3Xp1DagF
-----END PRIVATE KEY-----
`;

export interface BackendRequest {
  /** Monotonic timestamp (performance.now()) when the request was received. */
  at: number;
  method: string;
  /** Path without the query string, e.g. `/backend-api/wham/accounts/check`. */
  path: string;
  /** Query string including `?`, or ''. */
  query: string;
  /** The Host header: `127.0.0.1:<port>`, or e.g. `chatgpt.com` for proxied requests. */
  host: string;
  /** Bearer token from `Authorization`, or undefined when there was none. */
  bearer: string | undefined;
  /** `chatgpt-account-id` header. */
  accountId: string | undefined;
  /** Status this fake answered. */
  status: number;
  /** True for a WebSocket upgrade attempt (always refused with 426). */
  upgrade: boolean;
}

export interface FakeBackendOptions {
  /** The access token accepted as current; undefined = none accepted yet. */
  currentAccessToken?: string;
  /** Text of the assistant's answer in /codex/responses. Default "hi from the fake backend". */
  assistantText?: string;
  /** plan_type reported by accounts/check. Default "pro". */
  planType?: string;
}

/** Called before the fake answers 401 to a stale bearer (e.g. to rewrite auth.json on disk). */
export type UnauthorizedHook = (r: BackendRequest) => void;

export const TOKEN_EXPIRED_BODY = { error: { message: 'token expired', code: 'token_expired' } };

function sse(type: string, fields: Record<string, unknown>): string {
  return `event: ${type}\ndata: ${JSON.stringify({ type, ...fields })}\n\n`;
}

export class FakeBackend {
  /** Every request received (including proxied ones and refused WebSocket upgrades). */
  readonly requests: BackendRequest[] = [];
  /** Targets of CONNECT requests received by the proxy (`host:port`). */
  readonly connects: string[] = [];
  private current: string | undefined;
  private readonly assistantText: string;
  private readonly planType: string;
  private readonly sockets = new Set<Duplex>();
  private tls!: HttpsServer;
  private proxy!: HttpServer;
  private tmpDir!: string;
  private port = 0;
  private proxyPort = 0;
  private responseSeq = 0;
  /** Runs (synchronously) before every 401 this fake sends for a stale bearer. */
  onUnauthorized: UnauthorizedHook | undefined;

  private constructor(o: FakeBackendOptions) {
    this.current = o.currentAccessToken;
    this.assistantText = o.assistantText ?? 'hi from the fake backend';
    this.planType = o.planType ?? 'pro';
  }

  static async start(o: FakeBackendOptions = {}): Promise<FakeBackend> {
    const b = new FakeBackend(o);
    await b.listen();
    return b;
  }

  /** Base URL for codex's `chatgpt_base_url`: `https://127.0.0.1:<port>/backend-api/`. */
  get url(): string {
    return `https://127.0.0.1:${this.port}/backend-api/`;
  }

  /** `http://127.0.0.1:<port>`: a CONNECT proxy that tunnels everything to this fake. */
  get proxyUrl(): string {
    return `http://127.0.0.1:${this.proxyPort}`;
  }

  /** A PEM file holding the test CA, for `CODEX_CA_CERTIFICATE`. */
  get caFile(): string {
    return path.join(this.tmpDir, 'ca.pem');
  }

  get currentAccessToken(): string | undefined {
    return this.current;
  }

  setCurrentAccessToken(token: string | undefined): void {
    this.current = token;
  }

  /** Environment for codex: trust the test CA; route non-loopback HTTPS to the fake's proxy. */
  codexEnv(): Record<string, string> {
    return {
      CODEX_CA_CERTIFICATE: this.caFile,
      HTTPS_PROXY: this.proxyUrl,
      https_proxy: this.proxyUrl,
      HTTP_PROXY: this.proxyUrl,
      http_proxy: this.proxyUrl,
      NO_PROXY: '127.0.0.1,localhost',
      no_proxy: '127.0.0.1,localhost',
    };
  }

  /** `-c chatgpt_base_url="<url>"`. */
  configArgs(): string[] {
    return ['-c', `chatgpt_base_url="${this.url}"`];
  }

  /** argv for `codex exec --skip-git-repo-check -c chatgpt_base_url=... <prompt>`. */
  execArgs(prompt = 'say hi'): string[] {
    return ['exec', '--skip-git-repo-check', ...this.configArgs(), prompt];
  }

  /** Requests that carried a bearer token, in arrival order. */
  authenticated(): BackendRequest[] {
    return this.requests.filter((r) => r.bearer !== undefined);
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await Promise.all([
      new Promise<void>((resolve) => this.tls.close(() => resolve())),
      new Promise<void>((resolve) => this.proxy.close(() => resolve())),
    ]);
    fs.rmSync(this.tmpDir, { recursive: true, force: true });
  }

  private track(s: Duplex): void {
    this.sockets.add(s);
    s.on('close', () => this.sockets.delete(s));
  }

  private async listen(): Promise<void> {
    this.tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'fake-backend-'));
    fs.writeFileSync(this.caFile, TEST_CA_PEM);

    this.tls = createHttpsServer({ cert: LEAF_CERT_PEM, key: LEAF_KEY_PEM }, (req, res) => this.handle(req, res));
    this.tls.on('connection', (s: net.Socket) => this.track(s));
    this.tls.on('tlsClientError', () => undefined);
    this.tls.on('upgrade', (req: IncomingMessage, socket: Duplex) => {
      this.record(req, 426, true);
      socket.on('error', () => undefined);
      socket.end('HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
    });
    await new Promise<void>((resolve) => this.tls.listen(0, '127.0.0.1', resolve));
    this.port = (this.tls.address() as AddressInfo).port;

    this.proxy = createHttpServer((_req, res) => {
      res.writeHead(403, { 'content-type': 'text/plain' });
      res.end('only CONNECT');
    });
    this.proxy.on('connection', (s: net.Socket) => this.track(s));
    this.proxy.on('connect', (req: IncomingMessage, client: Duplex, head: Buffer) => {
      this.connects.push(req.url ?? '');
      client.on('error', () => undefined);
      const upstream = net.connect(this.port, '127.0.0.1', () => {
        client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
        if (head.length > 0) upstream.write(head);
        upstream.pipe(client);
        client.pipe(upstream);
      });
      this.track(upstream);
      upstream.on('error', () => client.destroy());
      client.on('close', () => upstream.destroy());
    });
    await new Promise<void>((resolve) => this.proxy.listen(0, '127.0.0.1', resolve));
    this.proxyPort = (this.proxy.address() as AddressInfo).port;
  }

  private record(req: IncomingMessage, status: number, upgrade: boolean): BackendRequest {
    const target = req.url ?? '/';
    const q = target.indexOf('?');
    const auth = req.headers.authorization;
    const m = typeof auth === 'string' ? /^Bearer\s+(.+)$/i.exec(auth) : null;
    const accountHeader = req.headers['chatgpt-account-id'];
    const r: BackendRequest = {
      at: performance.now(),
      method: req.method ?? 'GET',
      path: q >= 0 ? target.slice(0, q) : target,
      query: q >= 0 ? target.slice(q) : '',
      host: req.headers.host ?? '',
      bearer: m?.[1],
      accountId: typeof accountHeader === 'string' ? accountHeader : undefined,
      status,
      upgrade,
    };
    this.requests.push(r);
    return r;
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    // Drain the body (codex sends zstd-compressed JSON to /codex/responses; not needed).
    req.resume();
    req.on('end', () => {
      const r = this.record(req, 0, false);
      const send = (status: number, body: unknown, type = 'application/json'): void => {
        r.status = status;
        res.writeHead(status, { 'content-type': type });
        res.end(typeof body === 'string' ? body : JSON.stringify(body));
      };
      if (r.bearer === undefined) return send(404, {});
      if (this.current === undefined || r.bearer !== this.current) {
        this.onUnauthorized?.(r);
        return send(401, TOKEN_EXPIRED_BODY);
      }

      if (r.method === 'GET' && r.path === '/backend-api/wham/accounts/check') {
        const id = r.accountId ?? 'unknown-account';
        return send(200, {
          accounts: [
            {
              id,
              name: null,
              plan_type: this.planType,
              structure: 'personal',
              profile_picture_url: null,
              workspace_backend_origin: 'NO_CONSTRAINT',
              account_routing_override: 'NO_CONSTRAINT',
            },
          ],
          account_ordering: [id],
          default_account_id: id,
        });
      }
      if (r.method === 'POST' && r.path === '/backend-api/codex/responses') {
        const id = `resp_fake_${++this.responseSeq}`;
        r.status = 200;
        res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-store' });
        res.write(sse('response.created', { response: { id } }));
        res.write(
          sse('response.output_item.done', {
            item: {
              type: 'message',
              role: 'assistant',
              id: `msg_fake_${this.responseSeq}`,
              content: [{ type: 'output_text', text: this.assistantText }],
            },
          }),
        );
        res.end(
          sse('response.completed', {
            response: {
              id,
              usage: {
                input_tokens: 1,
                input_tokens_details: null,
                output_tokens: 1,
                output_tokens_details: null,
                total_tokens: 2,
              },
            },
          }),
        );
        return;
      }
      return send(404, {});
    });
  }
}
