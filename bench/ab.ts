/**
 * npm run bench:ab -- <checkout A> <checkout B>: two builds' server CPU per request, measured
 * at the same moments. Prints; writes nothing.
 *
 * On a shared machine one process to the next, or one minute to the next, moves CPU per
 * request by 10-40 % (BENCHMARKS.md), which swamps a change of a few per cent when the two
 * builds are measured one after the other. Here both production processes (each checkout's
 * own `bench/production.ts`, so each builds and starts itself exactly as `npm run bench`
 * does, with the bare route inside it) run side by side on the server core, and every window
 * loads both at once: whatever slows the machine slows both, and the ratio of the two
 * within a window is what is compared. Which process is loaded first alternates per round.
 * The bare route inside each process is the control, and it matters: one process of a
 * build can run every route 20-40 % dearer than another process of the same build for its
 * whole life (measured with this script: the control's B/A read 0.94 in one pair and 1.36 in
 * the next). So each route is also read against the bare route of its own process in the
 * same round (route ÷ bare), which cancels what the process costs every request; the B/A of
 * that is the column to trust, over several pairs of fresh processes (AB_PAIRS).
 *
 * Each checkout needs its node_modules (a symlink to another checkout's will do) and must not
 * be edited while it builds. Env: AB_PAIRS (3 pairs of fresh processes), AB_ROUNDS (4 per
 * pair), AB_SECONDS (3 per window, after 1 s of warm-up), AB_CASES (comma-separated, of
 * 200,304,dropin,healthz,shim; the bare route is always measured).
 */
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import autocannon from 'autocannon';
import { startTestPostgres } from '../test/helpers/pg.js';
import { CLIENTS, LOADED_CLIENTS } from './fleet.js';
import type * as ProductionModule from './production.js';
import { NAMED_CASES } from './requests.js';

type Production = Awaited<ReturnType<typeof ProductionModule.startProduction>>;
type Result = Awaited<ReturnType<typeof autocannon>>;

const PAIRS = Number(process.env['AB_PAIRS'] ?? 3);
const ROUNDS = Number(process.env['AB_ROUNDS'] ?? 4);
const SECONDS = Number(process.env['AB_SECONDS'] ?? 3);
const CASES = ['bare', ...(process.env['AB_CASES'] ?? '200,304,dropin,healthz').split(',').filter((c) => c && c !== 'bare')];

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
}

async function main(): Promise<void> {
  const dirs = process.argv.slice(2);
  if (dirs.length !== 2) throw new Error('usage: npm run bench:ab -- <checkout A> <checkout B>');
  for (const c of CASES) if (!NAMED_CASES[c]) throw new Error(`AB_CASES: unknown case ${c} (known: ${Object.keys(NAMED_CASES).join(', ')})`);
  const pg = await startTestPostgres();
  const builds: Array<{ name: string; mod: typeof ProductionModule; prod?: Production }> = [];
  try {
    for (const dir of dirs) {
      const mod = (await import(pathToFileURL(path.resolve(dir, 'bench/production.ts')).href)) as typeof ProductionModule;
      builds.push({ name: dir, mod });
    }
    const cpu = (pid: number) => {
      const s = builds[0]?.mod.cpuSplitOf(pid) ?? { user: NaN, sys: NaN };
      return s.user + s.sys;
    };
    /** Per case, per round: [A µs, B µs]. */
    const us = new Map<string, number[][]>();
    for (let pair = 0; pair < PAIRS; pair++) {
      for (const b of builds) b.prod = await b.mod.startProduction(await pg.newDatabase(), CLIENTS, LOADED_CLIENTS, { inProcessBare: true, build: pair === 0 });
      for (let r = 0; r < ROUNDS; r++) {
        for (const c of CASES) {
          const spec = NAMED_CASES[c] as (typeof NAMED_CASES)[string];
          const order = r % 2 ? [1, 0] : [0, 1];
          const load = (i: number, seconds: number) => {
            const p = builds[i]?.prod as Production;
            const url = spec.bare ? (p.inProcessBare ?? '') : p.base;
            return autocannon({ url, connections: 25, duration: seconds, requests: [spec.spec(p.clients)] });
          };
          await Promise.all(order.map((i) => load(i, 1)));
          const before = builds.map((b) => cpu(b.prod?.pid ?? 0));
          const results = await Promise.all(order.map((i) => load(i, SECONDS)));
          const row = [0, 1].map((i) => {
            const res = results[order.indexOf(i)] as Result;
            const bad = Object.keys(res.statusCodeStats).filter((s) => s !== '200' && s !== '304');
            if (bad.length || res.errors) throw new Error(`case ${c}: ${builds[i]?.name} answered ${bad.join(', ')} (${res.errors} errors)`);
            return (cpu(builds[i]?.prod?.pid ?? 0) - (before[i] as number)) / res.requests.total;
          });
          const rows = us.get(c) ?? [];
          rows.push(row);
          us.set(c, rows);
          console.log(`pair ${pair + 1} round ${r + 1} ${c}: A ${row[0]?.toFixed(1)} µs, B ${row[1]?.toFixed(1)} µs, B/A ${((row[1] as number) / (row[0] as number)).toFixed(3)}`);
        }
      }
      for (const b of builds) await b.prod?.stop();
    }
    const bare = us.get('bare') ?? [];
    const f = (x: number) => x.toFixed(2);
    console.log(`\nA = ${dirs[0]}, B = ${dirs[1]}; ${PAIRS} pairs of fresh processes × ${ROUNDS} rounds of ${SECONDS} s, both loaded at once (25 connections each); server CPU per request:`);
    console.log("| case | A µs | B µs | B/A | A ÷ its bare route | B ÷ its bare route | B/A of those (trust this) | every round's B/A of those |");
    console.log('|---|---:|---:|---:|---:|---:|---:|---|');
    for (const c of CASES) {
      const rows = us.get(c) ?? [];
      const norm = rows.map(([a, b], i) => [(a as number) / (bare[i]?.[0] as number), (b as number) / (bare[i]?.[1] as number)] as const);
      const ratios = norm.map(([a, b]) => b / a);
      console.log(
        `| ${c === 'bare' ? 'bare route in each process (control)' : c} | ${median(rows.map((x) => x[0] as number)).toFixed(1)} | ${median(rows.map((x) => x[1] as number)).toFixed(1)} | ${f(median(rows.map(([a, b]) => (b as number) / (a as number))))} | ${f(median(norm.map((x) => x[0])))} | ${f(median(norm.map((x) => x[1])))} | ${c === 'bare' ? '' : median(ratios).toFixed(3)} | ${c === 'bare' ? '' : ratios.map(f).join(' / ')} |`,
      );
    }
  } finally {
    for (const b of builds) await b.prod?.stop().catch(() => undefined);
    await pg.stop();
  }
}

await main();
