import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { WALL_CLOCK_WINDOW_MS, wallClock } from '../src/lib/time.js';

/** A wall clock and a monotonic clock the test moves by hand. */
function clocks(wall: number, perf: number) {
  const c = {
    wall,
    perf,
    wallReads: 0,
    readWall: () => {
      c.wallReads++;
      return c.wall;
    },
    readPerf: () => c.perf,
    /** Both clocks move on together (ms). */
    advance: (ms: number) => {
      c.wall += ms;
      c.perf += ms;
    },
  };
  return c;
}

test("wallClock: the wall time at a monotonic reading, Date.now() read once per window and the monotonic clock's progress added in between", () => {
  const c = clocks(1_700_000_000_000, 5_000.25);
  const at = wallClock(c.readWall, c.readPerf);
  assert.equal(at(c.perf), 1_700_000_000_000);
  assert.equal(c.wallReads, 1);
  // Inside the window: no read, the progress added, whole milliseconds.
  c.advance(42.7);
  assert.equal(at(c.perf), Math.floor(1_700_000_000_042.7));
  c.advance(WALL_CLOCK_WINDOW_MS - 43);
  assert.equal(at(c.perf), 1_700_000_000_099, '99.7 ms on');
  assert.equal(c.wallReads, 1, 'one read for the whole window');
  // The window is over: read again.
  c.advance(1);
  assert.equal(at(c.perf), Math.floor(c.wall));
  assert.equal(c.wallReads, 2);
});

test('wallClock follows a stepped wall clock within one window, and a reading older than the window reads the wall clock again', () => {
  const c = clocks(1_700_000_000_000, 1_000);
  const at = wallClock(c.readWall, c.readPerf);
  assert.equal(at(c.perf), 1_700_000_000_000);
  // The wall clock is stepped back an hour (NTP, an operator): the monotonic one is not.
  c.wall -= 3_600_000;
  c.advance(10);
  assert.equal(at(c.perf), 1_700_000_000_010, 'inside the window: still the extrapolation');
  c.advance(WALL_CLOCK_WINDOW_MS);
  assert.equal(at(c.perf), c.wall, 'after it: the stepped clock');
  // A caller holding a reading from long ago gets that moment's wall time, by the new anchor.
  const reads = c.wallReads;
  assert.equal(at(c.perf - 5_000), c.wall - 5_000);
  assert.equal(c.wallReads, reads + 1);
});

test('wallClock with the real clocks agrees with Date.now()', () => {
  const at = wallClock();
  for (let i = 0; i < 5; i++) {
    const before = Date.now();
    const got = at(performance.now());
    const after = Date.now();
    // Two reads apart by however long this machine takes between them; a millisecond for rounding.
    assert.ok(got >= before - 1 && got <= after + 1, `${got} not within [${before}, ${after}]`);
  }
});
