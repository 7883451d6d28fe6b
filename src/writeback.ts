import type { PoolClient } from './db.js';
import type { RotationJournal } from './journal.js';
import type { Logger } from './logger.js';
import type { CredentialMetrics } from './metrics.js';
import type { SecretStore } from './secret-store.js';

export interface WriteBackOptions {
  store: SecretStore;
  secretKey: string;
  logger: Logger;
  metrics: CredentialMetrics;
  /** Local encrypted copy of a rotation until its write-back lands (absent: no key to encrypt it with). */
  journal?: RotationJournal | undefined;
}

/** A rotation the upstream issued that the store does not hold yet. */
export interface Pending {
  expectedRaw: Buffer;
  plaintext: string;
  since: number;
}

/** written: the row holds it · discarded: the row changed meanwhile (re-seeded) · pending: held in memory, retried. */
export type LandResult = 'written' | 'discarded' | 'pending';

export type RecoveryResult = 'none' | 'recovered' | 'already_landed' | 'stale';

/**
 * Getting a rotated credential durable. The upstream burns the old refresh token when it
 * answers, so from that moment the answer is the only valid login the fleet has: it goes
 * to the journal (fsynced) before the compare-and-set, and a write-back that fails keeps
 * it pending in memory until a retry lands. Start-up recovery finishes what a crash left.
 */
export class WriteBack {
  readonly #o: Omit<WriteBackOptions, 'journal'>;
  readonly #journal: RotationJournal | undefined;
  #pending: Pending | undefined;

  constructor(opts: WriteBackOptions) {
    const { journal, ...rest } = opts;
    this.#o = rest;
    this.#journal = journal;
  }

  get pending(): Pending | undefined {
    return this.#pending;
  }

  /** Journal the rotation, then compare-and-set it over the row read before the POST. */
  async land(expectedRaw: Buffer, plaintext: string, now: number, db: PoolClient): Promise<LandResult> {
    await this.#journal
      ?.write({ secretKey: this.#o.secretKey, expectedRaw, plaintext, at: new Date(now).toISOString() })
      .catch((err: Error) => this.#o.logger.error({ event: 'journal_failed', err: { message: err.message } }, 'could not journal the rotation to DATA_DIR; check the disk'));
    let written: boolean;
    try {
      written = await this.#o.store.compareAndSet(this.#o.secretKey, expectedRaw, plaintext, db);
    } catch (err) {
      // Losing this answer logs the fleet out: keep it, and write it back until it lands.
      // The journal entry stays too, for a crash before then.
      this.#pending = { expectedRaw, plaintext, since: now };
      this.#o.metrics.writebackPending(true);
      this.#o.logger.error(
        { event: 'writeback_pending', secretKey: this.#o.secretKey, err: { message: (err as Error).message } },
        'rotated the credential but could not write it back; serving it from memory and retrying the write-back: check the database',
      );
      return 'pending';
    }
    await this.#journal?.clear(this.#o.secretKey).catch(() => undefined);
    if (!written) {
      this.#o.logger.warn(
        { event: 'rotation_discarded', secretKey: this.#o.secretKey },
        'the stored credential changed during the refresh (re-seeded?); keeping the stored one and discarding this rotation',
      );
      return 'discarded';
    }
    return 'written';
  }

  /**
   * Retry a pending write-back. Resolved (landed, or discarded because the row changed
   * meanwhile) clears it; a store still failing returns the error and keeps it.
   */
  async flush(): Promise<{ resolved: true } | { resolved: false; error: Error }> {
    const p = this.#pending;
    if (!p) return { resolved: true };
    let ok: boolean;
    try {
      ok = await this.#o.store.compareAndSet(this.#o.secretKey, p.expectedRaw, p.plaintext);
    } catch (err) {
      return { resolved: false, error: err as Error };
    }
    this.#pending = undefined;
    await this.#journal?.clear(this.#o.secretKey).catch(() => undefined);
    this.#o.metrics.writebackPending(false);
    if (ok) {
      this.#o.logger.info({ event: 'writeback_landed', secretKey: this.#o.secretKey }, 'the pending rotation is written back');
    } else {
      this.#o.logger.warn({ event: 'rotation_discarded', secretKey: this.#o.secretKey }, 'the stored credential changed while a rotation was pending; keeping the stored one');
    }
    return { resolved: true };
  }

  /**
   * At start, before any refresh: a journaled rotation whose write-back never landed is
   * written now, if the row still holds what was read before its POST; otherwise it is
   * stale (it landed, or the login was re-seeded since) and is discarded.
   */
  async recover(): Promise<RecoveryResult> {
    if (!this.#journal) return 'none';
    const entry = await this.#journal.read(this.#o.secretKey);
    if (!entry) return 'none';
    const row = await this.#o.store.read(this.#o.secretKey);
    let outcome: Exclude<RecoveryResult, 'none'>;
    if (row && row.raw.equals(entry.expectedRaw)) {
      outcome = (await this.#o.store.compareAndSet(this.#o.secretKey, entry.expectedRaw, entry.plaintext)) ? 'recovered' : 'stale';
    } else if (row && this.#o.store.decrypt(row) === entry.plaintext) {
      outcome = 'already_landed';
    } else {
      outcome = 'stale';
    }
    await this.#journal.clear(this.#o.secretKey);
    if (outcome === 'recovered') {
      this.#o.logger.warn({ event: 'journal_recovered', secretKey: this.#o.secretKey, rotatedAt: entry.at }, 'wrote back a rotation journaled before a crash; no token was lost');
    } else {
      this.#o.logger.info(
        { event: 'journal_discarded', secretKey: this.#o.secretKey, rotatedAt: entry.at, reason: outcome },
        `discarded a journaled rotation (${outcome === 'stale' ? 'the stored credential changed since' : 'it had already landed'})`,
      );
    }
    return outcome;
  }
}
