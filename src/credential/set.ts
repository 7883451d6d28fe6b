import type { Pool } from '../db.js';
import type { Logger } from '../logger.js';
import type { Refresher } from '../refresher.js';
import { listCredentials, type CredentialEntry } from './catalog.js';
import { DEFAULT_CREDENTIAL } from './names.js';

export interface CredentialSetOptions {
  pool: Pool;
  defaultKey: string;
  logger: Logger;
  /** One refresher per credential, with its own lock, latch, backoff, journal file and metrics. */
  create: (entry: CredentialEntry) => Refresher;
  /** A credential left: drop what was kept for it (its metric series). */
  removed?: (name: string) => void;
  /** The set changed (a credential added, removed or moved to another pool). */
  changed?: () => void;
  stopTimeoutMs?: number;
}

export interface HeldCredential {
  name: string;
  secretKey: string;
  pool: string;
  refresher: Refresher;
}

/**
 * The credentials this replica holds, each with its own refresher. The list lives in
 * broker_credentials; every replica reloads it on NOTIFY, so a login added or removed on
 * one replica appears or disappears on all of them. `default` is always held.
 */
export class CredentialSet {
  readonly #o: CredentialSetOptions;
  readonly #held = new Map<string, HeldCredential>();
  readonly #byKey = new Map<string, HeldCredential>();
  readonly default: Refresher;
  #started = false;
  #syncing: Promise<void> = Promise.resolve();

  constructor(o: CredentialSetOptions) {
    this.#o = o;
    const entry = { name: DEFAULT_CREDENTIAL, secretKey: o.defaultKey, pool: 'default' };
    this.default = o.create(entry);
    this.#add({ ...entry, refresher: this.default });
  }

  get(name: string): HeldCredential | undefined {
    return this.#held.get(name);
  }

  bySecretKey(key: string): HeldCredential | undefined {
    return this.#byKey.get(key);
  }

  list(): HeldCredential[] {
    return [...this.#held.values()];
  }

  /** Reload the list and start or stop refreshers to match it; calls are serialised. */
  sync(): Promise<void> {
    this.#syncing = this.#syncing.then(() => this.#sync()).catch((err: Error) => {
      this.#o.logger.warn({ event: 'credentials_reload_failed', err: { message: err.message } }, 'could not reload the list of credentials; keeping the last known set');
    });
    return this.#syncing;
  }

  async #sync(): Promise<void> {
    const entries = await listCredentials(this.#o.pool, this.#o.defaultKey);
    const wanted = new Set(entries.map((e) => e.name));
    let changed = false;
    for (const e of entries) {
      const held = this.#held.get(e.name);
      if (held) {
        changed ||= held.pool !== e.pool;
        held.pool = e.pool;
        continue;
      }
      changed = true;
      const h = { ...e, refresher: this.#o.create(e) };
      this.#add(h);
      this.#o.logger.info({ event: 'credential_added', credential: e.name, pool: e.pool }, `holding credential ${e.name} (pool ${e.pool})`);
      if (this.#started) {
        await this.#prepare(h.refresher);
        h.refresher.start();
      }
    }
    for (const h of [...this.#held.values()]) {
      if (wanted.has(h.name) || h.name === DEFAULT_CREDENTIAL) continue;
      this.#held.delete(h.name);
      this.#byKey.delete(h.secretKey);
      await h.refresher.stop(this.#o.stopTimeoutMs ?? 5_000);
      h.refresher.retire();
      this.#o.removed?.(h.name);
      changed = true;
      this.#o.logger.info({ event: 'credential_removed', credential: h.name }, `no longer holding credential ${h.name}`);
    }
    if (changed) this.#o.changed?.();
  }

  #add(h: HeldCredential): void {
    this.#held.set(h.name, h);
    this.#byKey.set(h.secretKey, h);
  }

  /** A journaled rotation lands before anything may refresh; then read and report crashed POSTs. */
  async #prepare(r: Refresher): Promise<void> {
    await r.recoverJournal();
    await r.reload().catch(() => undefined);
    await r.checkUnfinished().catch((err: Error) => this.#o.logger.warn({ event: 'audit_unreadable', err: { message: err.message } }, 'could not read broker_refresh_events'));
  }

  /** Load the list and every credential (journals first), without scheduling refreshes yet. */
  async load(): Promise<void> {
    await this.sync();
    for (const h of this.#held.values()) await this.#prepare(h.refresher);
  }

  /** Schedule every refresher; credentials that appear later start at once. */
  start(): void {
    this.#started = true;
    for (const h of this.#held.values()) h.refresher.start();
  }

  /** Stop every refresher, each waiting (bounded) for a refresh in flight; false when one did not finish. */
  async stop(timeoutMs: number): Promise<boolean> {
    this.#started = false;
    const done = await Promise.all([...this.#held.values()].map((h) => h.refresher.stop(timeoutMs)));
    return done.every(Boolean);
  }
}
