import * as fs from 'node:fs';
import * as path from 'node:path';

const ROOT = path.resolve(import.meta.dirname, '..', '..');
const SOURCE_CLI = path.join(ROOT, 'src', 'cli.ts');

/** The newest modification time of any file under dir (recursively). */
function newestMtime(dir: string): number {
  let newest = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) newest = Math.max(newest, fs.statSync(path.join(e.parentPath, e.name)).mtimeMs);
  }
  return newest;
}

/**
 * root/dist/cli.js when `npm test` asked for it (CODEX_AUTH_BROKER_TEST_DIST=1, set right
 * after its `npm run build`) and it is newer than every file under root/src; otherwise
 * undefined. tsc rewrites every output file, so an older dist/cli.js means a source changed
 * since the build: the tests then run the source, never a stale build.
 */
export function freshBuild(root: string, env: NodeJS.ProcessEnv): string | undefined {
  const compiled = path.join(root, 'dist', 'cli.js');
  if (env['CODEX_AUTH_BROKER_TEST_DIST'] !== '1' || !fs.existsSync(compiled)) return undefined;
  return fs.statSync(compiled).mtimeMs >= newestMtime(path.join(root, 'src')) ? compiled : undefined;
}

const BUILT = freshBuild(ROOT, process.env);

/**
 * The arguments after `node` that run the CLI (`codex-auth-broker <args>`) as its own
 * process. A checkout runs src/cli.ts through tsx, seconds of transpiling per process on a
 * loaded machine; under `npm test` the fresh dist/ build of the same source runs instead
 * (the image runs that build too). The README's commands (test/readme.test.ts) and
 * `npm start` (test/cli.test.ts) still go through the launcher and tsx, as a user's do.
 */
export function cliArgs(args: readonly string[] = []): string[] {
  return BUILT ? [BUILT, ...args] : sourceCliArgs(args);
}

/** The CLI from its source through tsx, whatever `npm test` built. */
export function sourceCliArgs(args: readonly string[] = []): string[] {
  return ['--import', 'tsx', SOURCE_CLI, ...args];
}

/** The fresh dist/ that `npm test` built (undefined when the tests run the source). */
export function builtDist(): string | undefined {
  return BUILT ? path.dirname(BUILT) : undefined;
}
