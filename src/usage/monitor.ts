import { performance } from 'node:perf_hooks';
import type { Pool } from '../db.js';
import type { Logger } from '../logger.js';
import type { BrokerMetrics } from '../metrics.js';
import type { UsageFetchFn } from './fetch.js';
import { headroom, type Headroom } from './headroom.js';
import { claimPoll, readUsage, recordPoll, type UsageRow } from './store.js';
import { usageView, type UsageView } from './view.js';

/** A credential whose usage is watched: its name (metric label), its storage key, and its token while usable. */
export interface UsageCredential {
  name: string;
  secretKey: string;
  /** The token to poll with, or undefined when the credential must not be polled (absent, latched, expired). */
  access(): { accessToken: string; accountId: string | undefined } | undefined;
}

export interface UsageMonitorOptions {
  pool: Pool;
  logger: Logger;
  metrics: BrokerMetrics;
  replicaId: string;
  /** USAGE_POLL_INTERVAL_SECONDS in ms; 0 turns polling (and the view) off. */
  intervalMs: number;
  fetch: UsageFetchFn;
  /** The credentials to watch, asked on every tick (the set may change). */
  credentials: () => UsageCredential[];
  /** How often a replica looks whether a poll is due (default: a fifth of the interval, 10 ms to 30 s). */
  tickMs?: number;
  /** POOL_SWITCH_PERCENT: a window at or over it makes its login full (default 90). */
  switchPercent?: number;
  /** New figures reached this replica (a credential's secret key): pools may move clients. */
  onChange?: (secretKey: string) => void;
}

interface Held {
  row: UsageRow;
  headroom: Headroom;
  /** performance.now() when read: the row's database times are aged by local elapsed time since. */
  readAt: number;
}

const WINDOWS = ['primary', 'secondary'] as const;

/**
 * Each credential's usage limits, polled once per interval across every replica and shared
 * through the database: a replica claims the interval's poll (store.claimPoll), GETs
 * /wham/usage, stores the figures and NOTIFYs; every replica reloads on the NOTIFY. Reads
 * (view, metrics) are from memory. A failed poll keeps the last snapshot, marked stale, and
 * changes nothing else: no refresh, no latch. Framework-free; keyed by secret key.
 */
export class UsageMonitor {
  readonly #o: UsageMonitorOptions;
  readonly #held = new Map<string, Held>();
  readonly #names = new Map<string, string>();
  readonly #collectAge = () => this.#setAges();
  readonly #abort = new AbortController();
  #timer: NodeJS.Timeout | undefined;
  #ticking: Promise<void> | undefined;
  #polls = 0;
  #ticks = 0;

  constructor(o: UsageMonitorOptions) {
    this.#o = o;
  }

  get enabled(): boolean {
    return this.#o.intervalMs > 0;
  }

  /** Polls this replica made (GETs sent), and ticks it ran: for tests and diagnostics. */
  get polls(): number {
    return this.#polls;
  }

  get ticks(): number {
    return this.#ticks;
  }

