/**
 * npm run bench:profile -- <checkout A> [<checkout B>]: where the production process's CPU
 * goes, per request, from Linux perf. Prints; writes nothing but perf's data files (under
 * PROFILE_DIR, default a new directory in /tmp, removed after the run unless PROFILE_KEEP=1).
 *
 * `node --cpu-prof` sees JavaScript only: the kernel's share (the loopback TCP send and
 * receive, a third of a request here), V8's builtins (Map lookups, string flattening,
 * regular expressions) and Node's native code land in "(program)" or in whatever JavaScript
 * frame called them, and a change that saves a native call shows nowhere. `perf record -e
 * cpu-clock` samples all of it, and with V8's `--perf-prof` (a jit-PID.dump of every code
 * object V8 makes, read back by `perf inject --jit`) perf names the JIT-compiled JavaScript
 * too, as it was at the moment of each sample. (`--perf-basic-prof`'s /tmp/perf-PID.map,
 * used until session 19, only grows: code that V8 moves or collects leaves its entry, and a
 * function compiled later at the same address was reported under the old name.) Each case
 * runs `PROFILE_SECONDS` (8) after 2 s of warm-up, with both checkouts' production
 * processes (each its own bench/production.ts, as `npm run bench:ab` starts them, the bare
 * route inside each) on the server core and loaded at the same moments, 25 connections
 * each; each process is profiled for the same window.
 *
 * For each case it prints µs per request by group (the broker's own code, Fastify and other
 * dependencies, Node's JavaScript, V8 builtins, GC, other native code, the kernel), then
 * the functions whose cost differs most: B against A, or with one checkout, the case
 * against the bare route inside the same process (what the route adds; loaded one after the
 * other, so the machine's drift is in that difference). A sampling profile attributes; it does
 * not time: read CPU per request from `npm run bench` or `bench:ab`.
 *
 * With PROFILE_KEEP=1 the data files stay, call graphs included, for `perf report -i
 * FILE.jit -g caller --symbols SYMBOL` (who calls a native function: how BENCHMARKS.md's
 * session 16 found what makes a whole process dearer), with the jitted-*.so files that name
 * the JavaScript (a checkout from before session 19 runs its process in its own directory,
 * where they are removed after the run).
 *
 * Needs `perf` (Debian: linux-perf) and the right to profile the processes (root, or
 * kernel.perf_event_paranoid ≤ 1). Env: PROFILE_CASES (comma-separated, of
 * bare,200,304,dropin,healthz,shim; default bare,200,dropin,shim), PROFILE_SECONDS,
 * PROFILE_TOP (20 functions).
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import autocannon from 'autocannon';
import { startTestPostgres } from '../test/helpers/pg.js';
import { CLIENTS, LOADED_CLIENTS } from './fleet.js';
import type * as ProductionModule from './production.js';
import { NAMED_CASES } from './requests.js';

type Production = Awaited<ReturnType<typeof ProductionModule.startProduction>>;

const SECONDS = Number(process.env['PROFILE_SECONDS'] ?? 8);
const TOP = Number(process.env['PROFILE_TOP'] ?? 20);
const CASES = (process.env['PROFILE_CASES'] ?? 'bare,200,dropin,shim').split(',').filter(Boolean);
/** perf's sampling rate (Hz): a prime, so sampling does not beat with a periodic timer. */
const HZ = 4999;

/** µs per request by function ("dso symbol", JavaScript without its line and column, so two builds' functions compare). */
type Costs = Map<string, number>;

