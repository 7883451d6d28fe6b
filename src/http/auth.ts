import { createHash, timingSafeEqual } from 'node:crypto';
import type { FastifyRequest } from 'fastify';

export function sha256(value: string): Buffer {
  return createHash('sha256').update(value).digest();
}

/** Compare secrets by their hashes in constant time: neither length nor prefix leaks. */
export function sameSecret(given: string, expectedSha: Buffer): boolean {
  return timingSafeEqual(sha256(given), expectedSha);
}

export function bearerToken(req: FastifyRequest): string | undefined {
  const h = req.headers.authorization;
  if (typeof h !== 'string') return undefined;
  const m = /^Bearer\s+(\S+)\s*$/i.exec(h);
  return m?.[1];
}
