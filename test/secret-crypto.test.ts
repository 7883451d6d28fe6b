import { strict as assert } from 'node:assert';
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import { BrokerError } from '../src/errors.js';
import { ENCRYPTION_AES_GCM, ENCRYPTION_PLAINTEXT, open, parseEncryptionKey, seal } from '../src/lib/secret-crypto.js';

// An independent implementation of the platform's Go format (crypto/cipher GCM with the
// standard 12-byte nonce: nonce || Seal(nil, nonce, plaintext, nil), where Seal appends
// the 16-byte tag). Written here on purpose, NOT imported from src.
function goSeal(key: Buffer, nonce: Buffer, plaintext: Buffer): Buffer {
  const c = createCipheriv('aes-256-gcm', key, nonce);
  return Buffer.concat([nonce, c.update(plaintext), c.final(), c.getAuthTag()]);
}

function goOpen(key: Buffer, stored: Buffer): Buffer {
  const nonce = stored.subarray(0, 12);
  const tag = stored.subarray(stored.length - 16);
  const d = createDecipheriv('aes-256-gcm', key, nonce);
  d.setAuthTag(tag);
  return Buffer.concat([d.update(stored.subarray(12, stored.length - 16)), d.final()]);
}

// Fixed test vector, computed once with node:crypto and pasted here.
const VECTOR_KEY_HEX = '000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f';
const VECTOR_KEY_B64 = 'AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=';
const VECTOR_NONCE_HEX = 'cafebabefacedbaddecaf888';
const VECTOR_PLAINTEXT = '{"tokens":{"refresh_token":"rt_test"}}';
const VECTOR_SEALED_HEX =
  'cafebabefacedbaddecaf888' +
  'f181d449c11f2168643126ff0978ef4d6853a80eab76011120fd3e53ccfd3a8bc823b564bca9' +
  '6983c230b7dc504df7be8fe434d3b0ec';

const KEY = Buffer.from(VECTOR_KEY_HEX, 'hex');

function expectCode(fn: () => unknown, code: string, messageIncludes?: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof BrokerError, `expected a BrokerError, got ${String(err)}`);
    assert.equal(err.code, code);
    if (messageIncludes !== undefined) assert.ok(err.message.includes(messageIncludes), err.message);
    return true;
  });
}

describe('secret-crypto: byte compatibility with the platform (Go) format', () => {
  test('the independent implementation reproduces the fixed test vector', () => {
    const sealed = goSeal(KEY, Buffer.from(VECTOR_NONCE_HEX, 'hex'), Buffer.from(VECTOR_PLAINTEXT));
    assert.equal(sealed.toString('hex'), VECTOR_SEALED_HEX);
    assert.equal(sealed.length, 12 + Buffer.byteLength(VECTOR_PLAINTEXT) + 16);
  });

  test('a row sealed by the platform with a fixed key and nonce opens with open()', () => {
    const out = open(Buffer.from(VECTOR_SEALED_HEX, 'hex'), ENCRYPTION_AES_GCM, KEY);
    assert.equal(out.toString('utf8'), VECTOR_PLAINTEXT);
  });

  test('the fixed test vector opens with the key given as padded base64 in the environment form', () => {
    const key = parseEncryptionKey(VECTOR_KEY_B64);
    assert.equal(key.toString('hex'), VECTOR_KEY_HEX);
    assert.equal(open(Buffer.from(VECTOR_SEALED_HEX, 'hex'), 1, key).toString('utf8'), VECTOR_PLAINTEXT);
  });

  test('what seal() writes is version 1 and opens with the independent implementation', () => {
    const plaintext = Buffer.from(JSON.stringify({ tokens: { refresh_token: 'rt_x', access_token: 'a.b.c' }, last_refresh: 'now' }));
    const sealed = seal(plaintext, KEY);
    assert.equal(sealed.version, ENCRYPTION_AES_GCM);
    assert.equal(sealed.version, 1);
    assert.equal(sealed.bytes.length, 12 + plaintext.length + 16, 'nonce(12) || ciphertext || tag(16)');
    assert.deepEqual(goOpen(KEY, sealed.bytes), plaintext);
  });

  test('seal() uses a fresh random nonce every time', () => {
    const plaintext = Buffer.from('same plaintext');
    const a = seal(plaintext, KEY);
    const b = seal(plaintext, KEY);
    assert.notDeepEqual(a.bytes.subarray(0, 12), b.bytes.subarray(0, 12));
    assert.notDeepEqual(a.bytes, b.bytes);
  });

  test('seal() then open() round-trips an empty and a large plaintext', () => {
    for (const pt of [Buffer.alloc(0), randomBytes(200_000)]) {
      const s = seal(pt, KEY);
      assert.deepEqual(open(s.bytes, s.version, KEY), pt);
      assert.deepEqual(goOpen(KEY, s.bytes), pt);
    }
  });

  test('random rows sealed by the independent implementation all open with open()', () => {
    for (let i = 0; i < 50; i++) {
      const key = randomBytes(32);
      const pt = randomBytes(i * 7);
      assert.deepEqual(open(goSeal(key, randomBytes(12), pt), 1, key), pt);
    }
  });
});

