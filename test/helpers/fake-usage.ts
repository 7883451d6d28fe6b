/**
 * A fake ChatGPT backend's `GET /backend-api/wham/usage`, over plain http on 127.0.0.1 (a
 * loopback CHATGPT_BASE_URL may be http). It answers each access token with the status the
 * test chose (200 with a usage document by default), and counts the GETs it saw.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

export type UsageAnswer = 'accept' | 'reject' | 'error' | 'hang' | 'malformed';

/** The figures a 200 carries; a test changes them between polls. */
export interface FakeUsage {
  plan: string;
  primary: { usedPercent: number; resetAt: number };
  secondary: { usedPercent: number; resetAt: number };
}

export class FakeUsageBackend {
  readonly #server: Server;
  readonly url: string;
  /** The answer for a token with no answer of its own. */
  answer: UsageAnswer = 'accept';
  readonly #perToken = new Map<string, UsageAnswer>();
  gets = 0;
  /** What a 200 answers with (percentages and reset times). */
  usage: FakeUsage = { plan: 'plus', primary: { usedPercent: 12, resetAt: 1_900_000_000 }, secondary: { usedPercent: 3, resetAt: 1_900_100_000 } };
  /** Figures for one access token (one login), instead of `usage`. */
  readonly #usageOf = new Map<string, FakeUsage>();
  /** A whole body to answer 200 with instead (a malformed or partial document), when set. */
  body: unknown;
  /** The bearer and account id of every GET, for the assertions (never printed). */
  readonly seen: { bearer: string | undefined; accountId: string | undefined }[] = [];

  private constructor(server: Server) {
    this.#server = server;
    const { port } = server.address() as AddressInfo;
    this.url = `http://127.0.0.1:${port}/backend-api`;
  }

  static async start(): Promise<FakeUsageBackend> {
    const holder: { self?: FakeUsageBackend } = {};
    const server = createServer((req, res) => holder.self?.handle(req, res));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    holder.self = new FakeUsageBackend(server);
    return holder.self;
  }

  /** How the backend answers this one token (others get `answer`). */
  set(token: string, answer: UsageAnswer): void {
    this.#perToken.set(token, answer);
  }

  /** What a 200 answers this one token with (a login's own figures; others get `usage`). */
  setUsage(token: string, usage: FakeUsage): void {
    this.#usageOf.set(token, usage);
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    if (req.method !== 'GET' || req.url?.split('?')[0] !== '/backend-api/wham/usage') {
      res.writeHead(404).end();
      return;
    }
    this.gets += 1;
    const m = /^Bearer (\S+)$/.exec(req.headers.authorization ?? '');
    const bearer = m?.[1];
    const account = req.headers['chatgpt-account-id'];
    this.seen.push({ bearer, accountId: typeof account === 'string' ? account : undefined });
    const answer = (bearer !== undefined ? this.#perToken.get(bearer) : undefined) ?? (bearer === undefined ? 'reject' : this.answer);
    switch (answer) {
      case 'hang':
        return; // never answers: the broker's timeout must end it
      case 'error':
        res.writeHead(502, { 'content-type': 'text/plain' }).end('bad gateway');
        return;
      case 'malformed':
        res.writeHead(200, { 'content-type': 'application/json' }).end('{"plan_type": "plus", "rate_li');
        return;
      case 'reject':
        res.writeHead(401, { 'content-type': 'application/json' }).end(JSON.stringify({ error: { message: 'token expired', code: 'token_expired' } }));
        return;
      default: {
        const u = (bearer !== undefined ? this.#usageOf.get(bearer) : undefined) ?? this.usage;
        res.writeHead(200, { 'content-type': 'application/json' }).end(
          JSON.stringify(
            this.body !== undefined
              ? this.body
              : {
                  plan_type: u.plan,
                  rate_limit: {
                    allowed: true,
                    limit_reached: u.primary.usedPercent >= 100 || u.secondary.usedPercent >= 100,
                    primary_window: { used_percent: u.primary.usedPercent, limit_window_seconds: 18_000, reset_after_seconds: 3_600, reset_at: u.primary.resetAt },
                    secondary_window: { used_percent: u.secondary.usedPercent, limit_window_seconds: 604_800, reset_after_seconds: 86_400, reset_at: u.secondary.resetAt },
                  },
                  credits: { has_credits: false, unlimited: false, balance: '0' },
                },
          ),
        );
      }
    }
  }

  close(): Promise<void> {
    this.#server.closeAllConnections();
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }
}
