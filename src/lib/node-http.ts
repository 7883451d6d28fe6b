import type * as Http from 'node:http';
import { createRequire } from 'node:module';

/**
 * node:http, loaded through require. On Node 22 (the image), an ES-module import of node:http
 * builds its named exports by reading every property of the module, `http.WebSocket`,
 * `CloseEvent` and `MessageEvent` among them: lazy getters that load Node's bundled undici
 * (fetch, WebSocket, the web streams), which the broker never uses, for the process's whole
 * life (about 6 MB of RSS; BENCHMARKS.md, history, session 17). require reads nothing until
 * asked. Type-only imports of node:http are erased and cost nothing; values come from here
 * (test/footprint.test.ts checks that no source imports them from node:http itself).
 */
export const http = createRequire(import.meta.url)('node:http') as typeof Http;
