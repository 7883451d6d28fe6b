/**
 * What the bench server's process costs before it serves anything: node + the tsx loader +
 * the modules bench/server.ts imports, after a full GC. Lets BENCHMARKS.md separate the
 * harness from the broker in the RSS figures. Prints one JSON line.
 */
import '../test/helpers/app.js';
import '../test/helpers/fake-upstream.js';
import 'fastify';

const g = (globalThis as { gc?: () => void }).gc;
g?.();
process.stdout.write(`${JSON.stringify(process.memoryUsage())}\n`);
