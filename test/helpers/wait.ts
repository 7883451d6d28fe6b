import { setTimeout as sleep } from 'node:timers/promises';

/**
 * Poll until cond holds; resolves with how long that took. A timeout names what was
 * awaited (and the tail of a process's output, when given), so it reads as a diagnosis.
 */
export async function waitFor(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 5_000, out?: () => string): Promise<number> {
  const start = Date.now();
  while (!(await cond())) {
    if (Date.now() - start > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${out ? `\n${out().slice(-3000)}` : ''}`);
    await sleep(10);
  }
  return Date.now() - start;
}