describe('secret-crypto: versions', () => {
  test('version 0 is plaintext on read', () => {
    const bytes = Buffer.from('{"tokens":{}}');
    assert.deepEqual(open(bytes, ENCRYPTION_PLAINTEXT, undefined), bytes);
    assert.deepEqual(open(bytes, 0, KEY), bytes, 'a key does not change how version 0 is read');
  });

  test('without a key seal() writes version 0 plaintext', () => {
    const bytes = Buffer.from('hello');
    const sealed = seal(bytes, undefined);
    assert.equal(sealed.version, 0);
    assert.deepEqual(sealed.bytes, bytes);
  });

  test('open() of version 0 returns a copy, not the caller buffer', () => {
    const bytes = Buffer.from('abc');
    const out = open(bytes, 0, undefined);
    out[0] = 0x7a;
    assert.equal(bytes.toString(), 'abc');
  });

  test('version 1 with no key is ENCRYPTION_KEY_MISSING naming SECRETS_ENCRYPTION_KEY', () => {
    expectCode(() => open(Buffer.from(VECTOR_SEALED_HEX, 'hex'), 1, undefined), 'ENCRYPTION_KEY_MISSING', 'SECRETS_ENCRYPTION_KEY');
  });

  test('version 7 is ENCRYPTION_VERSION_UNKNOWN', () => {
    expectCode(() => open(Buffer.from(VECTOR_SEALED_HEX, 'hex'), 7, KEY), 'ENCRYPTION_VERSION_UNKNOWN', '7');
    expectCode(() => open(Buffer.from('x'), 7, undefined), 'ENCRYPTION_VERSION_UNKNOWN');
    expectCode(() => open(Buffer.from('x'), -1, KEY), 'ENCRYPTION_VERSION_UNKNOWN');
  });

  test('a wrong key is DECRYPT_FAILED', () => {
    const wrong = Buffer.from(KEY);
    wrong[31] = wrong[31]! ^ 0x01;
    expectCode(() => open(Buffer.from(VECTOR_SEALED_HEX, 'hex'), 1, wrong), 'DECRYPT_FAILED');
  });

  test('a tampered byte anywhere (nonce, ciphertext, tag) is DECRYPT_FAILED', () => {
    const good = Buffer.from(VECTOR_SEALED_HEX, 'hex');
    for (const i of [0, 11, 12, 20, good.length - 17, good.length - 16, good.length - 1]) {
      const bad = Buffer.from(good);
      bad[i] = bad[i]! ^ 0x80;
      expectCode(() => open(bad, 1, KEY), 'DECRYPT_FAILED');
    }
  });

  test('a truncated row shorter than nonce and tag is DECRYPT_FAILED, not a crash', () => {
    expectCode(() => open(Buffer.alloc(27), 1, KEY), 'DECRYPT_FAILED');
    expectCode(() => open(Buffer.alloc(0), 1, KEY), 'DECRYPT_FAILED');
  });

  test('a DECRYPT_FAILED message does not contain the key or the plaintext', () => {
    const wrong = randomBytes(32);
    try {
      open(Buffer.from(VECTOR_SEALED_HEX, 'hex'), 1, wrong);
      assert.fail('expected a throw');
    } catch (err) {
      const msg = (err as Error).message;
      assert.ok(!msg.includes(wrong.toString('base64')));
      assert.ok(!msg.includes(wrong.toString('hex')));
      assert.ok(!msg.includes('rt_test'));
    }
  });
});

