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

/**
 * A counter's value once it has stopped moving (unchanged over ten 50 ms looks): setup's
 * asynchronous work (NOTIFY-driven reloads) has landed, so what is counted next is the
 * test's own. Bounded: a counter that never settles within timeoutMs fails the test.
 */
export async function settledCount(read: () => Promise<number>, timeoutMs = 10_000): Promise<number> {
  const start = Date.now();
  let last = await read();
  for (let quiet = 0; quiet < 10; ) {
    if (Date.now() - start > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for the count to settle (last ${last})`);
    await sleep(50);
    const now = await read();
    quiet = now === last ? quiet + 1 : 0;
    last = now;
  }
  return last;
}

/**
 * Hold the event loop synchronously for about totalMs, as a CPU-bound handler or a GC storm
 * would, so that under-pressure reads it as delay. In two halves with a timer turn between:
 * Node's event-loop-delay histogram forgets its last tick on reset(), so a block that starts
 * after under-pressure's sample (which resets it) and before the histogram's next tick is
 * never recorded. The turn between the halves runs that tick, so the second half always is
 * (or the sample after it finds no tick since its reset, which reads as infinite delay).
 */
export async function blockEventLoop(totalMs: number): Promise<void> {
  busyWait(totalMs / 2);
  // A timer, not setImmediate: the overdue histogram tick runs in the next timers phase, before it.
  await sleep(1);
  busyWait(totalMs / 2);
}

/** Hold the event loop synchronously for ms, in one piece (see blockEventLoop for why that can go unseen). */
export function busyWait(ms: number): void {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    // spin
  }
}
