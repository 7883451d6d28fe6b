export interface RefreshLoopOptions {
  /** Run one scheduled check; resolves with the delay until the next one. Must not reject. */
  run: () => Promise<number>;
  /** The cycle in flight, if any (scheduled or not): shutdown waits for it. */
  inflight: () => Promise<unknown> | undefined;
  now: () => number;
}

/**
 * When the refresher checks: one timer, re-armed after each check with the delay the
 * check chose, brought forward by a poke (a NOTIFY). Stopping never abandons a refresh
 * in flight unbounded, nor waits for one forever: a rotation between the upstream's
 * answer and its durable copy is the one thing a shutdown must not cut.
 */
export class RefreshLoop {
  readonly #o: RefreshLoopOptions;
  #timer: NodeJS.Timeout | undefined;
  #running = false;
  #stopping = false;
  #nextCheckAt = 0;

  constructor(opts: RefreshLoopOptions) {
    this.#o = opts;
  }

  /** When the next scheduled check runs (undefined when the loop is not running). */
  get nextCheckAt(): number | undefined {
    return this.#running ? this.#nextCheckAt : undefined;
  }

  start(): void {
    if (this.#running || this.#stopping) return;
    this.#running = true;
    this.#schedule(0);
  }

  /** Check soon (a NOTIFY that may have changed due-ness or cleared a latch). */
  poke(): void {
    if (this.#running && !this.#stopping) this.#schedule(0);
  }

  #schedule(delayMs: number): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#nextCheckAt = this.#o.now() + delayMs;
    this.#timer = setTimeout(() => void this.#tick(), delayMs);
    this.#timer.unref();
  }

  async #tick(): Promise<void> {
    this.#timer = undefined;
    if (this.#stopping) return;
    const delay = await this.#o.run();
    // Stopped meanwhile, or poked (which armed a timer of its own).
    if (this.#stopping || this.#timer) return;
    this.#schedule(Math.max(0, delay));
  }

  /** Stop scheduling and wait, at most timeoutMs, for a refresh in flight; false if it did not finish. */
  async stop(timeoutMs: number): Promise<boolean> {
    this.#stopping = true;
    this.#running = false;
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = undefined;
    const inflight = this.#o.inflight();
    if (!inflight) return true;
    let t: NodeJS.Timeout | undefined;
    const finished = await Promise.race([
      inflight.then(
        () => true,
        () => true,
      ),
      new Promise<boolean>((resolve) => {
        t = setTimeout(() => resolve(false), timeoutMs);
      }),
    ]);
    if (t) clearTimeout(t);
    return finished;
  }
}
