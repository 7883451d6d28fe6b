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
