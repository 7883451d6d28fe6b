import { randomBytes } from 'node:crypto';
import { mkdir, open as openFile, readFile, rename, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { open, seal } from './lib/secret-crypto.js';

export interface JournalEntry {
  secretKey: string;
  /** The row's bytes as read before the POST: the compare-and-set guard for recovery. */
  expectedRaw: Buffer;
  /** The rotated document. */
  plaintext: string;
  at: string;
}

async function fsyncDir(dir: string): Promise<void> {
  const fh = await openFile(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * The rotated credential, on local disk, encrypted, before the write-back: the upstream
 * has already burned the old refresh token, so a crash between its answer and the
 * database write would otherwise lose the only valid one. One entry per secret key,
 * replaced atomically (temp file, fsync, rename, fsync of the directory).
 */
export class RotationJournal {
  readonly #dir: string;
  readonly #key: Buffer;

  constructor(dir: string, key: Buffer) {
    this.#dir = resolve(dir);
    this.#key = key;
  }

  #file(secretKey: string): string {
    return join(this.#dir, `rotation-journal.${secretKey.replace(/[^A-Za-z0-9_.-]/g, '_')}.bin`);
  }

  async write(e: JournalEntry): Promise<void> {
    await mkdir(this.#dir, { recursive: true, mode: 0o755 });
    const body = JSON.stringify({ secretKey: e.secretKey, expectedRaw: e.expectedRaw.toString('base64'), plaintext: e.plaintext, at: e.at });
    const sealed = seal(Buffer.from(body, 'utf8'), this.#key);
    const file = this.#file(e.secretKey);
    const tmp = `${file}.${randomBytes(6).toString('hex')}.tmp`;
    const fh = await openFile(tmp, 'wx', 0o600);
    try {
      await fh.writeFile(sealed.bytes);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
    await fsyncDir(this.#dir);
  }

  async read(secretKey: string): Promise<JournalEntry | undefined> {
    let bytes: Buffer;
    try {
      bytes = await readFile(this.#file(secretKey));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    const o = JSON.parse(open(bytes, 1, this.#key).toString('utf8')) as { secretKey: string; expectedRaw: string; plaintext: string; at: string };
    return { secretKey: o.secretKey, expectedRaw: Buffer.from(o.expectedRaw, 'base64'), plaintext: o.plaintext, at: o.at };
  }

  async clear(secretKey: string): Promise<void> {
    await rm(this.#file(secretKey), { force: true });
    await fsyncDir(this.#dir).catch(() => undefined);
  }
}
