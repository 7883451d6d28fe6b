import { hash } from 'node:crypto';
import { eachRow, type Pool } from '../db.js';
import type { Logger } from '../logger.js';
import { refreshCredential, sha256 } from './credentials.js';

export type ClientKind = 'broker' | 'platform';

export interface Client {
  /** broker_clients.id, or `platform:<workspace id>` for a platform workspace token. */
  id: string;
  name: string;
  kind: ClientKind;
  workspaceId: string | null;
  /** The pool of credentials this client is served from. */
  pool: string;
  /** The credential it is assigned within its pool (stored; undefined until assigned, and for platform tokens). */
  assigned: string | undefined;
  /**
   * SHA-256 of the client's token as a 32-character binary (latin1) string: the registry's
   * key for it, kept across reloads (half the bytes of its hex: 48 against 80 per key).
   */
  readonly tokenKey: string;
  /** The derived broker refresh credential (proxy mode serves it, /oauth/token accepts it). */
  readonly refreshCredential: string;
  /** SHA-256 of refreshCredential (binary string, like tokenKey), computed once: the shim's lookup key. */
  readonly refreshCredentialSha: string;
  /**
   * The client's part of a served ETag (a prefix of that hash), computed once. Like the
   * token key and the refresh credential it never changes on a record (a reload updates a
   * record in place only for the same token): the ETags kept below rely on that.
   */
  readonly etagTag: string;
  /**
   * The client's last served ETags, each with the template prefix (`"<hash>-`) it was built
   * for ('' until served): a poll of an unchanged document then builds no ETag string, and
   * Node's header check reads one it already flattened (serving.ts, ClientDocument).
   */
  etagFor: string;
  etag: string;
  platformEtagFor: string;
  platformEtag: string;
  /**
   * When this replica last served it (ms since the epoch); 0 when never. Always a number, so
   * V8 keeps the field an unboxed double that markServed overwrites in place: a field that
   * may hold undefined keeps each request's new timestamp object alive until the client's
   * next poll, long enough to be promoted into the old generation (BENCHMARKS.md, session 12).
   */
  lastSeenAt: number;
  lastGeneration: string | undefined;
  /**
   * The registry's flush epoch in which this record was last queued for the last-seen
   * write (0: never): a record is queued once per flush by comparing a number, where a
   * Set's add() on every request was a measured share of serving (BENCHMARKS.md, session 16).
   */
  queuedIn: number;
  /** The registry's reload that last read this record's row (0: none yet): a row listed twice counts once. */
  readIn: number;
}

/**
 * A client's record, every field named in one literal and one order: both kinds (broker
 * clients and platform tokens) then share one hidden class, so the serving path's property
 * reads stay monomorphic, and every field sits inside the object (a spread in the middle of
 * the literal put the later ones in a separate property array: 38 bytes more per client).
 */
function clientRecord(
  c: Pick<Client, 'id' | 'name' | 'kind' | 'workspaceId' | 'pool' | 'assigned'>,
  tokenKey: string,
  d: Pick<Client, 'refreshCredential' | 'refreshCredentialSha' | 'etagTag'>,
  lastSeenAt: number,
  lastGeneration: string | undefined,
): Client {
  return {
    id: c.id,
    name: c.name,
    kind: c.kind,
    workspaceId: c.workspaceId,
    pool: c.pool,
    assigned: c.assigned,
    tokenKey,
    refreshCredential: d.refreshCredential,
    refreshCredentialSha: d.refreshCredentialSha,
    etagTag: d.etagTag,
    etagFor: '',
    etag: '',
    platformEtagFor: '',
    platformEtag: '',
    lastSeenAt,
    lastGeneration,
    queuedIn: 0,
    readIn: 0,
  };
}

interface ClientRow {
  id: string;
  name: string;
  workspace_id: string | null;
  pool: string;
  assigned_credential: string | null;
  token_sha256: Buffer;
  last_used_at: Date | null;
  last_served_generation: string | null;
}

export interface ClientCounts {
  active: number;
  stale: number;
  never_seen: number;
}