  async start(): Promise<void> {
    if (!this.enabled) return;
    this.#o.metrics.usageAgeCollectors.add(this.#collectAge);
    await this.reload().catch((err: Error) => this.#o.logger.warn({ event: 'usage_reload_failed', err: { message: err.message } }, 'could not read stored usage; will retry'));
    const tickMs = this.#o.tickMs ?? Math.min(30_000, Math.max(10, this.#o.intervalMs / 5));
    this.#timer = setInterval(() => void this.tick(), tickMs);
    this.#timer.unref();
    void this.tick();
  }

  /** Stop ticking and cancel a poll in flight (its outcome is dropped). */
  async close(): Promise<void> {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = undefined;
    this.#abort.abort();
    this.#o.metrics.usageAgeCollectors.delete(this.#collectAge);
    await this.#ticking;
  }

  /** The usage of one credential, or null when polling is off. */
  view(secretKey: string): UsageView | null {
    if (!this.enabled) return null;
    const h = this.#held.get(secretKey);
    return usageView(h?.row, h ? this.#ageMs(h) : undefined, this.#o.intervalMs);
  }

  /** How full a credential is, from its last snapshot (undefined: polling off or no figures yet). No query. */
  headroom(secretKey: string): Headroom | undefined {
    return this.#held.get(secretKey)?.headroom;
  }

  /** A NOTIFY on the usage channel: reload that credential (undefined, after a reconnect: all of them). */
  onNotify(secretKey: string | undefined): void {
    if (!this.enabled || this.#abort.signal.aborted) return;
    const done = secretKey === undefined ? this.reload() : this.reload([secretKey]);
    done.catch((err: Error) => this.#o.logger.debug({ event: 'usage_reload_failed', err: { message: err.message } }, 'could not reload stored usage; serving the last one'));
  }

  /** Read the shared rows (default: every watched credential) into memory and the metrics. */
  async reload(keys?: string[]): Promise<void> {
    const creds = this.#o.credentials();
    for (const c of creds) this.#names.set(c.secretKey, c.name);
    const rows = await readUsage(this.#o.pool, keys ?? creds.map((c) => c.secretKey));
    const readAt = performance.now();
    for (const row of rows.values()) {
      const prev = this.#held.get(row.secretKey);
      // Reads may finish out of order: never let an older one overwrite a newer one.
      if (prev && prev.row.dbNowMs > row.dbNowMs) continue;
      this.#held.set(row.secretKey, { row, readAt, headroom: headroom(row.snapshot, this.#o.switchPercent ?? 90) });
      this.#setGauges(row);
      if (row.snapshot !== undefined) this.#o.onChange?.(row.secretKey);
    }
  }

  /** One look at every credential: poll those whose interval is up, if this replica wins the claim. Single-flight. */
  tick(): Promise<void> {
    if (!this.enabled || this.#abort.signal.aborted) return Promise.resolve();
    this.#ticking ??= this.#tickOnce().finally(() => (this.#ticking = undefined));
    return this.#ticking;
  }

  async #tickOnce(): Promise<void> {
    this.#ticks++;
    for (const c of this.#o.credentials()) {
      this.#names.set(c.secretKey, c.name);
      try {
        await this.#pollIfDue(c);
      } catch (err) {
        this.#o.logger.debug({ event: 'usage_poll_skipped', credential: c.name, err: { message: (err as Error).message } }, 'could not claim or record a usage poll; will retry');
      }
    }
  }

  async #pollIfDue(c: UsageCredential): Promise<void> {
    const h = this.#held.get(c.secretKey);
    // Known not due yet: no query. (Another replica's claim moves next_poll_at without a
    // NOTIFY, so a stale belief only costs one refused claim.)
    if (h && h.row.dbNowMs + (performance.now() - h.readAt) < h.row.nextPollAtMs) return;
    // Not polled at all: its token would only be refused (latched, expired) or there is none.
    const access = c.access();
    if (!access) return;
    const claimedAt = await claimPoll(this.#o.pool, c.secretKey, this.#o.intervalMs, this.#o.replicaId);
    if (!claimedAt) {
      await this.reload([c.secretKey]);
      return;
    }
    this.#polls++;
    const result = await this.#o.fetch(access.accessToken, access.accountId, this.#abort.signal);
    if (this.#abort.signal.aborted) return;
    const wasOk = h?.row.ok !== false;
    if (result.ok) {
      if (!wasOk) this.#o.logger.info({ event: 'usage_poll_recovered', credential: c.name }, `usage of credential ${c.name} fetched again`);
    } else {
      // Once per outage at warn; repeats at debug.
      this.#o.logger[wasOk ? 'warn' : 'debug'](
        { event: 'usage_poll_failed', credential: c.name, code: result.code, detail: result.detail },
        `could not fetch the usage of credential ${c.name} (${result.detail}): keeping the last snapshot, marked stale; nothing else changes (no refresh). Check CHATGPT_BASE_URL and the network`,
      );
    }
    await recordPoll(this.#o.pool, c.secretKey, claimedAt, result);
    await this.reload([c.secretKey]);
  }

  #ageMs(h: Held): number {
    const since = h.row.fetchedAtMs ?? h.row.createdAtMs;
    return h.row.dbNowMs - since + (performance.now() - h.readAt);
  }

  #setGauges(row: UsageRow): void {
    const credential = this.#names.get(row.secretKey) ?? row.secretKey;
    const m = this.#o.metrics;
    for (const window of WINDOWS) {
      const w = row.snapshot?.[window];
      const labels = { credential, window };
      if (w?.usedPercent != null) m.usageUsedPercent.set(labels, w.usedPercent);
      else m.usageUsedPercent.remove(labels);
      if (w?.resetAt != null) m.usageResetAt.set(labels, w.resetAt);
      else m.usageResetAt.remove(labels);
    }
  }

  /** At scrape time: how old each credential's newest figures are (since its row appeared, when none ever came). */
  #setAges(): void {
    for (const [key, h] of this.#held) {
      this.#o.metrics.usageSnapshotAge.set({ credential: this.#names.get(key) ?? key }, Math.max(0, Math.round(this.#ageMs(h) / 1000)));
    }
  }
}
