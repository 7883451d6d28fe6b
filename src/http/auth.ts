import { timingSafeEqual } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { sha256 } from '../clients/credentials.js';
import type { Logger } from '../logger.js';
import { sendProblem, sendUnauthorized } from './problem.js';

/** Compare secrets by their hashes in constant time: neither length nor prefix leaks. */
export function sameSecret(given: string, expectedSha: Buffer): boolean {
  return timingSafeEqual(sha256(given), expectedSha);
}

export function bearerToken(req: FastifyRequest): string | undefined {
  return bearerOf(req.headers.authorization);
}

const BEARER = /^Bearer\s+(\S+)\s*$/i;

/**
 * The token of an `Authorization: Bearer` header. The form every client sends (`Bearer`,
 * one space, then printable ASCII) is read without the regular expression, which was a
 * measured share of each served request (BENCHMARKS.md, session 16); the result is the
 * same: such a token has no whitespace for `\S+` to stop at.
 */
export function bearerOf(h: string | undefined): string | undefined {
  if (typeof h !== 'string') return undefined;
  if (h.length > 7 && h.startsWith('Bearer ')) {
    let plain = true;
    for (let i = 7; i < h.length; i++) {
      const c = h.charCodeAt(i);
      if (c <= 0x20 || c >= 0x7f) {
        plain = false;
        break;
      }
    }
    if (plain) return h.slice(7);
  }
  return BEARER.exec(h)?.[1];
}

export interface AuthFailuresOptions {
  logger: Pick<Logger, 'warn'>;
  /** How late a failed attempt is answered (default 250 ms). */
  delayMs?: number;
  /** Late answers in flight at most; beyond, 429 at once (default 32). */
  maxDelayed?: number;
  /** At most one log line per window, with the count (default 10 s). */
  logWindowMs?: number;
  /** The wait itself: a seam for tests. */
  sleep?: (ms: number) => Promise<unknown>;
}

/**
 * Failed admin-token checks. Each is answered late, so a guess costs a quarter second
 * instead of a tenth of a millisecond; the late answers in flight are capped, so the
 * delay cannot be turned into a way to hold memory. While the cap is reached, every
 * request presenting a token is answered 429 WITHOUT checking it: a quick 429 for a
 * wrong token beside a quick 200 for the right one would let a flood guess at full
 * speed. Failures are logged as one line per window with counts, so a flood cannot fill
 * the disk. The presented token is never logged, not even in part.
 */
export class AuthFailures {
  readonly #o: Required<Omit<AuthFailuresOptions, 'logger' | 'sleep'>>;
  readonly #logger: Pick<Logger, 'warn'>;
  readonly #sleep: (ms: number) => Promise<unknown>;
  #delayed = 0;
  #count = 0;
  #throttled = 0;
  readonly #sources = new Set<string>();
  #timer: NodeJS.Timeout | undefined;

  constructor(o: AuthFailuresOptions) {
    this.#logger = o.logger;
    this.#sleep = o.sleep ?? sleep;
    this.#o = { delayMs: o.delayMs ?? 250, maxDelayed: o.maxDelayed ?? 32, logWindowMs: o.logWindowMs ?? 10_000 };
  }

  /** Late answers in flight now. */
  get delayed(): number {
    return this.#delayed;
  }

  /** The cap is reached: answer with throttle() before comparing any token. */
  get saturated(): boolean {
    return this.#delayed >= this.#o.maxDelayed;
  }

  /** 429 at once, the presented token unchecked. */
  throttle(req: FastifyRequest, reply: FastifyReply): FastifyReply {
    this.#throttled += 1;
    this.#note(req);
    return sendProblem(reply, {
      status: 429,
      code: 'too_many_auth_failures',
      title: 'Too Many Requests',
      detail: 'too many failed authentications in flight; retry shortly',
      headers: { 'retry-after': '1' },
    });
  }

  /** Answer a failed check: 401 after the delay (or 429 at once if the cap was reached meanwhile). */
  async reject(req: FastifyRequest, reply: FastifyReply, detail: string): Promise<FastifyReply> {
    if (this.saturated) return this.throttle(req, reply);
    this.#count += 1;
    this.#note(req);
    this.#delayed += 1;
    try {
      await this.#sleep(this.#o.delayMs);
    } finally {
      this.#delayed -= 1;
    }
    return sendUnauthorized(reply, detail);
  }

  #note(req: FastifyRequest): void {
    if (this.#sources.size < 10) this.#sources.add(req.ip);
    this.#timer ??= setTimeout(() => this.flush(), this.#o.logWindowMs).unref();
  }

  /** Log what was counted so far (at the end of a window, and when the app closes). */
  flush(): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = undefined;
    if (this.#count === 0 && this.#throttled === 0) return;
    const count = this.#count;
    const throttled = this.#throttled;
    this.#logger.warn(
      { event: 'admin_auth_failed', count, throttled, sources: [...this.#sources] },
      `${count} request(s) presented a wrong ADMIN_TOKEN (admin routes or /status), each answered late${throttled ? `; ${throttled} more were refused unchecked (429) while ${this.#o.maxDelayed} were held` : ''}. A misconfigured client, or someone guessing: check the sources`,
    );
    this.#count = 0;
    this.#throttled = 0;
    this.#sources.clear();
  }
}