/**
 * Every client credential, held in memory and reloaded on change, so that serving a
 * workspace costs no database query. Lookups are by SHA-256 of the presented secret: a
 * caller cannot steer the hash, so the map lookup leaks nothing a constant-time compare
 * would protect.
 *
 * The hash was the largest cost a client's request added (about 2 µs of 20: the native
 * call and a 64-character hex string per request; BENCHMARKS.md, history). A secret that
 * matched is therefore remembered as presented, mapped to its client; each applied reload
 * carries over only the secrets whose hash it still holds, so a revoked or re-issued secret
 * is forgotten at the same moment as its client. Only secrets that matched are remembered
 * (about 140 bytes each: 1.4 MB for 10,000 clients' tokens), so there is at
 * most one entry per live client however many wrong secrets arrive (each of those still
 * costs a hash, as before). That lookup by the presented string stays blind too: V8 compares
 * a key's characters only after its 32-bit string hash, seeded at random per process, has
 * matched. The process already holds the upstream tokens themselves; client secrets in its
 * memory widen nothing for a reader of that memory.
 */
export class ClientRegistry {
  readonly #pool: Pool;
  readonly #logger: Logger;
  readonly #secret: Buffer;
  readonly #platformTokens: boolean;
  #byToken = new Map<string, Client>();
  #byCredential = new Map<string, Client>();
  /** Secrets that matched, as presented (each applied reload keeps those still live). */
  #tokenSeen = new Map<string, Client>();
  #credentialSeen = new Map<string, Client>();
  /** Broker clients served since the last flush began, each record once (see Client.queuedIn). */
  #dirty: Client[] = [];
  /** Starts at 1: a new record (queuedIn 0) is never taken as queued. */
  #epoch = 1;
  /** The reload in progress, and the one asked for while it runs (see reload()). */
  #running: Promise<void> | undefined;
  #next: Promise<void> | undefined;
  #reads = 0;
  #platformTableMissingLogged = false;
  #onReload: (() => void) | undefined;

  constructor(o: { pool: Pool; logger: Logger; credentialSecret: Buffer; platformTokens: boolean }) {
    this.#pool = o.pool;
    this.#logger = o.logger;
    this.#secret = o.credentialSecret;
    this.#platformTokens = o.platformTokens;
  }

  get size(): number {
    return this.#byToken.size;
  }

  /** How many matched secrets are remembered as presented (at most one per live client and kind). */
  get remembered(): number {
    return this.#tokenSeen.size + this.#credentialSeen.size;
  }

  /**
   * Reload every client from the database (start, NOTIFY, periodic safety net). Reloads never
   * overlap: one asked for while another runs starts when that one ends (so it reads what
   * was committed before it was asked for), and every caller meanwhile shares it. A burst of
   * NOTIFYs then costs two reads, not one read of every client per NOTIFY.
   */
  reload(): Promise<void> {
    if (this.#running === undefined) {
      this.#running = this.#reload().finally(() => (this.#running = undefined));
      return this.#running;
    }
    this.#next ??= this.#running
      .catch(() => undefined)
      .then(() => {
        this.#next = undefined;
        return this.reload();
      });
    return this.#next;
  }

