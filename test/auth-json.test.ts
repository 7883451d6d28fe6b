import { strict as assert } from 'node:assert';
import { describe, test } from 'node:test';
import { accountInfo, mergeRotation, parseCredential, validateSeed, MAX_DOCUMENT_BYTES } from '../src/auth-json.js';
import type { JsonObject, ParsedCredential } from '../src/auth-json.js';
import { AuthJsonError } from '../src/errors.js';
import { at, leaves, prng } from './helpers/fuzz.js';

const AUTH_CLAIM = 'https://api.openai.com/auth';

function b64url(s: string): string {
  return Buffer.from(s).toString('base64url');
}

/** An unsigned-looking but well-formed compact JWT (the broker never verifies signatures). */
function jwt(payload: Record<string, unknown>): string {
  return `${b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))}.${b64url(JSON.stringify(payload))}.${b64url('signature')}`;
}

const NOW_SEC = 1_760_000_000;
const ACCESS = jwt({ iat: NOW_SEC, exp: NOW_SEC + 864_000, [AUTH_CLAIM]: { chatgpt_account_id: 'acct-1' } });
const ID = jwt({
  email: 'fleet@example.com',
  iat: NOW_SEC,
  exp: NOW_SEC + 3600,
  [AUTH_CLAIM]: { chatgpt_account_id: 'acct-1', chatgpt_plan_type: 'pro', chatgpt_user_id: 'user-1' },
});

function codexAuthJson(overrides: { tokens?: Record<string, unknown>; top?: Record<string, unknown> } = {}): JsonObject {
  return {
    OPENAI_API_KEY: null,
    tokens: { id_token: ID, access_token: ACCESS, refresh_token: 'rt_old', account_id: 'acct-1', ...overrides.tokens },
    last_refresh: '2025-01-01T00:00:00.000Z',
    ...overrides.top,
  };
}

function expectAuthJsonError(fn: () => unknown, field: string): AuthJsonError {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof AuthJsonError, `expected an AuthJsonError, got ${String(caught)}`);
  assert.equal(caught.field, field);
  assert.equal(caught.code, 'AUTH_JSON_INVALID');
  assert.ok(caught.message.startsWith(field), caught.message);
  return caught;
}

describe('auth-json: parseCredential (the original refresher reading)', () => {
  test('a nested {"tokens":{...}} document is read as nested', () => {
    const p = parseCredential(JSON.stringify(codexAuthJson()));
    assert.equal(p.shape, 'nested');
    assert.deepEqual(p.tokens, { access_token: ACCESS, refresh_token: 'rt_old', id_token: ID, account_id: 'acct-1' });
  });

  test('a flat document with top-level token fields is read as flat', () => {
    const p = parseCredential(JSON.stringify({ access_token: ACCESS, refresh_token: 'rt_flat', id_token: ID, account_id: 'a', other: 1 }));
    assert.equal(p.shape, 'flat');
    assert.equal(p.tokens.refresh_token, 'rt_flat');
    assert.equal(p.tokens.access_token, ACCESS);
    assert.equal(p.doc['other'], 1);
  });

  test('a "tokens" object without access or refresh token falls back to the flat fields', () => {
    const p = parseCredential(JSON.stringify({ tokens: { id_token: ID }, refresh_token: 'rt_top' }));
    assert.equal(p.shape, 'flat');
    assert.equal(p.tokens.refresh_token, 'rt_top');
  });

  test('a "tokens" value that is not an object falls back to the flat fields', () => {
    for (const tokens of ['str', 5, null, ['a']]) {
      const p = parseCredential(JSON.stringify({ tokens, refresh_token: 'rt_top' }));
      assert.equal(p.shape, 'flat');
      assert.equal(p.tokens.refresh_token, 'rt_top');
    }
  });

  test('an unparseable blob is an AuthJsonError naming the document', () => {
    expectAuthJsonError(() => parseCredential('{not json'), 'document');
    expectAuthJsonError(() => parseCredential(''), 'document');
  });

  test('JSON that is not an object (array, string, null, number) is an AuthJsonError', () => {
    for (const blob of ['[]', '"x"', 'null', '42']) expectAuthJsonError(() => parseCredential(blob), 'document');
  });

  test('a document with no refresh token parses but carries no refresh_token (the refresher skips it)', () => {
    const nested = parseCredential(JSON.stringify({ tokens: { access_token: ACCESS } }));
    assert.equal(nested.shape, 'nested');
    assert.equal(nested.tokens.refresh_token, undefined);
    const flat = parseCredential(JSON.stringify({ something: 'else' }));
    assert.equal(flat.tokens.refresh_token, undefined);
  });

  test('empty-string and non-string token fields are ignored', () => {
    const p = parseCredential(JSON.stringify({ tokens: { access_token: ACCESS, refresh_token: '', id_token: 7, account_id: null } }));
    assert.deepEqual(p.tokens, { access_token: ACCESS });
  });
});