/** Which part of the process a sampled function belongs to. */
function groupOf(fn: string): string {
  const [dso = '', ...rest] = fn.split(' ');
  const sym = rest.join(' ');
  if (dso === 'JIT') {
    if (/(^|[\s/])dist\//.test(sym)) return "broker's code (dist/)";
    if (/(^|[\s/])node_modules\//.test(sym)) return 'Fastify and other dependencies';
    if (sym.includes('node:')) return "Node's JavaScript";
    return 'other JIT code';
  }
  if (dso.includes('kernel')) return 'kernel';
  if (dso === 'node') {
    if (/Heap|Scaveng|Marking|Evacuat|Sweep|GC/.test(sym)) return 'V8 garbage collection';
    if (sym.startsWith('Builtins_')) return 'V8 builtins';
    return 'V8 and Node native code';
  }
  return 'libc and other libraries';
}

/** `perf report` of one data file, as µs per request by function. */
function parseReport(text: string, requests: number): Costs {
  const out: Costs = new Map();
  for (const line of text.split('\n')) {
    // "  2.61%   934  [kernel.kallsyms]  [k] _raw_spin_unlock_irqrestore", "... [JIT] tid 123  [.] JS:*answer file:///x/dist/a.js:9:20"
    const m = /^\s*[\d.]+%\s+(\d+)\s+(\[JIT\] tid \d+|\S+)\s+\[.\]\s+(.*)$/.exec(line);
    if (!m) continue;
    // perf inject --jit names each JIT-compiled function's code jitted-<pid>-<n>.so.
    const dso = (m[2] ?? '').startsWith('[JIT]') || /^jitted-\d+-\d+\.so$/.test(m[2] ?? '') ? 'JIT' : (m[2] ?? '');
    const sym = (m[3] ?? '')
      .trim()
      .replace(/^(JS:|LazyCompile:)?[*~^]?/, '')
      .replace(/(?:file:\/\/)?\/\S*?\/(dist|node_modules)\//, '$1/')
      .replace(/:\d+:\d+$/, '');
    const key = `${dso} ${sym}`;
    out.set(key, (out.get(key) ?? 0) + (Number(m[1]) * 1e6) / HZ / requests);
  }
  return out;
}

function byGroup(c: Costs): Map<string, number> {
  const out = new Map<string, number>();
  for (const [fn, us] of c) out.set(groupOf(fn), (out.get(groupOf(fn)) ?? 0) + us);
  return out;
}

const f2 = (x: number | undefined) => (x ?? 0).toFixed(2);
const total = (c: Costs) => [...c.values()].reduce((a, b) => a + b, 0);

/** One profile: by group, then its dearest functions. */
function alone(label: string, c: Costs, top: number): string {
  const g = [...byGroup(c)].sort((x, y) => y[1] - x[1]);
  const lines = [`| µs per request | ${label} |`, '|---|---:|', ...g.map(([k, v]) => `| ${k} | ${f2(v)} |`), `| all sampled | ${f2(total(c))} |`, ''];
  lines.push(`| function (the ${top} dearest) | ${label} |`, '|---|---:|');
  for (const [fn, us] of [...c].sort((x, y) => y[1] - x[1]).slice(0, top)) lines.push(`| ${fn.replace(/\|/g, '\\|').slice(0, 120)} | ${f2(us)} |`);
  return lines.join('\n');
}

/** Two profiles side by side: by group, then the functions that differ most. */
function compare(labelA: string, a: Costs, labelB: string, b: Costs, top: number): string {
  const ga = byGroup(a);
  const gb = byGroup(b);
  const groups = [...new Set([...ga.keys(), ...gb.keys()])].sort((x, y) => (gb.get(y) ?? 0) + (ga.get(y) ?? 0) - (gb.get(x) ?? 0) - (ga.get(x) ?? 0));
  const lines = [`| µs per request | ${labelA} | ${labelB} | difference |`, '|---|---:|---:|---:|'];
  for (const g of groups) lines.push(`| ${g} | ${f2(ga.get(g))} | ${f2(gb.get(g))} | ${f2((gb.get(g) ?? 0) - (ga.get(g) ?? 0))} |`);
  lines.push(`| all sampled | ${f2(total(a))} | ${f2(total(b))} | ${f2(total(b) - total(a))} |`, '');
  const fns = [...new Set([...a.keys(), ...b.keys()])].map((fn) => ({ fn, d: (b.get(fn) ?? 0) - (a.get(fn) ?? 0) }));
  fns.sort((x, y) => Math.abs(y.d) - Math.abs(x.d));
  lines.push(`| function (the ${top} that differ most) | ${labelA} | ${labelB} | difference |`, '|---|---:|---:|---:|');
  for (const { fn, d } of fns.slice(0, top)) lines.push(`| ${fn.replace(/\|/g, '\\|').slice(0, 120)} | ${f2(a.get(fn))} | ${f2(b.get(fn))} | ${d >= 0 ? '+' : ''}${f2(d)} |`);
  return lines.join('\n');
}

async function main(): Promise<void> {
  const dirs = process.argv.slice(2);
  if (dirs.length < 1 || dirs.length > 2) throw new Error('usage: npm run bench:profile -- <checkout A> [<checkout B>]');
  for (const c of CASES) if (!NAMED_CASES[c]) throw new Error(`PROFILE_CASES: unknown case ${c} (known: ${Object.keys(NAMED_CASES).join(', ')})`);
  if (spawnSync('perf', ['--version']).status !== 0) throw new Error('perf is not installed (Debian: apt-get install linux-perf)');
  const out = process.env['PROFILE_DIR'] ?? fs.mkdtempSync(path.join(os.tmpdir(), 'cab-profile-'));
  fs.mkdirSync(out, { recursive: true });
  // JIT-compiled functions by name: V8 writes jit-<pid>.dump in the process's working
  // directory (out), which perf inject --jit turns into jitted-<pid>-<n>.so files there.
  process.env['BENCH_NODE_ARGS'] = `${process.env['BENCH_NODE_ARGS'] ?? ''} --perf-prof`.trim();
  const pg = await startTestPostgres();
  const builds: Array<{ name: string; prod: Production; mod: typeof ProductionModule }> = [];
  /** Each production process's working directory: where its jit dump (and what perf inject makes of it) lands. */
  const cwds = new Map<number, string>();
  try {
    for (const [i, dir] of dirs.entries()) {
      const mod = (await import(pathToFileURL(path.resolve(dir, 'bench/production.ts')).href)) as typeof ProductionModule;
      builds.push({ name: dirs.length === 1 ? dir : `${'AB'[i]} (${dir})`, mod, prod: await mod.startProduction(await pg.newDatabase(), CLIENTS, LOADED_CLIENTS, { inProcessBare: true, cwd: out }) });
      const b = builds.at(-1);
      if (b) cwds.set(b.prod.pid, fs.readlinkSync(`/proc/${b.prod.pid}/cwd`));
    }
    const profiles = new Map<string, Costs[]>();
    for (const c of CASES) {
      const spec = NAMED_CASES[c] as (typeof NAMED_CASES)[string];
      const load = (p: Production, seconds: number) => autocannon({ url: spec.bare ? (p.inProcessBare ?? '') : p.base, connections: 25, duration: seconds, requests: [spec.spec(p.clients)] });
      await Promise.all(builds.map((b) => load(b.prod, 2)));
      const files = builds.map((_, i) => path.join(out, `${c}-${i}.data`));
      const perf = builds.map((b, i) => spawn('perf', ['record', '-k', 'mono', '-e', 'cpu-clock', '-F', String(HZ), '-g', '-o', files[i] as string, '-p', String(b.prod.pid)], { stdio: 'ignore' }));
      // perf attaches within a few ms; the window starts after it has.
      await new Promise((r) => setTimeout(r, 300));
      const results = await Promise.all(builds.map((b) => load(b.prod, SECONDS)));
      for (const p of perf) p.kill('SIGINT');
      await Promise.all(perf.map((p) => new Promise((r) => p.once('exit', r))));
      const costs = builds.map((_, i) => {
        const res = results[i] as Awaited<ReturnType<typeof autocannon>>;
        const bad = Object.keys(res.statusCodeStats).filter((s) => s !== '200' && s !== '304');
        if (bad.length || res.errors) throw new Error(`case ${c}: ${builds[i]?.name} answered ${bad.join(', ')} (${res.errors} errors)`);
        const jitted = `${files[i] as string}.jit`;
        const inject = spawnSync('perf', ['inject', '--jit', '-i', files[i] as string, '-o', jitted], { encoding: 'utf8' });
        if (inject.status !== 0) throw new Error(`perf inject --jit ${files[i]}: ${inject.stderr}`);
        const report = spawnSync('perf', ['report', '-i', jitted, '--stdio', '--no-children', '--sort', 'dso,sym', '-g', 'none', '-n', '--percent-limit', '0'], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
        if (report.status !== 0) throw new Error(`perf report ${files[i]}: ${report.stderr}`);
        return parseReport(report.stdout, res.requests.total);
      });
      profiles.set(c, costs);
      console.log(`\n## ${c}\n`);
      if (builds.length === 2) console.log(compare('A', costs[0] as Costs, 'B', costs[1] as Costs, TOP));
      else if (c !== 'bare' && profiles.has('bare')) console.log(compare('bare route in the process', (profiles.get('bare') as Costs[])[0] as Costs, c, costs[0] as Costs, TOP));
      else console.log(alone(c, costs[0] as Costs, TOP));
    }
  } finally {
    for (const b of builds) {
      await b.prod.stop();
      // What V8 and perf inject left in a working directory that is not ours (an older checkout's own).
      const dir = cwds.get(b.prod.pid);
      if (dir !== undefined && dir !== out) {
        for (const f of fs.readdirSync(dir)) if (f === `jit-${b.prod.pid}.dump` || f.startsWith(`jitted-${b.prod.pid}-`) || (f.startsWith('isolate-') && f.includes(`-${b.prod.pid}-`))) fs.rmSync(path.join(dir, f), { force: true });
      }
    }
    await pg.stop();
    // A directory the caller named is theirs; the one made here goes unless kept.
    if (process.env['PROFILE_DIR'] || process.env['PROFILE_KEEP'] === '1') console.log(`perf data: ${out}`);
    else fs.rmSync(out, { recursive: true, force: true });
  }
  console.log(`\n${builds.map((b) => b.name).join(' and ')}; ${SECONDS} s per case, loaded at the same moments; perf ${HZ} Hz, cpu-clock.`);
}

await main();
