import { hash } from 'node:crypto';
import { CLIENTS_CHANNEL } from '../clients/credentials.js';
import type { Client, ClientRegistry } from '../clients/registry.js';
import type { CredentialSet, HeldCredential } from '../credential/set.js';
import type { Pool } from '../db.js';
import type { Logger } from '../logger.js';
import type { BrokerMetrics } from '../metrics.js';
import { exhaustedPools, fullestPercentAt, isFull, type Headroom } from '../usage/headroom.js';

/**
 * Why a client moved: its credential stopped being usable, was removed, reached
 * POOL_SWITCH_PERCENT of a usage window (`usage`), or the client changed pool.
 */
export type SwitchReason = 'latched' | 'expired' | 'unusable' | 'removed' | 'usage' | 'pool_changed';

export interface AssignmentsOptions {
  pool: Pool;
  clients: ClientRegistry;
  credentials: CredentialSet;
  logger: Logger;
  metrics: BrokerMetrics;
  /** How full a credential's account is (its usage snapshot); none: usage is not watched. No query. */
  headroom?: (h: HeldCredential) => Headroom | undefined;
  /** The clock for usage resets (ms). */
  nowMs?: () => number;
}

/** Serving and assigning only go to a credential whose token is fresh or merely due. */
function usable(h: HeldCredential, now?: number): boolean {
  const s = h.refresher.state(now);
  return s === 'fresh' || s === 'due';
}

/**
 * Which credential each client is served (DESIGN: Pools). A client keeps its assigned
 * credential (a running agent's conversation stays on one account) until that credential
 * becomes unusable (latched, expired, removed), reaches POOL_SWITCH_PERCENT in a usage
 * window while another credential of the pool is under it, or the client changes pool;
 * then it moves to the usable credential under the threshold with the fewest clients
 * (ties: most headroom). A reset does not move anyone back (sticky). Assignments are stored in
 * broker_clients and change by compare-and-set, so every replica serves the same one and
 * a switch is written (and counted) once fleet-wide. Serving reads memory only.
 */
export class Assignments {
  readonly #o: AssignmentsOptions;
  /** Clients per credential, from the last reload plus this replica's switches since. */
  #counts = new Map<string, number>();
  #scheduled = false;
  #running: Promise<number> | undefined;
  #again = false;
  #stopped = false;

  constructor(o: AssignmentsOptions) {
    this.#o = o;
  }

  /** The credential to serve `client`: its assignment while it may keep it, else the pick a rebalance would make. No query. */
  credentialFor(client: Client, now?: number): HeldCredential | undefined {
    const current = client.assigned === undefined ? undefined : this.#o.credentials.get(client.assigned);
    if (current && this.#keeps(client, current, now)) return current;
    if (client.kind === 'broker') this.schedule();
    return this.#pick(client, current) ?? current;
  }

  /**
   * Pools where every credential is at or over the threshold (nobody moves; the
   * exhausted-pool alert fires). Empty when usage is not watched.
   */
  exhaustedPools(): string[] {
    const headroom = this.#o.headroom;
    if (!headroom) return [];
    return exhaustedPools(this.#o.credentials.list().map((h) => ({ pool: h.pool, headroom: headroom(h) })), this.#now());
  }

  /** Whether a client stays on its credential: in its pool, usable, and not full while the pool has room elsewhere. */
  #keeps(client: Client, current: HeldCredential, now?: number): boolean {
    if (current.pool !== client.pool || !usable(current, now)) return false;
    return !this.#full(current) || !this.#roomIn(client.pool);
  }

  #now(): number {
    return this.#o.nowMs ? this.#o.nowMs() : Date.now();
  }

  #full(h: HeldCredential): boolean {
    const room = this.#o.headroom?.(h);
    return room !== undefined && room.fullUntilMs !== 0 && isFull(room, this.#now());
  }

  /** Some usable credential of the pool is under the threshold. */
  #roomIn(pool: string): boolean {
    for (const h of this.#o.credentials.list()) if (h.pool === pool && usable(h) && !this.#full(h)) return true;
    return false;
  }

  /** No more rebalancing (shutdown: the pool is about to close). */
  stop(): void {
    this.#stopped = true;
  }