describe('auth-json: mergeRotation', () => {
  const NOW = new Date('2025-06-01T12:34:56.789Z');

  test('merge preserves other fields and never clobbers with an empty value', () => {
    const stored = codexAuthJson({ top: { auth_mode: 'chatgpt', future_field: { nested: [1, 2, 3] } }, tokens: { extra_token_field: 'kept' } });
    const parsed = parseCredential(JSON.stringify(stored));
    const merged = mergeRotation(parsed, { access_token: 'new.access.jwt', refresh_token: '', id_token: undefined }, NOW);
    const tokens = merged['tokens'] as JsonObject;
    assert.equal(tokens['access_token'], 'new.access.jwt');
    assert.equal(tokens['refresh_token'], 'rt_old', 'an empty refresh_token keeps the stored one');
    assert.equal(tokens['id_token'], ID, 'a missing id_token keeps the stored one');
    assert.equal(tokens['account_id'], 'acct-1');
    assert.equal(tokens['extra_token_field'], 'kept');
    assert.equal(merged['auth_mode'], 'chatgpt');
    assert.deepEqual(merged['future_field'], { nested: [1, 2, 3] });
    assert.equal(merged['OPENAI_API_KEY'], null);
    assert.ok('OPENAI_API_KEY' in merged);
  });

  test('a nested document stays nested: the answer lands under "tokens", nothing is added at top level', () => {
    const parsed = parseCredential(JSON.stringify(codexAuthJson()));
    const merged = mergeRotation(parsed, { access_token: 'a.b.c', refresh_token: 'rt_new', id_token: 'i.d.t' }, NOW);
    assert.deepEqual(merged['tokens'], { id_token: 'i.d.t', access_token: 'a.b.c', refresh_token: 'rt_new', account_id: 'acct-1' });
    assert.deepEqual(Object.keys(merged).sort(), ['OPENAI_API_KEY', 'last_refresh', 'tokens']);
  });

  test('a flat document stays flat: the answer lands at top level, no "tokens" object appears', () => {
    const stored = { access_token: ACCESS, refresh_token: 'rt_old', id_token: ID, account_id: 'a', auth_mode: 'chatgpt', x: [1] };
    const parsed = parseCredential(JSON.stringify(stored));
    const merged = mergeRotation(parsed, { access_token: 'a.b.c', refresh_token: 'rt_new', id_token: '' }, NOW);
    assert.equal(merged['tokens'], undefined);
    assert.equal(merged['access_token'], 'a.b.c');
    assert.equal(merged['refresh_token'], 'rt_new');
    assert.equal(merged['id_token'], ID, 'an empty id_token keeps the stored one');
    assert.equal(merged['account_id'], 'a');
    assert.equal(merged['auth_mode'], 'chatgpt');
    assert.deepEqual(merged['x'], [1]);
  });

  test('last_refresh is set to the given now in RFC 3339 UTC', () => {
    const parsed = parseCredential(JSON.stringify(codexAuthJson()));
    const merged = mergeRotation(parsed, { access_token: 'a.b.c' }, NOW);
    assert.equal(merged['last_refresh'], '2025-06-01T12:34:56.789Z');
    assert.match(merged['last_refresh'] as string, /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/);
  });

  test('last_refresh is added when the stored document had none (flat shape too)', () => {
    const parsed = parseCredential(JSON.stringify({ refresh_token: 'rt', access_token: 'x.y.z' }));
    const merged = mergeRotation(parsed, { access_token: 'a.b.c' }, NOW);
    assert.equal(merged['last_refresh'], NOW.toISOString());
  });

  test('the input document is not mutated', () => {
    const stored = codexAuthJson({ top: { auth_mode: 'chatgpt' } });
    const blob = JSON.stringify(stored);
    const parsed = parseCredential(blob);
    const before = JSON.stringify(parsed.doc);
    const merged = mergeRotation(parsed, { access_token: 'a.b.c', refresh_token: 'rt_new', id_token: 'i.d.t' }, NOW);
    assert.equal(JSON.stringify(parsed.doc), before);
    assert.notEqual(merged, parsed.doc);
    assert.notEqual(merged['tokens'], parsed.doc['tokens']);
  });

  test('non-string answer fields are ignored (the stored token stays)', () => {
    const parsed = parseCredential(JSON.stringify(codexAuthJson()));
    const answer = { access_token: 'a.b.c', refresh_token: 42, id_token: null } as unknown as Parameters<typeof mergeRotation>[1];
    const merged = mergeRotation(parsed, answer, NOW);
    assert.equal((merged['tokens'] as JsonObject)['refresh_token'], 'rt_old');
    assert.equal((merged['tokens'] as JsonObject)['id_token'], ID);
  });

  test('the merged document parses back with the rotated tokens', () => {
    const parsed = parseCredential(JSON.stringify(codexAuthJson()));
    const merged = mergeRotation(parsed, { access_token: 'a.b.c', refresh_token: 'rt_new' }, NOW);
    const again = parseCredential(JSON.stringify(merged));
    assert.equal(again.shape, 'nested');
    assert.equal(again.tokens.refresh_token, 'rt_new');
    assert.equal(again.tokens.access_token, 'a.b.c');
  });
});

