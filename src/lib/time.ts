import { performance } from 'node:perf_hooks';

/**
 * The range a token claim or stored timestamp may name: from the epoch to 2100-01-01.
 * Anything outside is a corrupt or hostile value, not a date: `new Date(1e13 * 1000)`
 * is an Invalid Date whose toISOString() throws, which once turned /readyz into a 500.
 */
export const MAX_EPOCH_SECONDS = 4_102_444_800;

/** A JWT NumericDate (seconds) inside the sane range. */
export function isEpochSeconds(v: unknown): v is number {
  return typeof v === 'number' && Number.isFinite(v) && v >= 0 && v <= MAX_EPOCH_SECONDS;
}

/** Milliseconds as an ISO string, or null when absent or not a representable date: never throws. */
export function isoFromMs(ms: number | undefined | null): string | null {
  if (typeof ms !== 'number' || !Number.isFinite(ms)) return null;
  const d = new Date(ms);
  return Number.isNaN(d.getTime()) ? null : d.toISOString();
}

/** Seconds (a JWT claim) as an ISO string, or null: never throws. */
export function isoFromSeconds(s: number | undefined | null): string | null {
  return typeof s === 'number' ? isoFromMs(s * 1000) : null;
}

/** How long wallClock() goes on from one Date.now() reading: 100 ms. */
export const WALL_CLOCK_WINDOW_MS = 100;

/**
 * The wall clock (ms since the epoch, whole) at a performance.now() reading the caller
 * already took, for a path that reads that clock anyway (the fast lane, at each request's
 * arrival): Date.now() is read once per WALL_CLOCK_WINDOW_MS, and in between the
 * monotonic clock's progress since that read is added. On Linux both clocks run at the
 * same rate (NTP slews both), so the answer is Date.now()'s to within a millisecond; when
 * the wall clock is stepped, it follows within the window. One case it does not follow at
 * once: the monotonic clock stands still while the host is suspended, so for up to one
 * window after a resume the answer is behind by the time suspended (a server is not
 * suspended; a laptop running it may be). A clock read was a measured share of a served
 * request (BENCHMARKS.md, session 22). `readWall` and `readPerf` are seams for tests.
 */
export function wallClock(readWall: () => number = Date.now, readPerf: () => number = () => performance.now()): (perfNow: number) => number {
  let perf0 = Number.NEGATIVE_INFINITY;
  let wall0 = 0;
  return (perfNow) => {
    if (perfNow - perf0 >= WALL_CLOCK_WINDOW_MS || perfNow < perf0 - WALL_CLOCK_WINDOW_MS) {
      // The wall clock between two monotonic readings: a pause between the reads moves
      // the anchor by half of it, not all of it.
      const before = readPerf();
      wall0 = readWall();
      perf0 = (before + readPerf()) / 2;
    }
    return Math.floor(wall0 + (perfNow - perf0));
  };
}
