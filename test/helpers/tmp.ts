import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after } from 'node:test';

/**
 * A maker of fresh temporary directories (mode 0700, as mkdtemp makes them) named with
 * the prefix, all removed when the calling test file ends.
 */
export function tempDirs(prefix: string): () => string {
  const made: string[] = [];
  after(() => {
    for (const d of made) fs.rmSync(d, { recursive: true, force: true });
  });
  return () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
    made.push(d);
    return d;
  };
}