  async #reload(): Promise<void> {
    // Values most clients share (pool, credential and generation names) as one string each,
    // not one per row: 10,000 clients are held for the life of the process.
    const shared = new Map<string, string>();
    const intern = <T extends string | null | undefined>(v: T): T => {
      if (typeof v !== 'string') return v;
      const held = shared.get(v);
      if (held !== undefined) return held as T;
      shared.set(v, v);
      return v;
    };
    // A client this replica already holds is the same record, updated where the row says
    // something new: a reload of 10,000 unchanged clients then allocates rows and nothing
    // that outlives them. New records, strings and maps on every reload were promoted into
    // the old generation (about 5 MB a reload of 10,000 clients, a full GC every reload or
    // two; BENCHMARKS.md, session 21). Reloads never overlap (reload()), so an older read
    // never lands after a newer one. The token hash itself is not kept (a Buffer per
    // client): the binary key names it.
    const records: Client[] = [];
    const read = ++this.#reads;
    let held = 0;
    let changed = false;
    const take = (tokenSha: Buffer, c: Pick<Client, 'id' | 'name' | 'kind' | 'workspaceId' | 'pool' | 'assigned'>, lastSeenAt: number, lastGeneration: string | undefined) => {
      const key = tokenSha.toString('latin1');
      const prev = this.#byToken.get(key);
      if (prev === undefined || prev.kind !== c.kind) {
        const credential = refreshCredential(this.#secret, tokenSha);
        const credentialSha = sha256(credential);
        records.push(clientRecord(c, key, { refreshCredential: credential, refreshCredentialSha: credentialSha.toString('latin1'), etagTag: credentialSha.toString('base64url', 0, 12) }, lastSeenAt, lastGeneration));
        return;
      }
      // A hash listed twice (the platform's table need not be unique) is one client, counted once.
      if (prev.readIn !== read) {
        prev.readIn = read;
        held += 1;
        records.push(prev);
      }
      if (prev.id !== c.id || prev.name !== c.name || prev.workspaceId !== c.workspaceId || prev.pool !== c.pool || prev.assigned !== c.assigned) {
        changed = true;
        prev.id = c.id;
        prev.name = c.name;
        prev.workspaceId = c.workspaceId;
        prev.pool = c.pool;
        prev.assigned = c.assigned;
      }
      // Keep what this replica saw more recently than its last flush.
      if (lastSeenAt > prev.lastSeenAt) {
        prev.lastSeenAt = lastSeenAt;
        prev.lastGeneration = lastGeneration;
      }
    };
    let complete = false;
    try {
      await eachRow<ClientRow>(this.#pool, 'SELECT id, name, workspace_id, pool, assigned_credential, token_sha256, last_used_at, last_served_generation FROM broker_clients WHERE revoked_at IS NULL', (r) =>
        take(
          r.token_sha256,
          { id: r.id, name: r.name, kind: 'broker', workspaceId: r.workspace_id, pool: intern(r.pool), assigned: intern(r.assigned_credential) ?? undefined },
          r.last_used_at?.getTime() ?? 0,
          intern(r.last_served_generation) ?? undefined,
        ),
      );
      if (this.#platformTokens) await this.#eachPlatformToken((tokenSha, c) => take(tokenSha, c, 0, undefined));
      // The same clients as before (each row a record already held, as many as held): the
      // maps stay as they are. Otherwise new maps of the records, and a remembered secret
      // stays remembered while the hash it matched is still live; a revoked or re-issued one
      // is forgotten here.
      if (held !== records.length || held !== this.#byToken.size) {
        const byToken = new Map<string, Client>();
        const byCredential = new Map<string, Client>();
        for (const c of records) {
          byToken.set(c.tokenKey, c);
          byCredential.set(c.refreshCredentialSha, c);
        }
        this.#byToken = byToken;
        this.#byCredential = byCredential;
        this.#tokenSeen = ClientRegistry.#carried(this.#tokenSeen, byToken, (c) => c.tokenKey);
        this.#credentialSeen = ClientRegistry.#carried(this.#credentialSeen, byCredential, (c) => c.refreshCredentialSha);
      }
      complete = true;
    } finally {
      // Assignments are recounted after every read that changed a record, even one that then failed.
      if (complete || changed) this.#onReload?.();
    }
  }

  /** Every live client (broker clients and platform tokens). */
  all(): IterableIterator<Client> {
    return this.#byToken.values();
  }

  /** Called after every applied reload (assignments are recounted). */
  set onReload(fn: (() => void) | undefined) {
    this.#onReload = fn;
  }

  async #eachPlatformToken(take: (tokenSha: Buffer, c: Pick<Client, 'id' | 'name' | 'kind' | 'workspaceId' | 'pool' | 'assigned'>) => void): Promise<void> {
    const exists = await this.#pool.query<{ t: string | null }>("SELECT to_regclass('workspace_auth_tokens')::text AS t");
    if (!exists.rows[0]?.t) {
      if (!this.#platformTableMissingLogged) {
        this.#platformTableMissingLogged = true;
        this.#logger.warn({ event: 'platform_tokens_unavailable' }, 'PLATFORM_WORKSPACE_TOKENS is true but the database has no workspace_auth_tokens table; only broker clients can read');
      }
      return;
    }
    // Read-only use of the platform's table.
    await eachRow<{ workspace_id: string; token_hash: Buffer }>(this.#pool, 'SELECT workspace_id::text AS workspace_id, token_hash FROM workspace_auth_tokens WHERE revoked_at IS NULL', (row) =>
      take(row.token_hash, {
        id: `platform:${row.workspace_id}`,
        name: `workspace:${row.workspace_id}`,
        kind: 'platform',
        workspaceId: row.workspace_id,
        pool: 'default',
        assigned: undefined,
      }),
    );
  }

