import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { BrokerError } from '../errors.js';

// Byte-compatible with the platform's Go implementation: version 1 is AES-256-GCM
// stored as nonce(12) || ciphertext || tag(16), no additional data; version 0 is
// plaintext. Any drift here makes rows unreadable by the platform or vice versa.
export const ENCRYPTION_PLAINTEXT = 0;
export const ENCRYPTION_AES_GCM = 1;
const NONCE_BYTES = 12;
const TAG_BYTES = 16;

const STD_BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/**
 * Go's rules: base64.StdEncoding first; a successful decode must give exactly 32
 * bytes (any other length is an error, even if the text is 32 characters long).
 * Only when decoding fails is a raw 32-character string the key.
 */
export function parseEncryptionKey(value: string): Buffer {
  if (value.length > 0 && STD_BASE64.test(value)) {
    const decoded = Buffer.from(value, 'base64');
    if (decoded.length !== 32) {
      throw new BrokerError(
        'ENCRYPTION_KEY_INVALID',
        `decodes as base64 to ${decoded.length} bytes; expected exactly 32 (generate one with: openssl rand -base64 32)`,
      );
    }
    return decoded;
  }
  const raw = Buffer.from(value, 'utf8');
  if (value.length === 32 && raw.length === 32) return raw;
  throw new BrokerError(
    'ENCRYPTION_KEY_INVALID',
    'expected standard padded base64 of exactly 32 bytes, or a raw 32-character string (generate one with: openssl rand -base64 32)',
  );
}

export interface Sealed {
  bytes: Buffer;
  version: number;
}

export function seal(plaintext: Buffer, key: Buffer | undefined): Sealed {
  if (!key) return { bytes: Buffer.from(plaintext), version: ENCRYPTION_PLAINTEXT };
  const nonce = randomBytes(NONCE_BYTES);
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  const body = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  return { bytes: Buffer.concat([nonce, body, cipher.getAuthTag()]), version: ENCRYPTION_AES_GCM };
}

export function open(bytes: Buffer, version: number, key: Buffer | undefined): Buffer {
  if (version === ENCRYPTION_PLAINTEXT) return Buffer.from(bytes);
  if (version !== ENCRYPTION_AES_GCM) {
    throw new BrokerError('ENCRYPTION_VERSION_UNKNOWN', `stored with encryption_version ${version}, which this broker cannot read (known: 0, 1)`);
  }
  if (!key) {
    throw new BrokerError('ENCRYPTION_KEY_MISSING', 'stored encrypted (version 1) but SECRETS_ENCRYPTION_KEY is not set');
  }
  if (bytes.length < NONCE_BYTES + TAG_BYTES) {
    throw new BrokerError('DECRYPT_FAILED', 'encrypted value is shorter than nonce and tag');
  }
  const nonce = bytes.subarray(0, NONCE_BYTES);
  const tag = bytes.subarray(bytes.length - TAG_BYTES);
  const body = bytes.subarray(NONCE_BYTES, bytes.length - TAG_BYTES);
  try {
    const decipher = createDecipheriv('aes-256-gcm', key, nonce);
    decipher.setAuthTag(tag);
    return Buffer.concat([decipher.update(body), decipher.final()]);
  } catch (err) {
    throw new BrokerError('DECRYPT_FAILED', 'could not decrypt the stored value: wrong SECRETS_ENCRYPTION_KEY?', { cause: err });
  }
}