  /** Recount assignments (after a client reload). */
  recount(): void {
    const counts = new Map<string, number>();
    for (const c of this.#o.clients.all()) if (c.assigned !== undefined) counts.set(c.assigned, (counts.get(c.assigned) ?? 0) + 1);
    this.#counts = counts;
  }

  /** Clients assigned per pool and credential (every held credential, zero included). */
  assigned(): Array<{ pool: string; credential: string; clients: number }> {
    return this.#o.credentials.list().map((h) => ({ pool: h.pool, credential: h.name, clients: this.#counts.get(h.name) ?? 0 }));
  }

  clientsOf(credential: string): number {
    return this.#counts.get(credential) ?? 0;
  }

  /** Rebalance soon (a credential changed state, appeared or left; clients reloaded). Coalesced. */
  schedule(): void {
    if (this.#scheduled || this.#stopped) return;
    this.#scheduled = true;
    setImmediate(() => {
      this.#scheduled = false;
      if (this.#stopped) return;
      void this.rebalance().catch((err: Error) =>
        this.#o.logger.warn({ event: 'rebalance_failed', err: { message: err.message } }, 'could not store client assignments; serving by the in-memory pick and retrying on the next change'),
      );
    });
  }

  /**
   * Store an assignment for every broker client that has none, or whose credential is
   * unusable, gone or outside its pool. One statement, a compare-and-set per client: a
   * replica that lost the race changes nothing. Returns how many rows this replica wrote.
   */
  async rebalance(): Promise<number> {
    if (this.#running) {
      this.#again = true;
      return this.#running;
    }
    this.#running = this.#rebalance().finally(() => {
      this.#running = undefined;
    });
    const n = await this.#running;
    if (this.#again) {
      this.#again = false;
      return n + (await this.rebalance());
    }
    return n;
  }

  async #rebalance(): Promise<number> {
    const moves: Array<{ client: Client; to: string; reason: SwitchReason | 'new' }> = [];
    for (const client of this.#o.clients.all()) {
      if (client.kind !== 'broker') continue;
      const current = client.assigned === undefined ? undefined : this.#o.credentials.get(client.assigned);
      if (current && this.#keeps(client, current)) continue;
      const to = this.#pick(client, current);
      if (!to || to.name === client.assigned) continue;
      moves.push({ client, to: to.name, reason: this.#reason(client, current) });
      // Count as we go, so a burst of movers spreads over the pool instead of piling on one.
      if (client.assigned !== undefined) this.#counts.set(client.assigned, (this.#counts.get(client.assigned) ?? 1) - 1);
      this.#counts.set(to.name, (this.#counts.get(to.name) ?? 0) + 1);
    }
    if (moves.length === 0) return 0;
    const r = await this.#o.pool.query<{ id: string }>(
      `WITH moved AS (
         UPDATE broker_clients AS c SET assigned_credential = v.next
         FROM unnest($1::uuid[], $2::text[], $3::text[]) AS v(id, prev, next)
         WHERE c.id = v.id AND c.revoked_at IS NULL AND c.assigned_credential IS NOT DISTINCT FROM v.prev
         RETURNING c.id)
       SELECT id, pg_notify($4, '') FROM moved`,
      [moves.map((m) => m.client.id), moves.map((m) => m.client.assigned ?? null), moves.map((m) => m.to), CLIENTS_CHANNEL],
    );
    const won = new Set(r.rows.map((x) => x.id));
    for (const m of moves) {
      if (!won.has(m.client.id)) continue;
      const from = m.client.assigned;
      m.client.assigned = m.to;
      if (m.reason === 'new') continue;
      this.#o.metrics.poolSwitches.inc({ pool: m.client.pool, reason: m.reason });
      this.#o.logger.info(
        { event: 'pool_switch', client: m.client.name, pool: m.client.pool, from: from ?? null, to: m.to, reason: m.reason },
        `moved client ${m.client.name} from credential ${from} to ${m.to} (${m.reason})`,
      );
    }
    return won.size;
  }

  #reason(client: Client, current: HeldCredential | undefined): SwitchReason | 'new' {
    if (client.assigned === undefined) return 'new';
    if (!current) return 'removed';
    if (current.pool !== client.pool) return 'pool_changed';
    const s = current.refresher.state();
    if (s === 'fresh' || s === 'due') return 'usage';
    // Absent: its stored login was deleted (a removal whose NOTIFY arrived before the list's).
    return s === 'latched' ? 'latched' : s === 'expired' ? 'expired' : s === 'absent' ? 'removed' : 'unusable';
  }

  /**
   * The usable credential of the client's pool under the threshold with the fewest
   * clients; ties: most headroom (the lower fullest window), then a stable per-client
   * order, so replicas that pick before the stored answer arrives agree. Every usable
   * one full: the current one if usable (nobody moves), else the fewest-clients usable
   * one. None usable: keep the current one if it is in the pool, else any of the pool.
   */
  #pick(client: Client, current: HeldCredential | undefined): HeldCredential | undefined {
    const inPool = this.#o.credentials.list().filter((h) => h.pool === client.pool);
    const candidates = inPool.filter(usable);
    if (candidates.length === 0) return current && current.pool === client.pool ? current : inPool[0];
    const roomy = candidates.filter((h) => !this.#full(h));
    if (roomy.length === 0 && current && candidates.includes(current)) return current;
    const now = this.#now();
    let best: HeldCredential | undefined;
    let bestKey: [number, number, string] | undefined;
    for (const h of roomy.length > 0 ? roomy : candidates) {
      const key: [number, number, string] = [this.#counts.get(h.name) ?? 0, fullestPercentAt(this.#o.headroom?.(h), now) ?? 0, tieBreak(client.id, h.name)];
      if (!bestKey || before(key, bestKey)) {
        best = h;
        bestKey = key;
      }
    }
    return best;
  }
}

function before(a: [number, number, string], b: [number, number, string]): boolean {
  if (a[0] !== b[0]) return a[0] < b[0];
  if (a[1] !== b[1]) return a[1] < b[1];
  return a[2] < b[2];
}

function tieBreak(clientId: string, credential: string): string {
  return hash('sha256', `${clientId}\u0000${credential}`, 'hex').slice(0, 8);
}
