import { readFileSync } from 'node:fs';
import { getHeapStatistics } from 'node:v8';

/** Out of file descriptors, for this process (EMFILE) or the whole system (ENFILE). */
export function isFdExhaustion(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return code === 'EMFILE' || code === 'ENFILE';
}

/** The soft limit on open files (`ulimit -n`), where /proc tells it (Linux); undefined elsewhere or when unlimited. */
export function openFileLimit(limitsFile = '/proc/self/limits'): number | undefined {
  let text: string;
  try {
    text = readFileSync(limitsFile, 'utf8');
  } catch {
    return undefined;
  }
  const m = /^Max open files\s+(\d+)/m.exec(text);
  return m ? Number(m[1]) : undefined;
}

/**
 * Descriptors kept back from client sockets: the database pool, upstream connections, the
 * journal file, the embedded Postgres's pipes, and libuv's own. The broker's credential
 * work must never be the thing that cannot open a file.
 */
export const FD_RESERVE = 64;

/** MAX_CONNECTIONS, lowered if needed so that client sockets alone cannot take every descriptor. */
export function connectionCap(maxConnections: number, fdLimit: number | undefined): number {
  if (fdLimit === undefined) return maxConnections;
  return Math.max(1, Math.min(maxConnections, fdLimit - FD_RESERVE));
}

/**
 * process.memoryUsage() opens /proc/self/stat for the resident size, so with every
 * descriptor taken it throws EMFILE. @fastify/under-pressure calls it from a timer: the
 * throw would be an uncaught exception, and its sampling would stop for good (the timer
 * re-arms only after a sample that returned). Answer with the last good resident size and
 * the current heap (which needs no file) instead, and report the exhaustion.
 * Returns a function that puts the original back.
 */
export function guardMemoryUsage(proc: Pick<NodeJS.Process, 'memoryUsage'>, onExhausted: (err: Error) => void): () => void {
  const original = proc.memoryUsage;
  let last: NodeJS.MemoryUsage | undefined;
  const fallback = (err: unknown): NodeJS.MemoryUsage => {
    if (!isFdExhaustion(err)) throw err;
    onExhausted(err as Error);
    const heap = getHeapStatistics();
    return {
      rss: last?.rss ?? 0,
      heapTotal: heap.total_heap_size,
      heapUsed: heap.used_heap_size,
      external: last?.external ?? 0,
      arrayBuffers: last?.arrayBuffers ?? 0,
    };
  };
  const guarded = Object.assign(
    (): NodeJS.MemoryUsage => {
      try {
        return (last = original.call(proc));
      } catch (err) {
        return fallback(err);
      }
    },
    {
      rss: (): number => {
        try {
          return original.rss();
        } catch (err) {
          return fallback(err).rss;
        }
      },
    },
  );
  proc.memoryUsage = guarded;
  return () => {
    if (proc.memoryUsage === guarded) proc.memoryUsage = original;
  };
}
