/** Helpers for the seeded fuzz tests: a reproducible PRNG and JSON path walking. */

/** mulberry32: a tiny, fast, seeded PRNG, so failures reproduce. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Every path (as key segments) to a leaf in a JSON value; an empty object or array counts as a leaf. */
export function leaves(v: unknown, prefix: string[] = []): string[][] {
  if (typeof v !== 'object' || v === null) return [prefix];
  const entries = Object.entries(v as Record<string, unknown>);
  if (entries.length === 0) return [prefix];
  return entries.flatMap(([k, child]) => leaves(child, [...prefix, k]));
}

/** The value at a path, and whether the path exists (own properties only). */
export function at(v: unknown, path: string[]): { found: boolean; value: unknown } {
  let cur: unknown = v;
  for (const k of path) {
    if (typeof cur !== 'object' || cur === null || !Object.hasOwn(cur, k)) return { found: false, value: undefined };
    cur = (cur as Record<string, unknown>)[k];
  }
  return { found: true, value: cur };
}
