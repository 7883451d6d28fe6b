#!/usr/bin/env node
// `npx codex-auth-broker …`, in a checkout after `npm ci` and in the image alike. A checkout
// runs the TypeScript source through tsx (a dev dependency), so a stale dist/ is never run
// by mistake; the image has no src/ and runs the compiled dist/. Either way the CLI runs in
// this same process, so signals reach the broker itself.
import { existsSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const source = `${root}src/cli.ts`;
const compiled = `${root}dist/cli.js`;

async function tsx() {
  try {
    return (await import('tsx/esm/api')).register;
  } catch {
    return undefined;
  }
}

const register = existsSync(source) ? await tsx() : undefined;
if (register) {
  register();
  await import(pathToFileURL(source).href);
} else if (existsSync(compiled)) {
  await import(pathToFileURL(compiled).href);
} else {
  console.error('codex-auth-broker: run `npm ci` first (it installs tsx, which runs the source), or `npm run build`');
  process.exit(1);
}
