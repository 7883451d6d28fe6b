import { Writable } from 'node:stream';
import { createLogger, type Logger } from '../../src/logger.js';

/** A logger whose every line is kept, so a test can prove that no token ever reached a log. */
export class LogCapture {
  readonly lines: string[] = [];
  readonly logger: Logger;
  constructor(level = 'debug') {
    const lines = this.lines;
    const sink = new Writable({
      write(chunk: Buffer, _enc, cb) {
        for (const l of chunk.toString('utf8').split('\n')) if (l.trim() !== '') lines.push(l);
        cb();
      },
    });
    this.logger = createLogger(level, sink);
  }

  events(): Array<Record<string, unknown>> {
    return this.lines.map((l) => JSON.parse(l) as Record<string, unknown>);
  }

  /** Lines with this `event` field. */
  withEvent(event: string): Array<Record<string, unknown>> {
    return this.events().filter((e) => e['event'] === event);
  }
}

/** Every secret value (or a 16-char slice of it) that appears in any of the texts. */
export function findLeaks(texts: Iterable<string>, secrets: Iterable<string>): string[] {
  const needles = [...new Set([...secrets].filter((s) => s.length >= 16))];
  const leaks: string[] = [];
  for (const text of texts) {
    for (const s of needles) {
      // A JWT's header is common to every token; look for the distinctive tail.
      const probe = s.length > 40 ? s.slice(-32) : s;
      if (text.includes(probe)) leaks.push(`${s.slice(0, 6)}… in: ${text.slice(0, 120)}`);
    }
  }
  return leaks;
}

/** Every secret that shares a substring of `len` characters or more with the text (a prefix shown in a list, say). */
export function findSlices(text: string, secrets: Iterable<string>, len = 6): string[] {
  const hits: string[] = [];
  for (const s of secrets) {
    for (let i = 0; i + len <= s.length; i++) {
      if (text.includes(s.slice(i, i + len))) {
        hits.push(`${s.slice(i, i + len)} (offset ${i})`);
        break;
      }
    }
  }
  return hits;
}
