import { isEpochSeconds } from '../lib/time.js';

/** One usage window (primary: 5 hours, secondary: a week), each member null when the backend did not say. */
export interface UsageWindow {
  usedPercent: number | null;
  windowSeconds: number | null;
  /** When the window resets (unix seconds). */
  resetAt: number | null;
}

/**
 * What the broker keeps of a `/wham/usage` answer: only these figures, never the body
 * itself (an unexpected member could carry anything, a token included).
 */
export interface UsageSnapshot {
  planType: string | null;
  allowed: boolean | null;
  limitReached: boolean | null;
  primary: UsageWindow | null;
  secondary: UsageWindow | null;
}

const obj = (v: unknown): Record<string, unknown> | undefined => (typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined);
const bool = (v: unknown): boolean | null => (typeof v === 'boolean' ? v : null);
// A plan is an identifier (plus, pro, team); prose or anything longer is not repeated.
const plan = (v: unknown): string | null => (typeof v === 'string' && /^[A-Za-z0-9_.-]{1,40}$/.test(v) ? v : null);
const num = (v: unknown, max: number): number | null => (typeof v === 'number' && Number.isFinite(v) && v >= 0 && v <= max ? v : null);

function window(v: unknown, fetchedAtSec: number): UsageWindow | null {
  const w = obj(v);
  if (!w) return null;
  const resetAfter = num(w['reset_after_seconds'], 31_536_000);
  const at = w['reset_at'];
  // reset_at is the truth; reset_after_seconds, counted from the fetch, stands in when it is missing.
  const resetAt = isEpochSeconds(at) ? at : resetAfter !== null ? Math.round(fetchedAtSec + resetAfter) : null;
  const out = { usedPercent: num(w['used_percent'], 1_000), windowSeconds: num(w['limit_window_seconds'], 31_536_000), resetAt };
  return out.usedPercent === null && out.windowSeconds === null && out.resetAt === null ? null : out;
}

/**
 * Read a `/wham/usage` body defensively: every member may be missing, null or of the
 * wrong type and is then null. Undefined when the body is not a JSON object or says
 * nothing readable (no plan, no window): such an answer must not replace a good snapshot.
 */
export function parseUsage(body: unknown, fetchedAtSec: number): UsageSnapshot | undefined {
  const b = obj(body);
  if (!b) return undefined;
  const rl = obj(b['rate_limit']) ?? {};
  const snap: UsageSnapshot = {
    planType: plan(b['plan_type']),
    allowed: bool(rl['allowed']),
    limitReached: bool(rl['limit_reached']),
    primary: window(rl['primary_window'], fetchedAtSec),
    secondary: window(rl['secondary_window'], fetchedAtSec),
  };
  return snap.planType === null && snap.primary === null && snap.secondary === null ? undefined : snap;
}

/** A snapshot read back from the database: the same defensive reading, on our own stored shape. */
export function storedUsage(v: unknown): UsageSnapshot | undefined {
  const s = obj(v);
  if (!s) return undefined;
  const w = (x: unknown): UsageWindow | null => {
    const o = obj(x);
    if (!o) return null;
    return { usedPercent: num(o['usedPercent'], 1_000), windowSeconds: num(o['windowSeconds'], 31_536_000), resetAt: isEpochSeconds(o['resetAt']) ? o['resetAt'] : null };
  };
  return { planType: plan(s['planType']), allowed: bool(s['allowed']), limitReached: bool(s['limitReached']), primary: w(s['primary']), secondary: w(s['secondary']) };
}
