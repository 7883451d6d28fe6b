import { hash, randomBytes } from 'node:crypto';

export type RandomBytes = (size: number) => Buffer;

export interface Pkce {
  verifier: string;
  challenge: string;
}

/** RFC 7636 S256: the challenge is base64url(SHA-256(verifier)). */
export function challengeOf(verifier: string): string {
  return hash('sha256', verifier, 'base64url');
}

/** As codex makes it (pkce.rs): the verifier is base64url of 64 random bytes (86 characters). */
export function createPkce(random: RandomBytes = randomBytes): Pkce {
  const verifier = random(64).toString('base64url');
  return { verifier, challenge: challengeOf(verifier) };
}

/** As codex makes it (server.rs): base64url of 32 random bytes. */
export function createState(random: RandomBytes = randomBytes): string {
  return random(32).toString('base64url');
}
