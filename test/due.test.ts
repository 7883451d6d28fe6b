import { strict as assert } from 'node:assert';
import { describe, test } from 'node:test';
import { SignJWT } from 'jose';
import { accessClaims, isDue, isExpired, refreshLeadSeconds } from '../src/due.js';

const DAY = 86_400;
const HOUR = 3_600;
const MARGIN = DAY; // the default REFRESH_MARGIN_SECONDS
const T0 = 1_760_000_000; // an iat, in seconds

/** A compact JWT built by hand: base64url(header).base64url(payload).signature. */
function handJwt(payload: Record<string, unknown>): string {
  const enc = (v: unknown) => Buffer.from(JSON.stringify(v)).toString('base64url');
  return `${enc({ alg: 'RS256', typ: 'JWT' })}.${enc(payload)}.${Buffer.from('not-a-real-signature').toString('base64url')}`;
}

const atSec = (sec: number): number => sec * 1000;

describe('due: accessClaims (decoded WITHOUT verifying the signature)', () => {
  test('reads exp and iat from a jose-signed JWT whatever key signed it', async () => {
    const token = await new SignJWT({ sub: 'u' })
      .setProtectedHeader({ alg: 'HS256' })
      .setIssuedAt(T0)
      .setExpirationTime(T0 + 10 * DAY)
      .sign(new TextEncoder().encode('a key the broker never sees, 32+ bytes long'));
    assert.deepEqual(accessClaims(token), { exp: T0 + 10 * DAY, iat: T0 });
  });

  test('reads exp and iat from a hand-made JWT with a bogus signature', () => {
    assert.deepEqual(accessClaims(handJwt({ iat: T0, exp: T0 + 100 })), { exp: T0 + 100, iat: T0 });
  });

  test('no token, garbage, a two-part token or a non-JSON payload give no claims', () => {
    const none = { exp: undefined, iat: undefined };
    assert.deepEqual(accessClaims(undefined), none);
    assert.deepEqual(accessClaims(''), none);
    assert.deepEqual(accessClaims('opaque-access-token'), none);
    assert.deepEqual(accessClaims('a.b'), none);
    assert.deepEqual(accessClaims(`${Buffer.from('{}').toString('base64url')}.${Buffer.from('nope').toString('base64url')}.x`), none);
  });

  test('an exp or iat outside 1970..2100 is unreadable, like a missing one', () => {
    const none = { exp: undefined, iat: undefined };
    for (const v of [1e13, -1, 4_102_444_801, Number.MAX_VALUE, 1e308]) assert.deepEqual(accessClaims(handJwt({ exp: v, iat: v })), none, String(v));
    assert.deepEqual(accessClaims(handJwt({ exp: 4_102_444_800, iat: 0 })), { exp: 4_102_444_800, iat: 0 });
  });

  test('a non-numeric exp or iat is unreadable', () => {
    assert.deepEqual(accessClaims(handJwt({ exp: String(T0), iat: 'yesterday' })), { exp: undefined, iat: undefined });
    assert.deepEqual(accessClaims(handJwt({ iat: T0 })), { exp: undefined, iat: T0 });
  });
});

