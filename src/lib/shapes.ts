import { createHook } from 'node:async_hooks';
import type { ServerResponse } from 'node:http';
import { Socket } from 'node:net';
import { http } from './node-http.js';

/**
 * How many of each object `settleRequestShapes` builds: more than V8's slack-tracking
 * window (it sizes a constructor's objects after its first 7 constructions).
 */
const SETTLE_CONSTRUCTIONS = 16;

/**
 * Let V8 size Node's per-connection and per-request objects (net.Socket, IncomingMessage,
 * ServerResponse) from objects that are alive, before the process serves anything.
 *
 * V8 gives a constructor's objects room for their properties inside the object ("in-object
 * slack tracking"): after the first few constructions, or when it optimizes code that
 * constructs them, it keeps as many in-object slots as the objects built so far used. It
 * reads that from the hidden classes those objects left behind, and a full GC drops the
 * hidden classes of objects already collected. So when the moment comes after a GC that
 * collected every earlier response (a broker answers a few probes, loads 10,000 clients,
 * and only then takes load), V8 sees nothing used and keeps no in-object slot at all.
 * Every later ServerResponse and Socket then holds its 40-odd properties outside the
 * object, and the symbol-keyed ones push it past V8's limit for keyed stores: each one is
 * turned into a dictionary, property by property. Such a process costs about 1.4x the CPU
 * per request on every route, for its whole life; about 1 start in 5 on this project's
 * benchmark (BENCHMARKS.md, history, session 17).
 *
 * Building a few of each here, all alive at once, ends the sizing with their hidden
 * classes in place, so the objects keep most of their properties in-object (a
 * ServerResponse 43, a request 26, a socket 30, against 44, 28 and 37 in a process where
 * the timing went well; the rest stay fast, outside the object). Nothing is listened on,
 * connected or written; the objects are garbage on return. (With Node's `node.http` trace
 * events on, each response built here opens an `http.server.request` trace span that never
 * ends: 16 in the trace, nothing else.)
 */
export function settleRequestShapes(): void {
  const alive: unknown[] = [];
  for (let i = 0; i < SETTLE_CONSTRUCTIONS; i++) {
    const socket = new Socket();
    const req = new http.IncomingMessage(socket);
    // What the HTTP parser sets on a request before the server builds its response.
    req.method = 'GET';
    req.httpVersionMajor = 1;
    req.httpVersionMinor = 1;
    const res = new http.ServerResponse(req);
    // What the server and writeHead set on a response after building it: V8 counts these
    // among the slots used, so they too stay in the object.
    res.shouldKeepAlive = true;
    (res as ServerResponse & { _maxRequestsPerSocket: number })._maxRequestsPerSocket = 0;
    res.statusCode = 200;
    res.statusMessage = 'OK';
    alive.push(socket, req, res);
  }
}

/** The tick object holdTickObjects keeps: alive for the life of the process. */
let heldTick: object | undefined;

/**
 * Keep one of Node's tick objects (what `process.nextTick` queues) alive for the life of
 * the process, so that the hidden classes of every tick object stay alive with it.
 *
 * `process.nextTick` builds each tick object with a literal whose keys are computed
 * (`{ [async_id_symbol]: …, [trigger_async_id_symbol]: …, callback, args }`, and on Node 22
 * and later an async context frame): V8 adds those properties one by one, each store an
 * inline cache that follows a hidden-class transition. The hidden classes along that chain
 * are held only weakly (by the transitions and the caches), so a full GC at a moment when no
 * tick object is alive (tick objects live for microseconds: an idle process between two
 * requests) collects them, and the next tick builds new ones. Each time, the caches of the
 * second and later stores see one more hidden class; past four they give up
 * (megamorphic) and every later tick object is built by V8's runtime instead of by
 * compiled code, for the life of the process: about 2.5 µs more per request on every route
 * (4-5 ticks per request), in about 1 start in 3 on this project's benchmark (BENCHMARKS.md,
 * history, session 19).
 *
 * A held tick object keeps the last hidden class of the chain alive, and with it every
 * class before it (a hidden class holds its predecessor strongly). Its two async ids are
 * then set to a fraction: V8 widens those two fields from small integers to numbers once,
 * here, as it otherwise does at some later moment (it had in every process whose hidden
 * classes were logged here); widened later, the chain would be replaced by one this object
 * does not hold. The object is taken from Node itself (an async_hooks init hook around one
 * nextTick), so it is whatever shape this Node's tick objects have. Resolves once the tick
 * has run.
 */
export function holdTickObjects(): Promise<void> {
  if (heldTick !== undefined) return Promise.resolve();
  return new Promise<void>((resolve) => {
    let tick: Record<symbol, unknown> | undefined;
    const callback = (): void => {
      // Run: Node has read the ids it needed (it keeps its own copies until the tick ends).
      if (tick !== undefined) {
        const ids = Object.getOwnPropertySymbols(tick).filter((s) => s.description === 'async_id_symbol' || s.description === 'trigger_async_id_symbol');
        for (const id of ids) tick[id] = 0.5;
        heldTick = tick;
      }
      resolve();
    };
    const hook = createHook({
      init(_id, type, _trigger, resource) {
        if (type === 'TickObject' && (resource as { callback?: unknown }).callback === callback) tick = resource as Record<symbol, unknown>;
      },
    });
    hook.enable();
    try {
      process.nextTick(callback);
    } finally {
      hook.disable();
    }
  });
}
