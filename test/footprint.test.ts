/**
 * What the broker's process loads, and so holds in memory for its whole life (issue #16:
 * RSS with 3 credentials and 10,000 clients). Code that the broker never runs costs heap
 * (its source and bytecode) and resident pages all the same; BENCHMARKS.md (history,
 * session 10) has the figures.
 */
import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, test } from 'node:test';
import { cliArgs } from './helpers/cli.js';

const ROOT = path.resolve(import.meta.dirname, '..');

/** The CommonJS files the CLI's whole static import graph loads (`--help`: every import, then exit). */
function loadedFiles(): string[] {
  const preload = [
    "import { createRequire } from 'node:module';",
    "const cache = createRequire(process.cwd() + '/').cache;",
    "process.on('exit', () => process.stderr.write('\\nLOADED ' + JSON.stringify(Object.keys(cache)) + '\\n'));",
  ].join('\n');
  const r = spawnSync(process.execPath, ['--import', `data:text/javascript,${encodeURIComponent(preload)}`, ...cliArgs(['--help'])], {
    cwd: ROOT,
    encoding: 'utf8',
    timeout: 60_000,
  });
  const line = r.stderr.split('\n').find((l) => l.startsWith('LOADED '));
  assert.ok(line, `no module list from the CLI (status ${r.status}): ${r.stderr.slice(-2000)}`);
  return (JSON.parse(line.slice('LOADED '.length)) as string[]).map((f) => f.split(path.sep).join('/'));
}

function sourceFiles(dir: string): string[] {
  return fs
    .readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile() && e.name.endsWith('.ts'))
    .map((e) => path.join(e.parentPath, e.name));
}

describe('what the broker loads', () => {
  test("the broker process loads undici's client and proxy agent, not the rest of undici (no fetch, WebSocket, EventSource, mock agents or cache stores)", () => {
    const undici = loadedFiles()
      .filter((f) => f.includes('/node_modules/undici/'))
      .map((f) => f.slice(f.indexOf('/node_modules/undici/') + '/node_modules/undici/'.length));
    // What the broker does use (the proof that this looked at the right process).
    for (const used of ['lib/dispatcher/env-http-proxy-agent.js', 'lib/dispatcher/agent.js', 'lib/api/api-request.js']) {
      assert.ok(undici.includes(used), `${used} is not loaded; loaded: ${undici.join(', ')}`);
    }
    assert.ok(!undici.includes('index.js'), "undici's index (all of undici) is loaded");
    const unused = undici.filter((f) => /^lib\/(web|mock|cache|interceptor)\//.test(f));
    assert.deepEqual(unused, [], 'parts of undici the broker never uses are loaded');
  });

  test("the broker imports jose's decodeJwt alone (jose/jwt/decode), not jose's index", () => {
    const offenders = sourceFiles(path.join(ROOT, 'src')).filter((f) => /from ['"]jose['"]/.test(fs.readFileSync(f, 'utf8')));
    assert.deepEqual(offenders.map((f) => path.relative(ROOT, f)), []);
    const users = sourceFiles(path.join(ROOT, 'src')).filter((f) => /from ['"]jose\/jwt\/decode['"]/.test(fs.readFileSync(f, 'utf8')));
    assert.ok(users.length > 0, 'no source file imports jose/jwt/decode: the test looked in the wrong place');
  });
});
