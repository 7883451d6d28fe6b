import { strict as assert } from 'node:assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { freshBuild } from './helpers/cli.js';
import { tempDirs } from './helpers/tmp.js';

// The helper that lets the tests spawn dist/cli.js instead of the source through tsx: a
// stale or unasked-for build must never be what a test runs.
const tmp = tempDirs('cab-cli-helper-');

function checkout(): { root: string; source: string; compiled: string } {
  const root = tmp();
  fs.mkdirSync(path.join(root, 'src', 'routes'), { recursive: true });
  fs.mkdirSync(path.join(root, 'dist'));
  const source = path.join(root, 'src', 'routes', 'page.ts');
  const compiled = path.join(root, 'dist', 'cli.js');
  fs.writeFileSync(path.join(root, 'src', 'cli.ts'), '');
  fs.writeFileSync(source, '');
  fs.writeFileSync(compiled, '');
  const built = new Date(Date.now() - 60_000);
  for (const f of [path.join(root, 'src', 'cli.ts'), source]) fs.utimesSync(f, new Date(built.getTime() - 60_000), new Date(built.getTime() - 60_000));
  fs.utimesSync(compiled, built, built);
  return { root, source, compiled };
}

test('the tests run dist/cli.js only when npm test asks for it and it is newer than every source file', () => {
  const { root, source, compiled } = checkout();
  const asked = { CODEX_AUTH_BROKER_TEST_DIST: '1' };
  assert.equal(freshBuild(root, asked), compiled, 'asked for, and built after the last change');
  assert.equal(freshBuild(root, {}), undefined, 'not asked for (a file run alone): the source');
  fs.utimesSync(source, new Date(), new Date());
  assert.equal(freshBuild(root, asked), undefined, 'a source file (in a subdirectory) changed after the build: the source');
  fs.rmSync(compiled);
  assert.equal(freshBuild(root, asked), undefined, 'no build: the source');
});
