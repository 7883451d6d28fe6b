import type { FastifyBaseLogger } from 'fastify';
import type { Bindings, ChildLoggerOptions } from 'pino';

type Level = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
const LEVELS: readonly Level[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

/**
 * A request's logger that becomes a real pino child (with the request id bound) only when
 * something logs. Fastify builds one per request; pino's child() with redaction was a
 * measurable share of the hot path (see BENCHMARKS.md), and almost no request logs.
 */
class LazyChildLogger {
  readonly #parent: FastifyBaseLogger;
  readonly #bindings: Bindings;
  readonly #opts: ChildLoggerOptions;
  #child: FastifyBaseLogger | undefined;

  constructor(parent: FastifyBaseLogger, bindings: Bindings, opts: ChildLoggerOptions) {
    this.#parent = parent;
    this.#bindings = bindings;
    this.#opts = opts;
  }

  get real(): FastifyBaseLogger {
    this.#child ??= this.#parent.child(this.#bindings, this.#opts);
    return this.#child;
  }

  get level(): string {
    return this.#child ? this.#child.level : (this.#opts.level ?? this.#parent.level);
  }

  set level(value: string) {
    this.real.level = value;
  }

  child(bindings: Bindings, opts?: ChildLoggerOptions): FastifyBaseLogger {
    return this.real.child(bindings, opts);
  }
}

for (const level of LEVELS) {
  Object.defineProperty(LazyChildLogger.prototype, level, {
    value: function (this: LazyChildLogger, ...args: unknown[]) {
      const real = this.real as unknown as Record<Level, (...a: unknown[]) => void>;
      real[level](...args);
    },
  });
}

/** Fastify's childLoggerFactory: a lazy child per request. */
export function lazyChildLoggerFactory(logger: FastifyBaseLogger, bindings: Bindings, opts: ChildLoggerOptions): FastifyBaseLogger {
  return new LazyChildLogger(logger, bindings, opts) as unknown as FastifyBaseLogger;
}

/**
 * Request ids unique per process without a random UUID per request: a random prefix per
 * process (replicas never collide in practice) and a counter.
 */
export function requestIdGenerator(): () => string {
  const prefix = `${Math.random().toString(36).slice(2, 10).padEnd(8, '0')}-`;
  let n = 0;
  // A concatenation of two strings, not a template: a template's parts are each converted to a string per call.
  return () => prefix + (++n).toString(36);
}