  /**
   * The client of a bearer token already matched since the last reload, found with one
   * Map lookup and no hash; undefined for any other token (authenticate() then decides).
   * Every such token came out of bearerOf, so it holds no whitespace or control character.
   */
  matchedBefore(token: string): Client | undefined {
    return this.#tokenSeen.get(token);
  }

  /** The client a bearer token belongs to, if it is live. No database query. */
  authenticate(token: string): Client | undefined {
    return ClientRegistry.#lookup(token, this.#tokenSeen, this.#byToken);
  }

  /** The client a broker refresh credential belongs to, if it is live. */
  byRefreshCredential(credential: string): Client | undefined {
    return ClientRegistry.#lookup(credential, this.#credentialSeen, this.#byCredential);
  }

  static #carried(seen: Map<string, Client>, byHash: Map<string, Client>, keyOf: (c: Client) => string): Map<string, Client> {
    const out = new Map<string, Client>();
    for (const [secret, before] of seen) {
      const now = byHash.get(keyOf(before));
      if (now !== undefined) out.set(secret, now);
    }
    return out;
  }

  static #lookup(secret: string, seen: Map<string, Client>, byHash: Map<string, Client>): Client | undefined {
    const known = seen.get(secret);
    if (known !== undefined) return known;
    // 'binary' is latin1: the same 32-character key a reload builds from the stored hash.
    const c = byHash.get(hash('sha256', secret, 'binary'));
    if (c !== undefined) {
      // Kept as a string of its own: the presented one is usually a slice of a larger string
      // (the shim's refresh_token with whatever the caller appended after the dot, up to the
      // 1 MB body limit), which would otherwise stay in memory with it. A matched secret is
      // base64url, so the copy is always equal; anything else is simply not remembered.
      const own = Buffer.from(secret, 'utf8').toString('utf8');
      if (own === secret) seen.set(own, c);
    }
    return c;
  }

  markServed(c: Client, generation: string, now: number): void {
    c.lastSeenAt = now;
    c.lastGeneration = generation;
    if (c.kind === 'broker' && c.queuedIn !== this.#epoch) this.#queue(c);
  }

  #queue(c: Client): void {
    c.queuedIn = this.#epoch;
    this.#dirty.push(c);
  }

  /** By state; `currentGeneration` says what each client should hold now (its assigned credential's token). */
  counts(currentGeneration: (c: Client) => string | undefined): ClientCounts {
    const out: ClientCounts = { active: 0, stale: 0, never_seen: 0 };
    for (const c of this.#byToken.values()) {
      const current = currentGeneration(c);
      if (c.lastSeenAt === 0) out.never_seen += 1;
      else if (current !== undefined && c.lastGeneration === current) out.active += 1;
      else out.stale += 1;
    }
    return out;
  }

  /** Write last-seen facts in one statement for every client served since the last flush. */
  async flush(): Promise<number> {
    if (this.#dirty.length === 0) return 0;
    const batch = this.#dirty;
    this.#dirty = [];
    this.#epoch++;
    try {
      await this.#pool.query(
        `UPDATE broker_clients AS c SET
           last_used_at = GREATEST(c.last_used_at, v.seen),
           last_served_generation = CASE WHEN c.last_used_at IS NULL OR v.seen >= c.last_used_at THEN v.gen ELSE c.last_served_generation END
         FROM unnest($1::uuid[], $2::timestamptz[], $3::text[]) AS v(id, seen, gen)
         WHERE c.id = v.id`,
        [batch.map((c) => c.id), batch.map((c) => new Date(c.lastSeenAt)), batch.map((c) => c.lastGeneration ?? null)],
      );
    } catch (err) {
      // Queued again for the next flush (a record served since is already queued).
      for (const c of batch) if (c.queuedIn !== this.#epoch) this.#queue(c);
      throw err;
    }
    return batch.length;
  }
}
