import type { UsageSnapshot, UsageWindow } from './parse.js';

/**
 * How much of a login is left, as pools choose by it (DESIGN: Pools). Both windows count:
 * running out of either throttles every agent on the account. Precomputed once per
 * snapshot so the serving path compares one number with the clock.
 */
export interface Headroom {
  /**
   * Until when (ms since the epoch) the login counts as full: the latest reset among the
   * windows at or over the threshold (Infinity when such a window's reset is unknown), 0
   * when no window is. A window whose reset has passed no longer counts, even before the
   * next poll says so.
   */
  fullUntilMs: number;
  /** Per window with figures: [used percent, reset ms or Infinity] (for ties: most headroom first). */
  windows: Array<[number, number]>;
}

const WINDOWS = ['primary', 'secondary'] as const;

const resetMs = (w: UsageWindow): number => (w.resetAt === null ? Infinity : w.resetAt * 1000);

export function headroom(snapshot: UsageSnapshot | null | undefined, switchPercent: number): Headroom {
  let fullUntilMs = 0;
  const windows: Array<[number, number]> = [];
  for (const name of WINDOWS) {
    const w = snapshot?.[name];
    if (!w || w.usedPercent === null) continue;
    windows.push([w.usedPercent, resetMs(w)]);
    if (w.usedPercent >= switchPercent) fullUntilMs = Math.max(fullUntilMs, resetMs(w));
  }
  return { fullUntilMs, windows };
}

/** At or over the threshold in some window that has not reset yet. */
export function isFull(h: Headroom | undefined, nowMs: number): boolean {
  return h !== undefined && h.fullUntilMs > nowMs;
}

/** The fullest window's used percent now (windows past their reset count as empty); null without figures. */
export function fullestPercentAt(h: Headroom | undefined, nowMs: number): number | null {
  if (!h || h.windows.length === 0) return null;
  let max = 0;
  for (const [used, reset] of h.windows) if (reset > nowMs) max = Math.max(max, used);
  return max;
}

/**
 * Pools none of whose logins has headroom: every credential of the pool is full (a pool
 * with a credential lacking figures is not called exhausted: nothing says it is full).
 */
export function exhaustedPools(credentials: Array<{ pool: string; headroom: Headroom | undefined }>, nowMs: number): string[] {
  const byPool = new Map<string, boolean>();
  for (const c of credentials) byPool.set(c.pool, (byPool.get(c.pool) ?? true) && isFull(c.headroom, nowMs));
  return [...byPool].filter(([, full]) => full).map(([pool]) => pool).sort();
}
