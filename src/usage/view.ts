import { isoFromMs, isoFromSeconds } from '../lib/time.js';
import type { UsageWindow } from './parse.js';
import type { UsageRow } from './store.js';

export interface UsageWindowView {
  usedPercent: number | null;
  windowSeconds: number | null;
  resetAt: string | null;
}

/** One credential's usage as /status and the CLI show it. */
export interface UsageView {
  planType: string | null;
  allowed: boolean | null;
  limitReached: boolean | null;
  /** The 5-hour window. */
  primary: UsageWindowView | null;
  /** The weekly window. */
  secondary: UsageWindowView | null;
  fetchedAt: string | null;
  ageSeconds: number | null;
  /** The last poll failed, none succeeded yet, or the snapshot missed two polls (no replica could poll). */
  stale: boolean;
  /** Why the last poll failed (`timeout`, `unreachable`, `status_401`, `malformed`, `too_large`), else null. */
  lastError: string | null;
  polledBy: string | null;
}

const windowView = (w: UsageWindow | null): UsageWindowView | null =>
  w ? { usedPercent: w.usedPercent, windowSeconds: w.windowSeconds, resetAt: isoFromSeconds(w.resetAt) } : null;

/** The view of a stored row; ageMs is the snapshot's age now (undefined: no snapshot). */
export function usageView(row: UsageRow | undefined, ageMs: number | undefined, intervalMs: number): UsageView {
  const s = row?.snapshot;
  const ageSeconds = s && ageMs !== undefined ? Math.max(0, Math.round(ageMs / 1000)) : null;
  return {
    planType: s?.planType ?? null,
    allowed: s?.allowed ?? null,
    limitReached: s?.limitReached ?? null,
    primary: windowView(s?.primary ?? null),
    secondary: windowView(s?.secondary ?? null),
    fetchedAt: isoFromMs(row?.fetchedAtMs),
    ageSeconds,
    stale: !row || !row.ok || !s || ageMs === undefined || ageMs > 2 * intervalMs,
    lastError: row?.ok === false ? row.lastError : null,
    polledBy: row?.polledBy ?? null,
  };
}

/** The view straight from a row as read (the CLI: one read, aged on the database's clock). */
export function usageViewOfRow(row: UsageRow | undefined, intervalMs: number): UsageView {
  return usageView(row, row?.fetchedAtMs !== undefined ? row.dbNowMs - row.fetchedAtMs : undefined, intervalMs);
}

/** One line for a terminal: `plus; 5h 12% (resets …), weekly 3% (resets …); fetched 40 s ago`, and why it is stale. */
export function describeUsage(v: UsageView): string {
  const w = (name: string, x: UsageWindowView | null) => `${name} ${x?.usedPercent ?? '?'}%${x?.resetAt ? ` (resets ${x.resetAt})` : ''}`;
  const age = v.ageSeconds === null ? 'never fetched' : `fetched ${v.ageSeconds} s ago`;
  const stale = v.stale ? `; STALE${v.lastError ? ` (last poll: ${v.lastError})` : ''}` : '';
  return `${v.planType ?? 'plan unknown'}; ${w('5h', v.primary)}, ${w('weekly', v.secondary)}; ${age}${stale}`;
}