describe('secret-crypto: SECRETS_ENCRYPTION_KEY parsing (Go rules)', () => {
  test('padded standard base64 of 32 bytes is the key', () => {
    const bytes = randomBytes(32);
    const text = bytes.toString('base64');
    assert.equal(text.length, 44);
    assert.deepEqual(parseEncryptionKey(text), bytes);
  });

  test('a 32-byte base64 key with + and / characters decodes as standard (not url) base64', () => {
    const bytes = Buffer.alloc(32, 0xfb); // encodes to '+/v7+/v7...'
    const text = bytes.toString('base64');
    assert.ok(text.includes('+') && text.includes('/'), text);
    assert.deepEqual(parseEncryptionKey(text), bytes);
  });

  test('a 31-byte base64 key is rejected naming the decoded length', () => {
    expectCode(() => parseEncryptionKey(randomBytes(31).toString('base64')), 'ENCRYPTION_KEY_INVALID', '31');
  });

  test('a 33-byte base64 key is rejected', () => {
    expectCode(() => parseEncryptionKey(randomBytes(33).toString('base64')), 'ENCRYPTION_KEY_INVALID', '33');
  });

  test('a 16-byte or 64-byte base64 key is rejected', () => {
    expectCode(() => parseEncryptionKey(randomBytes(16).toString('base64')), 'ENCRYPTION_KEY_INVALID');
    expectCode(() => parseEncryptionKey(randomBytes(64).toString('base64')), 'ENCRYPTION_KEY_INVALID');
  });

  test("a raw 32-character string containing '!' (not base64) is accepted as its raw bytes", () => {
    const raw = 'this-is-not-base64!-32-chars-ok!';
    assert.equal(raw.length, 32);
    assert.deepEqual(parseEncryptionKey(raw), Buffer.from(raw, 'utf8'));
  });

  test("a raw 32-character string containing '-' (base64url, not std base64) is accepted as its raw bytes", () => {
    const raw = 'abcdefghijklmnop-rstuvwxyz012345';
    assert.equal(raw.length, 32);
    assert.deepEqual(parseEncryptionKey(raw), Buffer.from(raw, 'utf8'));
  });

  test('a raw key parsed from text seals rows the independent implementation opens', () => {
    const raw = 'raw!key!raw!key!raw!key!raw!key!';
    const key = parseEncryptionKey(raw);
    const s = seal(Buffer.from('payload'), key);
    assert.equal(goOpen(Buffer.from(raw, 'utf8'), s.bytes).toString(), 'payload');
  });

  test('a 32-character string made only of base64 alphabet characters (decodes to 24 bytes) is rejected', () => {
    const text = 'abcdefghijklmnopqrstuvwxyzABCDEF';
    assert.equal(text.length, 32);
    assert.equal(Buffer.from(text, 'base64').length, 24);
    expectCode(() => parseEncryptionKey(text), 'ENCRYPTION_KEY_INVALID', '24');
  });

  test('other lengths of non-base64 text are rejected', () => {
    for (const text of ['short!', 'x'.repeat(30) + '!', 'y'.repeat(32) + '!', '!'.repeat(100)]) {
      assert.notEqual(text.length, 32);
      expectCode(() => parseEncryptionKey(text), 'ENCRYPTION_KEY_INVALID');
    }
  });

  test('an empty key is rejected', () => {
    expectCode(() => parseEncryptionKey(''), 'ENCRYPTION_KEY_INVALID');
  });

  test('unpadded base64 of 32 bytes (43 characters) is rejected like Go StdEncoding does', () => {
    const text = randomBytes(32).toString('base64').replace(/=+$/, '');
    assert.equal(text.length, 43);
    expectCode(() => parseEncryptionKey(text), 'ENCRYPTION_KEY_INVALID');
  });

  test('a rejected key never appears in the error message', () => {
    const text = randomBytes(31).toString('base64');
    try {
      parseEncryptionKey(text);
      assert.fail('expected a throw');
    } catch (err) {
      assert.ok(!(err as Error).message.includes(text));
    }
  });
});
