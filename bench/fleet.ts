/** The fleet every bench broker holds (production process and harness alike). */

/** One pool, three logins: every serving case goes through each client's stored assignment. */
export const CREDENTIALS = ['default', 'team-b', 'team-c'];
/**
 * Clients stored and loaded, spread over CREDENTIALS by the broker's own assignment.
 * BENCH_CLIENTS changes it for an experiment (at least LOADED_CLIENTS; the targets assume 10,000).
 */
export const CLIENTS = Math.max(1_000, Number(process.env['BENCH_CLIENTS'] ?? 10_000));
/** Clients whose tokens the load rotates over (one token per request). */
export const LOADED_CLIENTS = 1_000;
