// The bare Fastify route inside the broker's own process, for `npm run bench` only: the
// bench starts the production process with `node --import bench/in-process-bare.mjs` (the
// image never does). It serves exactly what bench/server.ts's limit serves, from the same
// heap, V8 flags, timers and 10,000 clients as the broker's routes; so a case's CPU against
// this row is what the broker's route adds, and this row against the standalone bare route
// is what the process itself costs per request (see BENCHMARKS.md, "Process and route").
// Plain JavaScript: the production process runs dist/ without a TypeScript loader.
import * as fs from 'node:fs';
import Fastify from 'fastify';

const portFile = process.env.BENCH_IN_PROCESS_BARE_FILE;
if (portFile) {
  let body = '';
  const bare = Fastify({ logger: false });
  bare.get('/codex-auth', async (_req, reply) => reply.type('application/json; charset=utf-8').send(body));
  // The bench sets the body once, to the auth.json the broker serves.
  bare.put('/body', async (req, reply) => {
    body = String(req.body);
    return reply.code(204).send();
  });
  await bare.listen({ port: 0, host: '127.0.0.1' });
  // Never what keeps the broker's process alive after SIGTERM.
  bare.server.unref();
  fs.writeFileSync(portFile, String(bare.server.address().port));
}
