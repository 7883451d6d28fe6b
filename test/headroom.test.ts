/**
 * How full a login counts for pool moves (src/usage/headroom.ts), on the figures a hostile,
 * partial or old /wham/usage answer leaves behind: pure functions, no database.
 */
import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { exhaustedPools, fullestPercentAt, headroom, isFull } from '../src/usage/headroom.js';
import type { UsageSnapshot } from '../src/usage/parse.js';

const NOW = 1_800_000_000_000;
const snap = (primary: [number | null, number | null] | null, secondary: [number | null, number | null] | null = null): UsageSnapshot => ({
  planType: 'plus',
  allowed: true,
  limitReached: false,
  primary: primary && { usedPercent: primary[0], windowSeconds: 18_000, resetAt: primary[1] },
  secondary: secondary && { usedPercent: secondary[0], windowSeconds: 604_800, resetAt: secondary[1] },
});

test('no snapshot, no windows, or windows without a used percent: never full, no figures', () => {
  for (const s of [undefined, null, snap(null), snap([null, 1_900_000_000], [null, null])]) {
    const h = headroom(s, 90);
    assert.equal(isFull(h, NOW), false);
    assert.equal(fullestPercentAt(h, NOW), null);
  }
  assert.equal(isFull(undefined, NOW), false);
});

test('either window at or over the threshold makes the login full until that window resets', () => {
  const h = headroom(snap([40, 1_800_000_100], [90, 1_800_000_500]), 90);
  assert.equal(h.fullUntilMs, 1_800_000_500_000);
  assert.equal(isFull(h, NOW), true);
  assert.equal(isFull(h, 1_800_000_500_000), false, 'the weekly window has reset: no longer full, before any new poll');
  assert.equal(isFull(headroom(snap([89.9, 1_800_000_100]), 90), NOW), false);
});

test('a full window whose reset the backend did not give stays full (until new figures say otherwise)', () => {
  const h = headroom(snap([95, null]), 90);
  assert.equal(h.fullUntilMs, Infinity);
  assert.equal(isFull(h, Number.MAX_SAFE_INTEGER), true);
});

test('the fullest window counts only while it has not reset (ties go to the most headroom)', () => {
  const h = headroom(snap([70, 1_799_999_000], [20, 1_800_000_900]), 90);
  assert.equal(fullestPercentAt(h, NOW), 20, 'the 5-hour window reset already');
  assert.equal(fullestPercentAt(h, 1_799_998_000_000), 70);
});

test('a pool is exhausted only when every credential of it is full; one without figures keeps it open', () => {
  const full = headroom(snap([95, 1_900_000_000]), 90);
  const roomy = headroom(snap([10, 1_900_000_000]), 90);
  assert.deepEqual(
    exhaustedPools(
      [
        { pool: 'b', headroom: full },
        { pool: 'b', headroom: full },
        { pool: 'a', headroom: full },
        { pool: 'a', headroom: roomy },
        { pool: 'c', headroom: full },
        { pool: 'c', headroom: undefined },
      ],
      NOW,
    ),
    ['b'],
  );
});