describe('auth-json: validateSeed', () => {
  test('accepts a good codex auth.json (string or object) and reports it nested', () => {
    const doc = codexAuthJson();
    for (const input of [JSON.stringify(doc), doc]) {
      const p = validateSeed(input);
      assert.equal(p.shape, 'nested');
      assert.equal(p.tokens.refresh_token, 'rt_old');
      assert.equal(p.tokens.access_token, ACCESS);
      assert.equal(p.tokens.id_token, ID);
      assert.equal(p.tokens.account_id, 'acct-1');
    }
  });

  test('accepts a file with auth_mode, unknown fields, null last_refresh and no account_id', () => {
    const doc = codexAuthJson({ top: { auth_mode: 'chatgpt', newer: { a: 1 }, last_refresh: null } });
    delete (doc['tokens'] as JsonObject)['account_id'];
    assert.equal(validateSeed(JSON.stringify(doc)).shape, 'nested');
  });

  test('rejects non-JSON naming the document', () => {
    expectAuthJsonError(() => validateSeed('{"tokens": '), 'document');
  });

  test('rejects an array (and other non-objects) naming the document', () => {
    expectAuthJsonError(() => validateSeed('[]'), 'document');
    expectAuthJsonError(() => validateSeed([codexAuthJson()]), 'document');
    expectAuthJsonError(() => validateSeed('null'), 'document');
    expectAuthJsonError(() => validateSeed(null), 'document');
    expectAuthJsonError(() => validateSeed(42), 'document');
  });

  test('rejects a document without tokens naming tokens', () => {
    expectAuthJsonError(() => validateSeed(JSON.stringify({ OPENAI_API_KEY: null })), 'tokens');
    expectAuthJsonError(() => validateSeed(JSON.stringify({ tokens: 'x' })), 'tokens');
    expectAuthJsonError(() => validateSeed(JSON.stringify({ tokens: [] })), 'tokens');
    // A flat document is what the refresher can read, but codex needs the nested shape.
    expectAuthJsonError(() => validateSeed(JSON.stringify({ access_token: ACCESS, refresh_token: 'rt', id_token: ID })), 'tokens');
  });

  test('rejects a missing, empty, blank or non-string refresh_token naming tokens.refresh_token', () => {
    const missing = codexAuthJson();
    delete (missing['tokens'] as JsonObject)['refresh_token'];
    expectAuthJsonError(() => validateSeed(JSON.stringify(missing)), 'tokens.refresh_token');
    for (const rt of ['', '   ', 123, null, { a: 1 }]) {
      expectAuthJsonError(() => validateSeed(JSON.stringify(codexAuthJson({ tokens: { refresh_token: rt } }))), 'tokens.refresh_token');
    }
  });

  test('rejects an access token that is not a three-part JWT naming tokens.access_token', () => {
    for (const at of ['opaque-token', 'a.b', 'a.b.c.d', jwt({}).split('.').slice(0, 2).join('.'), 5, undefined]) {
      expectAuthJsonError(() => validateSeed(JSON.stringify(codexAuthJson({ tokens: { access_token: at } }))), 'tokens.access_token');
    }
  });

  test('rejects an access token whose payload is not JSON naming tokens.access_token', () => {
    const bad = `${b64url('{"alg":"none"}')}.${b64url('not json')}.sig`;
    expectAuthJsonError(() => validateSeed(JSON.stringify(codexAuthJson({ tokens: { access_token: bad } }))), 'tokens.access_token');
  });

  test('rejects an id_token that codex could not parse naming tokens.id_token', () => {
    const notJson = `${b64url('{"alg":"none"}')}.${b64url('{{{')}.sig`;
    const arrayPayload = `${b64url('{"alg":"none"}')}.${b64url('[1,2]')}.sig`;
    for (const id of ['not-a-jwt', 'a.b', notJson, arrayPayload, '', 7]) {
      expectAuthJsonError(() => validateSeed(JSON.stringify(codexAuthJson({ tokens: { id_token: id } }))), 'tokens.id_token');
    }
    const missing = codexAuthJson();
    delete (missing['tokens'] as JsonObject)['id_token'];
    expectAuthJsonError(() => validateSeed(JSON.stringify(missing)), 'tokens.id_token');
  });

  test('rejects a non-string account_id naming tokens.account_id', () => {
    expectAuthJsonError(() => validateSeed(JSON.stringify(codexAuthJson({ tokens: { account_id: 5 } }))), 'tokens.account_id');
  });

  test('rejects a last_refresh that is not a timestamp naming last_refresh', () => {
    expectAuthJsonError(() => validateSeed(JSON.stringify(codexAuthJson({ top: { last_refresh: 'yesterday-ish' } }))), 'last_refresh');
    expectAuthJsonError(() => validateSeed(JSON.stringify(codexAuthJson({ top: { last_refresh: 12 } }))), 'last_refresh');
  });

  test('rejects an exp or iat outside 1970..2100 (or not a number) in either token, naming the claim', () => {
    for (const bad of [1e13, -1, 4_102_444_801, '1900000000', null, true, [1], { n: 1 }]) {
      for (const claim of ['exp', 'iat']) {
        const payload = { iat: NOW_SEC, exp: NOW_SEC + 3600, [claim]: bad };
        expectAuthJsonError(() => validateSeed(codexAuthJson({ tokens: { access_token: jwt(payload) } })), `tokens.access_token.${claim}`);
        expectAuthJsonError(() => validateSeed(codexAuthJson({ tokens: { id_token: jwt(payload) } })), `tokens.id_token.${claim}`);
      }
    }
    expectAuthJsonError(() => validateSeed(codexAuthJson({ top: { last_refresh: '2100-01-01T00:00:01Z' } })), 'last_refresh');
    expectAuthJsonError(() => validateSeed(codexAuthJson({ top: { last_refresh: '1969-12-31T23:59:59Z' } })), 'last_refresh');
  });

  test('accepts exp and iat at the edges of the range, and a token with neither', () => {
    for (const payload of [{ exp: 4_102_444_800, iat: 0 }, { exp: 0 }, {}, { exp: NOW_SEC + 0.5 }]) {
      assert.equal(validateSeed(codexAuthJson({ tokens: { access_token: jwt(payload), id_token: jwt(payload) } })).tokens.access_token, jwt(payload));
    }
  });

  test('rejects a document over 1 MiB naming the document', () => {
    const doc = codexAuthJson({ top: { padding: 'x'.repeat(MAX_DOCUMENT_BYTES) } });
    const text = JSON.stringify(doc);
    assert.ok(Buffer.byteLength(text) > 1024 * 1024);
    expectAuthJsonError(() => validateSeed(text), 'document');
  });

  test('a document just under 1 MiB is accepted', () => {
    const base = JSON.stringify(codexAuthJson({ top: { padding: '' } }));
    const text = JSON.stringify(codexAuthJson({ top: { padding: 'x'.repeat(MAX_DOCUMENT_BYTES - Buffer.byteLength(base)) } }));
    assert.equal(Buffer.byteLength(text), MAX_DOCUMENT_BYTES);
    assert.equal(validateSeed(text).shape, 'nested');
  });

  test('rejects a "__proto__" key anywhere in the document', () => {
    const good = JSON.stringify(codexAuthJson());
    const topLevel = good.replace(/^\{/, '{"__proto__":{"polluted":true},');
    const nested = good.replace('"tokens":{', '"tokens":{"__proto__":{"polluted":true},');
    const inArray = good.replace(/^\{/, '{"list":[{"__proto__":{}}],');
    for (const text of [topLevel, nested, inArray]) {
      assert.ok(text.includes('"__proto__"'));
      expectAuthJsonError(() => validateSeed(text), 'document');
    }
    assert.equal(({} as Record<string, unknown>)['polluted'], undefined, 'Object.prototype is untouched');
  });

  test('rejects "constructor" and "prototype" keys', () => {
    expectAuthJsonError(() => validateSeed(JSON.stringify(codexAuthJson({ top: { constructor: { prototype: {} } } }))), 'document');
    expectAuthJsonError(() => validateSeed(JSON.stringify(codexAuthJson({ top: { x: { prototype: 1 } } }))), 'document');
  });

  test('an error message never contains the refresh token', () => {
    const secret = 'rt_super_secret_value';
    const err = expectAuthJsonError(() => validateSeed(JSON.stringify(codexAuthJson({ tokens: { refresh_token: secret, access_token: 'nope' } }))), 'tokens.access_token');
    assert.ok(!err.message.includes(secret));
  });
});

describe('auth-json: accountInfo', () => {
  test('reads chatgpt_account_id, chatgpt_plan_type and email from the id_token claims', () => {
    const id = jwt({ email: 'ops@example.com', [AUTH_CLAIM]: { chatgpt_account_id: 'acct-from-claims', chatgpt_plan_type: 'team' } });
    assert.deepEqual(accountInfo({ id_token: id }), { accountId: 'acct-from-claims', planType: 'team', email: 'ops@example.com' });
  });

  test('the stored tokens.account_id wins over the claim', () => {
    assert.equal(accountInfo({ id_token: ID, account_id: 'stored-acct' }).accountId, 'stored-acct');
    assert.equal(accountInfo({ id_token: ID }).accountId, 'acct-1');
  });

  test('no id_token, an unparseable id_token or missing claims give undefined fields, never a throw', () => {
    const none = { accountId: undefined, planType: undefined, email: undefined };
    assert.deepEqual(accountInfo({}), none);
    assert.deepEqual(accountInfo({ id_token: 'garbage' }), none);
    assert.deepEqual(accountInfo({ id_token: jwt({ sub: 'x' }) }), none);
    assert.deepEqual(accountInfo({ id_token: jwt({ [AUTH_CLAIM]: 'not an object' }) }), none);
  });

  test('non-string claim values are ignored', () => {
    const id = jwt({ email: 5, [AUTH_CLAIM]: { chatgpt_account_id: 1, chatgpt_plan_type: ['pro'] } });
    assert.deepEqual(accountInfo({ id_token: id }), { accountId: undefined, planType: undefined, email: undefined });
  });
});

// ------------------------------------------------------------------ fuzz-ish

function gen(rand: () => number): string {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
  const keys = ['tokens', 'access_token', 'refresh_token', 'id_token', 'account_id', 'last_refresh', 'auth_mode', 'OPENAI_API_KEY', 'x', 'y', ''];
  const scalar = (): unknown => pick<unknown>(['', 'rt_abc', 'a.b.c', ACCESS, 0, -1, 3.5, true, false, null, 'ü∆😀', '__proto__']);
  const value = (depth: number): unknown => {
    const r = rand();
    if (depth > 3 || r < 0.55) return scalar();
    if (r < 0.7) return Array.from({ length: Math.floor(rand() * 3) }, () => value(depth + 1));
    return object(depth + 1);
  };
  const object = (depth: number): Record<string, unknown> => {
    const o: Record<string, unknown> = {};
    const n = Math.floor(rand() * 6);
    for (let i = 0; i < n; i++) o[pick(keys)] = value(depth);
    return o;
  };
  const r = rand();
  if (r < 0.05) return pick(['', '{', 'null', '[]', '"str"', '12', '{"a":}', '{"tokens":{"refresh_token":"x"}']);
  if (r < 0.1) return JSON.stringify(value(0));
  const doc = object(0);
  if (rand() < 0.5) {
    const tokens = object(1);
    if (rand() < 0.6) tokens['refresh_token'] = scalar();
    if (rand() < 0.5) tokens['access_token'] = scalar();
    doc['tokens'] = rand() < 0.85 ? tokens : value(1);
  }
  let text = JSON.stringify(doc);
  if (rand() < 0.05) text = text.replace(/^\{/, '{"__proto__":{"p":1},');
  return text;
}

describe('auth-json: seeded fuzz of parseCredential + mergeRotation', () => {
  test('2,000 generated documents: only AuthJsonError is ever thrown and a merge never drops a field', () => {
    const rand = prng(0xc0dec5);
    const now = new Date('2025-03-04T05:06:07.000Z');
    let parsedCount = 0;
    const shapes = { nested: 0, flat: 0 };
    let withProto = 0;
    for (let i = 0; i < 2000; i++) {
      const text = gen(rand);
      let parsed: ParsedCredential;
      try {
        parsed = parseCredential(text);
      } catch (err) {
        assert.ok(err instanceof AuthJsonError, `document #${i} ${text} threw ${String(err)}`);
        continue;
      }
      parsedCount++;
      shapes[parsed.shape]++;
      if (Object.hasOwn(parsed.doc, '__proto__')) withProto++;
      const answer = {
        access_token: rand() < 0.5 ? 'n.e.w' : '',
        refresh_token: rand() < 0.5 ? 'rt_new' : rand() < 0.5 ? '' : undefined,
        id_token: rand() < 0.5 ? 'i.d.t' : undefined,
      };
      const before = JSON.stringify(parsed.doc);
      const merged = mergeRotation(parsed, answer, now);
      assert.equal(JSON.stringify(parsed.doc), before, `document #${i} was mutated`);
      // Fields the answer legitimately replaces: the non-empty token fields, in the document's shape, and last_refresh.
      const replaced = (['access_token', 'refresh_token', 'id_token'] as const)
        .filter((f) => typeof answer[f] === 'string' && answer[f] !== '')
        .map((f) => (parsed.shape === 'nested' ? ['tokens', f] : [f]));
      replaced.push(['last_refresh']);
      for (const leaf of leaves(parsed.doc)) {
        if (leaf.length === 0) continue; // the empty document itself: the merge adds to it
        if (replaced.some((r) => r.every((k, j) => leaf[j] === k))) continue;
        const got = at(merged, leaf);
        assert.ok(got.found, `document #${i}: merge dropped ${JSON.stringify(leaf)} from ${text}`);
        assert.deepEqual(got.value, at(parsed.doc, leaf).value, `document #${i}: merge changed ${JSON.stringify(leaf)} in ${text}`);
      }
      assert.equal(merged['last_refresh'], now.toISOString());
      const target = (parsed.shape === 'nested' ? merged['tokens'] : merged) as JsonObject;
      const stored = (parsed.shape === 'nested' ? parsed.doc['tokens'] : parsed.doc) as JsonObject;
      for (const f of ['access_token', 'refresh_token', 'id_token'] as const) {
        const given = answer[f];
        if (typeof given === 'string' && given !== '') assert.equal(target[f], given);
        else assert.deepEqual(target[f], stored[f], `document #${i}: ${f} clobbered`);
      }
    }
    assert.ok(parsedCount > 1500, `the generator should mostly produce objects (parsed ${parsedCount})`);
    assert.ok(shapes.nested > 100 && shapes.flat > 100, `both shapes should be exercised: ${JSON.stringify(shapes)}`);
    assert.ok(withProto > 20, `own "__proto__" keys should be exercised (${withProto})`);
  });
});
