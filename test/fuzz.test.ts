import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { mergeRotation, parseCredential, validateSeed, type JsonObject, type ParsedCredential, type RotationResponse } from '../src/auth-json.js';
import { AuthJsonError } from '../src/errors.js';
import { at, leaves, prng } from './helpers/fuzz.js';

const SEED = 0x5eed_c0de;
const DOCUMENTS = 12_000;

const b64url = (s: string) => Buffer.from(s).toString('base64url');
const jwt = (payload: string) => `${b64url('{"alg":"HS256","typ":"JWT"}')}.${b64url(payload)}.${b64url('sig')}`;

function generator(rand: () => number) {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
  const int = (n: number) => Math.floor(rand() * n);
  const keys = ['tokens', 'access_token', 'refresh_token', 'id_token', 'account_id', 'last_refresh', 'auth_mode', 'OPENAI_API_KEY', 'x', '', 'ü∆', '😀', '__proto__', 'constructor', 'prototype', 'toString', '0'];
  const token = (): unknown =>
    pick<() => unknown>([
      () => jwt(JSON.stringify({ exp: 1_900_000_000 + int(1000), sub: `u${int(99)}` })),
      () => jwt(JSON.stringify({ exp: pick([1e13, -1, 4_102_444_801, '1900000000', null, 0, 4_102_444_800]), iat: pick([0, -5, 1e13, 'x', 1_700_000_000]) })),
      () => jwt('{}'),
      () => jwt('[1,2]'),
      () => jwt('null'),
      () => jwt('not json'),
      () => 'a.b.c',
      () => 'x.y',
      () => `${jwt('{"a":1}')}.extra`,
      () => '..',
      () => '',
      () => '   ',
      () => `rt_${int(1e6)}`,
      () => int(100),
      () => null,
      () => ['a.b.c'],
      () => ({ token: 'x' }),
    ])();
  const scalar = (): unknown => pick<() => unknown>([() => '', () => `s${int(1000)}`, () => 'ü∆😀\u0000\u2028', () => int(1e9) - 5e8, () => rand(), () => true, () => false, () => null, () => '2025-01-01T00:00:00Z', () => 'not a date'])();
  const value = (depth: number): unknown => {
    const r = rand();
    if (depth > 4 || r < 0.5) return scalar();
    if (r < 0.65) return Array.from({ length: int(4) }, () => value(depth + 1));
    if (r < 0.7) return token();
    return object(depth + 1);
  };
  const object = (depth: number): JsonObject => {
    const o: JsonObject = {};
    const n = int(6);
    for (let i = 0; i < n; i++) Object.defineProperty(o, pick(keys), { value: value(depth), enumerable: true, writable: true, configurable: true });
    return o;
  };
  /** A codex-like document, sometimes broken in one place. */
  const codexLike = (): JsonObject => {
    const tokens: JsonObject = {};
    const set = (k: string, v: unknown) => Object.defineProperty(tokens, k, { value: v, enumerable: true, writable: true, configurable: true });
    if (rand() < 0.9) set('id_token', rand() < 0.8 ? token() : jwt('{"email":"a@b"}'));
    if (rand() < 0.9) set('access_token', rand() < 0.8 ? jwt(JSON.stringify({ exp: 1_900_000_000 })) : token());
    if (rand() < 0.9) set('refresh_token', rand() < 0.8 ? `rt_${int(1e9)}` : token());
    if (rand() < 0.5) set('account_id', rand() < 0.8 ? `acct-${int(100)}` : scalar());
    for (const [k, v] of Object.entries(object(2))) if (rand() < 0.3) set(k, v);
    const doc = object(1);
    doc['tokens'] = rand() < 0.92 ? tokens : value(1);
    if (rand() < 0.5) doc['last_refresh'] = rand() < 0.8 ? new Date(1_700_000_000_000 + int(1e11)).toISOString() : scalar();
    if (rand() < 0.3) doc['OPENAI_API_KEY'] = null;
    return doc;
  };
  const flat = (): JsonObject => {
    const doc = object(1);
    for (const k of ['access_token', 'refresh_token', 'id_token', 'account_id']) if (rand() < 0.7) doc[k] = rand() < 0.7 ? token() : scalar();
    return doc;
  };
  return (): string => {
    const r = rand();
    if (r < 0.04) return pick(['', '{', 'null', '[]', '"str"', '12', '{"a":}', '{"tokens":{"refresh_token":"x"}', '{"tokens":', '\u0000', 'NaN', '{"a":1}}']);
    if (r < 0.08) return JSON.stringify(value(0));
    if (r < 0.1) return JSON.stringify(codexLike()).slice(0, 1 + int(200));
    const doc = r < 0.7 ? codexLike() : flat();
    let text = JSON.stringify(doc);
    if (rand() < 0.03) text = text.replace(/^\{/, '{"__proto__":{"p":1},');
    return text;
  };
}

const isObj = (v: unknown): v is JsonObject => typeof v === 'object' && v !== null && !Array.isArray(v);

function hasForbiddenKey(v: unknown): boolean {
  if (Array.isArray(v)) return v.some(hasForbiddenKey);
  if (!isObj(v)) return false;
  return Object.keys(v).some((k) => k === '__proto__' || k === 'constructor' || k === 'prototype' || hasForbiddenKey(v[k]));
}

/** What codex needs, written independently of the implementation: a three-part token with a JSON-object payload. */
function codexJwt(v: unknown): boolean {
  if (typeof v !== 'string') return false;
  const parts = v.split('.');
  if (parts.length !== 3) return false;
  try {
    return isObj(JSON.parse(Buffer.from(parts[1]!, 'base64url').toString('utf8')));
  } catch {
    return false;
  }
}

/** exp and iat, when present, are seconds from 1970 to 2100 (in both tokens). */
function timesInRange(token: unknown): boolean {
  const claims = JSON.parse(Buffer.from(String(token).split('.')[1]!, 'base64url').toString('utf8')) as JsonObject;
  return ['exp', 'iat'].every((c) => !Object.hasOwn(claims, c) || (typeof claims[c] === 'number' && (claims[c] as number) >= 0 && (claims[c] as number) <= 4_102_444_800));
}

function oracle(text: string): boolean {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {
    return false;
  }
  if (!isObj(doc) || hasForbiddenKey(doc)) return false;
  const t = doc['tokens'];
  if (!isObj(t)) return false;
  const rt = t['refresh_token'];
  if (typeof rt !== 'string' || rt.trim() === '') return false;
  if (!codexJwt(t['access_token']) || !codexJwt(t['id_token'])) return false;
  if (!timesInRange(t['access_token']) || !timesInRange(t['id_token'])) return false;
  const acct = t['account_id'];
  if (acct !== undefined && acct !== null && typeof acct !== 'string') return false;
  const lr = doc['last_refresh'];
  if (lr !== undefined && lr !== null && (typeof lr !== 'string' || !(Date.parse(lr) >= 0 && Date.parse(lr) <= 4_102_444_800_000))) return false;
  return true;
}

function onlyAuthJsonError<T>(fn: () => T, what: string): T | AuthJsonError {
  try {
    return fn();
  } catch (err) {
    assert.ok(err instanceof AuthJsonError, `${what} threw ${String(err)}`);
    assert.equal(err.code, 'AUTH_JSON_INVALID');
    return err;
  }
}

test(`fuzz: ${DOCUMENTS} seeded auth.json-like documents through parseCredential, validateSeed and mergeRotation`, () => {
  console.log(`fuzz seed 0x${SEED.toString(16)} (${DOCUMENTS} documents)`);
  const rand = prng(SEED);
  const gen = generator(rand);
  const now = new Date('2025-03-04T05:06:07.000Z');
  const tally = { parsed: 0, nested: 0, flat: 0, accepted: 0, rejected: 0, merged: 0, invalidJson: 0 };
  const started = performance.now();
  for (let i = 0; i < DOCUMENTS; i++) {
    const text = gen();
    const where = `document #${i} (seed 0x${SEED.toString(16)}): ${text.slice(0, 300)}`;

    // validateSeed: exactly the documents codex can use, from text and from a parsed body.
    const seeded = onlyAuthJsonError(() => validateSeed(text), `validateSeed(text) on ${where}`);
    const expected = oracle(text);
    assert.equal(!(seeded instanceof AuthJsonError), expected, `validateSeed accepted=${!(seeded instanceof AuthJsonError)} but codex ${expected ? 'can' : 'cannot'} use ${where}`);
    let body: unknown;
    try {
      body = JSON.parse(text);
    } catch {
      tally.invalidJson++;
    }
    if (body !== undefined) {
      const fromBody = onlyAuthJsonError(() => validateSeed(body), `validateSeed(body) on ${where}`);
      assert.equal(!(fromBody instanceof AuthJsonError), expected, `validateSeed(body) disagrees on ${where}`);
    }
    if (seeded instanceof AuthJsonError) {
      tally.rejected++;
      assert.ok(seeded.message.startsWith(seeded.field), `the message names the field: ${seeded.message}`);
    } else {
      tally.accepted++;
      const t = (JSON.parse(text) as { tokens: Record<string, string> }).tokens;
      assert.equal(seeded.shape, 'nested');
      assert.equal(seeded.tokens.refresh_token, t['refresh_token']);
      assert.equal(seeded.tokens.access_token, t['access_token']);
      assert.equal(seeded.tokens.id_token, t['id_token']);
    }

    // parseCredential + mergeRotation: lenient, and the merge never drops a field.
    const parsed = onlyAuthJsonError(() => parseCredential(text), `parseCredential on ${where}`);
    if (parsed instanceof AuthJsonError) continue;
    tally.parsed++;
    tally[parsed.shape]++;
    const answer: RotationResponse = {
      access_token: rand() < 0.8 ? jwt(`{"n":${i}}`) : '',
      refresh_token: rand() < 0.6 ? `rt_new_${i}` : rand() < 0.5 ? '' : undefined,
      id_token: rand() < 0.5 ? jwt(`{"i":${i}}`) : undefined,
    };
    const snapshot = JSON.stringify(parsed.doc);
    const merged = onlyAuthJsonError(() => mergeRotation(parsed as ParsedCredential, answer, now), `mergeRotation on ${where}`);
    assert.ok(!(merged instanceof AuthJsonError), `mergeRotation refused a parsed document: ${where}`);
    tally.merged++;
    assert.equal(JSON.stringify(parsed.doc), snapshot, `the input was mutated: ${where}`);
    const replaced = (['access_token', 'refresh_token', 'id_token'] as const)
      .filter((f) => typeof answer[f] === 'string' && answer[f] !== '')
      .map((f) => (parsed.shape === 'nested' ? ['tokens', f] : [f]));
    replaced.push(['last_refresh']);
    for (const leaf of leaves(parsed.doc)) {
      if (leaf.length === 0) continue;
      if (replaced.some((r) => r.every((k, j) => leaf[j] === k))) continue;
      const got = at(merged, leaf);
      assert.ok(got.found, `merge dropped ${JSON.stringify(leaf)}: ${where}`);
      assert.deepEqual(got.value, at(parsed.doc, leaf).value, `merge changed ${JSON.stringify(leaf)}: ${where}`);
    }
    assert.equal(merged['last_refresh'], now.toISOString());
    const target = (parsed.shape === 'nested' ? merged['tokens'] : merged) as JsonObject;
    for (const f of ['access_token', 'refresh_token', 'id_token'] as const) {
      const given = answer[f];
      if (typeof given === 'string' && given !== '') assert.equal(target[f], given, `${f} not replaced: ${where}`);
    }
    // The merged document reads back with the answer's tokens.
    const reread = parseCredential(JSON.stringify(merged));
    if (answer.access_token !== '') assert.equal(reread.tokens.access_token, answer.access_token, `merged document re-reads wrong: ${where}`);
  }
  const ms = Math.round(performance.now() - started);
  console.log(`fuzz ${JSON.stringify(tally)} in ${ms} ms`);
  // The generator must exercise every branch, not just the easy ones.
  assert.ok(tally.accepted > 200, `too few valid documents: ${JSON.stringify(tally)}`);
  assert.ok(tally.rejected > 2000, `too few invalid documents: ${JSON.stringify(tally)}`);
  assert.ok(tally.nested > 1000 && tally.flat > 1000, `both shapes: ${JSON.stringify(tally)}`);
  assert.ok(tally.invalidJson > 300, `invalid JSON text: ${JSON.stringify(tally)}`);
});
