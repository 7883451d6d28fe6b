import { createHmac, hash, hkdfSync, randomBytes } from 'node:crypto';
import type { Pool } from '../db.js';

export const CLIENTS_CHANNEL = 'codex_auth_clients_changed';
export const REFRESH_CREDENTIAL_PREFIX = 'cabrt_';

/** 32 random bytes, unpadded base64url (43 characters), like the platform's workspace tokens. */
export function newToken(): string {
  return randomBytes(32).toString('base64url');
}

export function sha256(value: string | Buffer): Buffer {
  return hash('sha256', value, 'buffer');
}

/**
 * The secret behind every client's broker refresh credential. With an encryption key it
 * is derived from it, so reading the database alone does not let anyone mint one; without
 * a key (plaintext storage, where the database already holds everything) a random secret
 * is kept in broker_settings.
 */
export async function loadCredentialSecret(pool: Pool, encryptionKey: Buffer | undefined): Promise<Buffer> {
  if (encryptionKey) return Buffer.from(hkdfSync('sha256', encryptionKey, Buffer.alloc(0), 'codex-auth-broker refresh credential v1', 32));
  await pool.query("INSERT INTO broker_settings (name, value) VALUES ('refresh_credential_secret', $1) ON CONFLICT (name) DO NOTHING", [randomBytes(32)]);
  const r = await pool.query<{ value: Buffer }>("SELECT value FROM broker_settings WHERE name = 'refresh_credential_secret'");
  const v = r.rows[0]?.value;
  if (!v) throw new Error('broker_settings lost the refresh credential secret');
  return v;
}

/**
 * A client's broker refresh credential, derived from the SHA-256 of its bearer token: the
 * broker can put it into the served auth.json without ever storing it, and can verify it
 * by hash on /oauth/token. Platform workspace tokens (known only by hash) get one the
 * same way.
 */
export function refreshCredential(secret: Buffer, tokenSha: Buffer): string {
  return REFRESH_CREDENTIAL_PREFIX + createHmac('sha256', secret).update(tokenSha).digest('base64url');
}

/**
 * Which access token a served document carried, as a short tag appended to the refresh
 * credential (`<credential>.<generation>`). Codex sends it back on refresh, so any replica
 * knows whether the caller already holds the current token without asking the database.
 */
export function generationOf(accessToken: string): string {
  return sha256(accessToken).subarray(0, 9).toString('base64url');
}

export function splitServedRefreshToken(value: string): { credential: string; generation: string | undefined } {
  const dot = value.lastIndexOf('.');
  if (dot <= 0) return { credential: value, generation: undefined };
  return { credential: value.slice(0, dot), generation: value.slice(dot + 1) };
}
