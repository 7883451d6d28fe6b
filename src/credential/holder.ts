import { buildSnapshot, stateOf, unusable, type Snapshot, type Unusable } from '../credential.js';
import { BrokerError } from '../errors.js';
import type { CredentialState } from '../metrics.js';
import type { Latch } from '../refresh-guards.js';
import type { StoredRow } from '../secret-store.js';

export interface SanitisedError {
  code: string;
  message: string;
  status?: number | undefined;
  upstreamCode?: string | undefined;
  at: string;
}

/**
 * What is wrong with a credential, by where it came from. Each is cleared by its own
 * recovery: the store by the next successful read, the document by a readable one, the
 * refresh by a rotation or a new refresh token. /status shows the most pressing.
 */
export interface Problems {
  /** The store could not be read, locked or written to. */
  store?: SanitisedError | undefined;
  /** The upstream refused or failed the last refresh (or an operator revoked the login). */
  refresh?: SanitisedError | undefined;
  /** The stored document could not be decrypted or parsed. */
  document?: SanitisedError | undefined;
}

export interface CredentialHolderOptions {
  decrypt: (row: StoredRow) => string;
  marginSeconds: number;
  now: () => number;
  /** The served snapshot or the latch changed: metrics follow. */
  onChange: () => void;
  /** A different refresh token arrived (rotated elsewhere, re-seeded): old failures no longer apply. */
  onNewRefreshToken: () => void;
  /** The stored document cannot be read: logged once per kind by the owner. */
  onUnreadable: (code: string, message: string) => void;
}

/**
 * One credential's current state in this process: what is served and what /status says.
 * A rotation the store does not hold yet is served first (it is the only valid token);
 * reads are sequenced so an older read never overwrites a newer one.
 */
export class CredentialHolder {
  readonly #o: CredentialHolderOptions;
  #stored: Snapshot | undefined;
  /** The bytes #stored was read from; undefined when not read back (adopted from our own write). */
  #storedRaw: Buffer | undefined;
  #pending: { expectedRaw: Buffer; snap: Snapshot } | undefined;
  #latch: Latch | undefined;
  #readSeq = 0;
  #appliedSeq = 0;
  readonly problems: Problems = {};

  constructor(o: CredentialHolderOptions) {
    this.#o = o;
  }

  /** The credential to serve: a pending rotation first, else the last read. */
  current(): Snapshot | undefined {
    return this.#pending?.snap ?? this.#stored;
  }

  get latch(): Latch | undefined {
    return this.latched ? this.#latch : undefined;
  }

  /** The latch names the refresh token held now (a latch on an older token no longer applies). */
  get latched(): boolean {
    const s = this.current();
    return this.#latch !== undefined && s !== undefined && this.#latch.refreshTokenSha === s.refreshTokenSha;
  }

  setLatch(latch: Latch): void {
    this.#latch = latch;
    this.#o.onChange();
  }

  /** The one definition of a credential's state. */
  state(now: number = this.#o.now()): CredentialState {
    if (!this.current() && this.problems.document) return 'invalid';
    return stateOf(this.current(), this.latched, now, this.#o.marginSeconds);
  }

  /** Why nothing can be served, or undefined when the held token is usable. */
  unusable(): Unusable | undefined {
    return unusable(this.current(), this.#o.now());
  }

  get lastError(): SanitisedError | undefined {
    return this.problems.store ?? this.problems.refresh ?? this.problems.document;
  }

  /** A ticket for a read about to start: adopt() ignores it if a later read was adopted first. */
  nextRead(): number {
    return ++this.#readSeq;
  }

  adopt(row: StoredRow | null, seq: number): Snapshot | undefined {
    if (seq < this.#appliedSeq) return this.current();
    this.#appliedSeq = seq;
    this.problems.store = undefined;
    // A row that still holds what the pending write expects is simply older.
    if (this.#pending && row && row.raw.equals(this.#pending.expectedRaw)) return this.current();
    if (!row) return this.#empty(undefined);
    if (!this.#pending && this.#storedRaw && row.raw.equals(this.#storedRaw)) return this.#stored;
    let plaintext: string;
    try {
      plaintext = this.#o.decrypt(row);
    } catch (err) {
      return this.#empty(this.#problem(err instanceof BrokerError ? err.code : 'DECRYPT_FAILED', (err as Error).message));
    }
    if (plaintext.trim() === '') return this.#empty(undefined);
    let snap: Snapshot;
    try {
      snap = buildSnapshot(row.raw, plaintext);
    } catch (err) {
      return this.#empty(this.#problem('AUTH_JSON_INVALID', `stored credential is unusable: ${(err as Error).message}`));
    }
    this.problems.document = undefined;
    const before = this.current();
    if (before && snap.refreshTokenSha !== before.refreshTokenSha) this.#o.onNewRefreshToken();
    this.#set(snap, row.raw);
    return snap;
  }

  /** A rotation the store does not hold yet: served until a read shows the row moved on. */
  holdPending(expectedRaw: Buffer, plaintext: string): void {
    this.#appliedSeq = this.nextRead();
    const snap = build(plaintext);
    if (!snap) return;
    this.#pending = { expectedRaw, snap };
    this.#o.onChange();
  }

  /** What this process just wrote, without waiting for its own NOTIFY; `row` when it could be read back. */
  adoptWritten(plaintext: string, row: StoredRow | null): Snapshot | undefined {
    this.#appliedSeq = this.nextRead();
    const snap = build(plaintext, row?.raw);
    if (snap) this.#set(snap, row?.raw);
    return snap;
  }

  #set(snap: Snapshot | undefined, raw: Buffer | undefined): void {
    this.#stored = snap;
    this.#storedRaw = raw;
    this.#pending = undefined;
    this.#o.onChange();
  }

  #empty(documentProblem: SanitisedError | undefined): undefined {
    this.problems.document = documentProblem;
    this.#set(undefined, undefined);
    return undefined;
  }

  #problem(code: string, message: string): SanitisedError {
    this.#o.onUnreadable(code, message);
    return { code, message, at: new Date(this.#o.now()).toISOString() };
  }
}

function build(plaintext: string, raw?: Buffer): Snapshot | undefined {
  try {
    return buildSnapshot(raw ?? Buffer.alloc(0), plaintext);
  } catch {
    return undefined;
  }
}
