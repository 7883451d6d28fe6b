import type { Pool } from '../db.js';
import type { SecretStore } from '../secret-store.js';
import { exhaustedPools, headroom } from '../usage/headroom.js';
import { readUsage } from '../usage/store.js';
import { describeUsage, usageViewOfRow, type UsageView } from '../usage/view.js';
import { describeStored } from './credentials.js';

export interface CredentialStatus {
  name: string;
  pool: string;
  state: string;
  planType: string | null;
  clientsAssigned: number;
  /** null when polling is off (USAGE_POLL_INTERVAL_SECONDS=0). */
  usage: UsageView | null;
}

export interface PoolsStatus {
  credentials: CredentialStatus[];
  /** Pools whose every login is at or over POOL_SWITCH_PERCENT (judged from the stored usage). */
  exhaustedPools: string[];
  /** Credentials that cannot serve (an absent `default` counts only when it is the only credential). */
  unusable: string[];
}

/** Every credential with its usage, as the database holds them (no broker needs to run): the CLI's `status`. */
export async function poolsStatus(
  store: SecretStore,
  pool: Pool,
  o: { defaultKey: string; marginSeconds: number; usageIntervalMs: number; switchPercent: number },
): Promise<PoolsStatus> {
  const rows = await describeStored(store, pool, o.defaultKey, o.marginSeconds);
  // Polling off: no figures to show or judge pools by.
  const usage = o.usageIntervalMs > 0 ? await readUsage(pool, rows.map((r) => r.secretKey)) : undefined;
  const credentials = rows.map((r) => ({
    name: r.name,
    pool: r.pool,
    state: r.state,
    planType: r.planType,
    clientsAssigned: r.clientsAssigned,
    usage: usage ? usageViewOfRow(usage.get(r.secretKey), o.usageIntervalMs) : null,
  }));
  const exhausted = usage ? exhaustedPools(rows.map((r) => ({ pool: r.pool, headroom: headroom(usage.get(r.secretKey)?.snapshot, o.switchPercent) })), Date.now()) : [];
  const unusable = credentials
    .filter((c) => c.state !== 'fresh' && c.state !== 'due')
    .filter((c) => !(c.name === 'default' && c.state === 'absent' && credentials.length > 1))
    .map((c) => c.name);
  return { credentials, exhaustedPools: exhausted, unusable };
}

/** The human lines: one per credential, then the exhausted pools. */
export function describePools(s: PoolsStatus): string[] {
  const lines = s.credentials.map(
    (c) => `  ${c.name} (pool ${c.pool}): ${c.state}, ${c.clientsAssigned} client(s)${c.usage ? `; ${describeUsage(c.usage)}` : ''}`,
  );
  for (const p of s.exhaustedPools) lines.push(`POOL EXHAUSTED: every login of pool ${p} is at or over POOL_SWITCH_PERCENT; add a login to it (npx codex-auth-broker login --credential NAME --pool ${p})`);
  return lines;
}