describe('due: isDue', () => {
  test('skip when fresh: a new 10-day token is not due', () => {
    const claims = accessClaims(handJwt({ iat: T0, exp: T0 + 10 * DAY }));
    assert.equal(isDue(claims, atSec(T0), MARGIN), false);
    assert.equal(isDue(claims, atSec(T0 + 5 * DAY), MARGIN), false);
  });

  test('no readable exp means due (the original refresher rule)', () => {
    assert.equal(isDue(accessClaims('opaque'), atSec(T0), MARGIN), true);
    assert.equal(isDue(accessClaims(undefined), atSec(T0), MARGIN), true);
    assert.equal(isDue(accessClaims(handJwt({ iat: T0 })), atSec(T0), MARGIN), true);
    assert.equal(isDue({ exp: undefined, iat: T0 }, 0, MARGIN), true);
  });

  test('a 10-day token with a 1-day margin is due at exactly < 1 day remaining', () => {
    const claims = { iat: T0, exp: T0 + 10 * DAY };
    assert.equal(refreshLeadSeconds(claims, MARGIN), DAY);
    assert.equal(isDue(claims, atSec(claims.exp - DAY), MARGIN), false, 'exactly 1 day left: not yet');
    assert.equal(isDue(claims, atSec(claims.exp - DAY) - 1, MARGIN), false, '1 day + 1 ms left: not yet');
    assert.equal(isDue(claims, atSec(claims.exp - DAY) + 1, MARGIN), true, '1 ms under 1 day left: due');
    assert.equal(isDue(claims, atSec(claims.exp - HOUR), MARGIN), true);
  });

  test('a 2-hour token with a 1-day margin is due at < 1 hour remaining (half its lifetime), not at once', () => {
    const claims = { iat: T0, exp: T0 + 2 * HOUR };
    assert.equal(refreshLeadSeconds(claims, MARGIN), HOUR);
    assert.equal(isDue(claims, atSec(T0), MARGIN), false, 'a fresh short-lived token is not refreshed on every check');
    assert.equal(isDue(claims, atSec(claims.exp - HOUR), MARGIN), false, 'exactly 1 hour left: not yet');
    assert.equal(isDue(claims, atSec(claims.exp - HOUR) + 1, MARGIN), true, 'just under 1 hour left: due');
  });

  test('with no iat the margin alone decides: a 2-hour token is due at once with a 1-day margin', () => {
    const claims = { iat: undefined, exp: T0 + 2 * HOUR };
    assert.equal(refreshLeadSeconds(claims, MARGIN), MARGIN);
    assert.equal(isDue(claims, atSec(T0), MARGIN), true);
    const tenDays = { iat: undefined, exp: T0 + 10 * DAY };
    assert.equal(isDue(tenDays, atSec(tenDays.exp - DAY), MARGIN), false);
    assert.equal(isDue(tenDays, atSec(tenDays.exp - DAY) + 1, MARGIN), true);
  });

  test('an iat not before exp is ignored: the margin alone decides', () => {
    assert.equal(refreshLeadSeconds({ iat: T0, exp: T0 }, MARGIN), MARGIN);
    assert.equal(refreshLeadSeconds({ iat: T0 + 10, exp: T0 }, MARGIN), MARGIN);
  });

  test('the lead is min(margin, lifetime / 2) for several margins and lifetimes', () => {
    const cases: Array<[lifetime: number, margin: number, lead: number]> = [
      [10 * DAY, DAY, DAY],
      [10 * DAY, 15 * 60, 15 * 60],
      [2 * HOUR, DAY, HOUR],
      [DAY, DAY, DAY / 2],
      [3, DAY, 1.5],
    ];
    for (const [lifetime, margin, lead] of cases) {
      assert.equal(refreshLeadSeconds({ iat: T0, exp: T0 + lifetime }, margin), lead, `lifetime ${lifetime}, margin ${margin}`);
    }
  });

  test('an expired token is due', () => {
    const claims = { iat: T0, exp: T0 + 10 * DAY };
    assert.equal(isDue(claims, atSec(claims.exp), MARGIN), true);
    assert.equal(isDue(claims, atSec(claims.exp + DAY), MARGIN), true);
  });

  test('a token from the jose SignJWT path follows the same rule end to end', async () => {
    const token = await new SignJWT({})
      .setProtectedHeader({ alg: 'HS256' })
      .setIssuedAt(T0)
      .setExpirationTime(T0 + 10 * DAY)
      .sign(new TextEncoder().encode('0123456789abcdef0123456789abcdef'));
    const claims = accessClaims(token);
    assert.equal(isDue(claims, atSec(T0 + 8 * DAY), MARGIN), false);
    assert.equal(isDue(claims, atSec(T0 + 9 * DAY) + 1, MARGIN), true);
  });
});

describe('due: isExpired', () => {
  const claims = { iat: T0, exp: T0 + 10 * DAY };

  test('a token before its exp is not expired', () => {
    assert.equal(isExpired(claims, atSec(T0)), false);
    assert.equal(isExpired(claims, atSec(claims.exp) - 1), false);
  });

  test('a token at or after its exp is expired', () => {
    assert.equal(isExpired(claims, atSec(claims.exp)), true);
    assert.equal(isExpired(claims, atSec(claims.exp) + 1), true);
  });

  test('no readable exp is not expired (served, as codex uses it; isDue rotates it at once)', () => {
    assert.equal(isExpired({ exp: undefined, iat: undefined }, atSec(T0)), false);
    assert.equal(isExpired(accessClaims('opaque'), atSec(T0)), false);
    assert.equal(isDue(accessClaims('opaque'), atSec(T0), MARGIN), true);
  });
});
