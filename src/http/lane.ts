import type { IncomingMessage, Server, ServerOptions as HttpServerOptions, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import { Readable } from 'node:stream';
import { http } from '../lib/node-http.js';

/**
 * Answers one request of a hot GET route, or declines with 0 so Fastify answers it. It
 * writes the response itself and returns its status code. `t0`: performance.now() when
 * the lane took the request (the request-duration metric's start), for a route that needs
 * the time (see lib/time.ts, wallClock).
 */
export type LaneRoute = (req: IncomingMessage, res: ServerResponse, t0: number) => number;
/** The same, given the one path parameter as it appears in the URL (not decoded: a route declines anything it does not accept verbatim). */
export type ParamLaneRoute = (req: IncomingMessage, res: ServerResponse, param: string, t0: number) => number;
/** The same for a POST route, given the whole body as the client sent it. */
export type BodyLaneRoute = (req: IncomingMessage, res: ServerResponse, body: Buffer) => number;

/** Node's own response (not a subclass that writes differently, like light-my-request's for inject()). */
const NODE_RESPONSE = http.ServerResponse.prototype;
/** What writeAnswer reads of a response that Node's typings leave out (its internals). */
type HeldHeader = ServerResponse & { _header?: unknown; _headerSent?: unknown; _hasBody?: unknown };

/**
 * Send a whole answer: the status, the header lines (a flat list of names and values, with
 * the body's content-length) and the body, with `latin1` when the body is ASCII (its
 * Latin-1 bytes are its UTF-8 bytes: Node copies the characters instead of encoding them).
 *
 * `res.end(body)` on Node 20 and 22 corks the socket and queues two writes (the header
 * lines with the body, then an empty one that carries the end), which the uncork sends as
 * one writev: two queue entries, a chunk list and a native buffer the writev copies both
 * into, per request. Node keeps a response's header lines as a string until its first
 * write and sends them joined with it (`_header`, which writeHead sets; the same on Node 20
 * to 26): an ASCII body joined to them there, and an end() with no body, go out as one
 * plain write of one string, as a 304 (no body) always has. Node 24 and 26 send `end(body)`
 * that way themselves. Only Node's own ServerResponse, only an ASCII body, only while the header
 * lines are still a string not yet sent, and only where Node would send the body as it is
 * (the response has a body: not HEAD, 204 or 304; a content-length, so no chunked framing;
 * no strictContentLength check); otherwise `end(body)` as before.
 */
export function writeAnswer(res: ServerResponse, status: number, headers: string[], body: string, ascii: boolean): void {
  res.writeHead(status, headers);
  const held = res as HeldHeader;
  if (
    ascii &&
    Object.getPrototypeOf(res) === NODE_RESPONSE &&
    typeof held._header === 'string' &&
    held._headerSent === false &&
    held._hasBody === true &&
    !res.chunkedEncoding &&
    !res.strictContentLength
  ) {
    held._header += body;
    res.end();
  } else res.end(body, ascii ? 'latin1' : 'utf8');
}

/**
 * A number's decimal text, converted again only when the number changes: a header value
 * that is usually the same number (a content-length) is then a string Node neither
 * converts for its header check nor again for the header line.
 */
export function digits(): (n: number) => string {
  let last = NaN;
  let text = '';
  return (n) => {
    if (n !== last) {
      text = String(n);
      last = n;
    }
    return text;
  };
}

/** The largest body a POST route of the lane reads itself; a larger one goes to Fastify unread. */
export const LANE_BODY_LIMIT = 4096;
/**
 * What the lane notes on a POST request it takes, when it arrives: Fastify, if the request
 * is declined after the body was read, uses the same arrival (its request id, its start
 * time, its pressure check) and the body the lane read.
 */
const ARRIVAL = Symbol('codex-auth-broker.laneArrival');
interface Arrival {
  /** performance.now() when the request arrived. */
  t0: number;
  /** The request id, drawn when the request arrived (the caller's x-request-id, else the generator's). */
  id: string;
  /** Set once the body was read: the bytes, or the error that ended the read. */
  read?: { body: Buffer | undefined; err: Error | undefined };
}
type WithArrival = IncomingMessage & { [ARRIVAL]?: Arrival };

/** A request-duration series (the metric's cell for one method, route and status). */
export interface DurationCell {
  observe(seconds: number): void;
}
/** The series of one method, route and status. */
export type DurationOf = (method: string, route: string, status: number) => DurationCell;

/**
 * One route of the lane, with the duration series of its two usual answers looked up once
 * (a 200, and a 304 on a GET route) instead of by three labels on every request.
 */
interface Entry<R> {
  method: 'GET' | 'POST';
  /** The exact path, or the Fastify route (the metric's label) of a parameter route. */
  label: string;
  route: R;
  ok: DurationCell | undefined;
  notModified: DurationCell | undefined;
}

interface ServerOptions {
  http?: HttpServerOptions;
  keepAliveTimeout?: number;
  requestTimeout?: number;
  connectionTimeout?: number;
  maxRequestsPerSocket?: number;
}

/**
 * The hot routes' successful answers, served in front of Fastify's router.
 *
 * Every workspace polls GET /codex-auth (or the drop-in route), every probe hits
 * /healthz, and stock codex POSTs its refresh to the shim; Fastify's per-request machinery (its Request and Reply objects, the request's
 * logger, hook runners, the 'finish' listener behind onResponse) was a measured part of
 * what those answers cost (BENCHMARKS.md). The lane answers only the plain success of
 * such a route: an exact path, GET (or a POST route's JSON body, see post()), not
 * shutting down, not under pressure, and whatever the route itself accepts (a known client
 * whose credential is servable). Everything else (a query string, HEAD, a wrong token, a
 * 503, an error) declines and goes through Fastify unchanged, so every error keeps one
 * implementation. What the lane answers
 * carries what Fastify's would: the request id (from x-request-id or the same
 * generator), the same headers and body, and the same request-duration metric.
 */
export class FastLane {
  /** Exact GET paths: a handful, compared in turn (cheaper than hashing each request's URL for a Map). */
  readonly #routes: Array<Entry<ParamLaneRoute>> = [];
  readonly #params: Array<Entry<ParamLaneRoute> & { prefix: string; suffix: string }> = [];
  readonly #posts: Array<Entry<BodyLaneRoute>> = [];
  /** Fastify's own request handler: where a POST whose body the lane read goes when declined. */
  #fastify: ((req: IncomingMessage, res: ServerResponse) => void) | undefined;
  #genReqId: () => string = () => {
    throw new Error('fast lane: not attached');
  };
  #open = true;
  #underPressure: () => boolean = () => true;
  #duration: DurationOf = () => ({ observe: () => undefined });
  /** Requests the lane answered (the rest went to Fastify). */
  answered = 0;

  /** Fastify's serverFactory: Node's HTTP server with Fastify's settings, the lane first. */
  readonly serverFactory = (handler: (req: IncomingMessage, res: ServerResponse) => void, o: ServerOptions): Server => {
    this.#fastify = handler;
    const server = http.createServer(o.http ?? {}, (req, res) => {
      // The connection's inactivity deadline ends with its first request (see below).
      const socket = req.socket;
      if (socket.timeout) socket.setTimeout(0);
      if (!this.serve(req, res)) handler(req, res);
    });
    // What Fastify sets on the server it builds itself (fastify/lib/server.js), but for one:
    if (o.keepAliveTimeout !== undefined) server.keepAliveTimeout = o.keepAliveTimeout;
    if (o.requestTimeout !== undefined) server.requestTimeout = o.requestTimeout;
    if (o.maxRequestsPerSocket !== undefined && o.maxRequestsPerSocket > 0) server.maxRequestsPerSocket = o.maxRequestsPerSocket;
    // Fastify's connectionTimeout, the inactivity deadline of a connection that has not sent a
    // request yet (a connect-and-wait flood; Node 20's headers deadline does not cover a socket
    // that never sends a byte). Fastify gives it to server.setTimeout(), and Node then arms it
    // again as every kept-alive request begins, a timer per request that the request itself
    // must disarm at once (the deadline would otherwise cut an answer that waits on the
    // upstream longer than it). Armed here once per connection instead and disarmed by the
    // first request: a kept-alive connection then has only Node's keep-alive deadline
    // between requests, and no deadline during one but the headers and request deadlines.
    const connectionTimeout = o.connectionTimeout ?? 0;
    if (connectionTimeout > 0) server.on('connection', (socket: Socket) => socket.setTimeout(connectionTimeout));
    return server;
  };

  /**
   * Wire what the app owns: Fastify's request-id generator, the pressure check and the
   * request-duration metric's series. Until then every request goes to Fastify.
   */
  attach(o: { genReqId: () => string; underPressure: () => boolean; duration: DurationOf }): void {
    this.#genReqId = o.genReqId;
    this.#underPressure = o.underPressure;
    this.#duration = o.duration;
    for (const e of [...this.#routes, ...this.#params, ...this.#posts]) {
      e.ok = undefined;
      e.notModified = undefined;
    }
  }

  /** A route of one exact path (no query string). */
  get(path: string, route: LaneRoute): void {
    if (this.#routes.some((e) => e.label === path)) throw new Error(`fast lane: ${path} is already served`);
    // Run as a parameter route whose parameter is '' (one #run for both kinds).
    this.#routes.push({ method: 'GET', label: path, route: (req, res, _param, t0) => route(req, res, t0), ok: undefined, notModified: undefined });
  }

  /** A route with one parameter between a fixed prefix and suffix; `label` is its Fastify route (the metric's label). */
  getParam(label: string, prefix: string, suffix: string, route: ParamLaneRoute): void {
    this.#params.push({ method: 'GET', label, prefix, suffix, route, ok: undefined, notModified: undefined });
  }

  /**
   * A POST route of one exact path whose JSON body the lane reads first: only a request
   * with `content-type: application/json`, a content-length of at most LANE_BODY_LIMIT and
   * no transfer-encoding; anything else goes to Fastify unread. A route that declines after
   * the body was read hands it on: the route's scope must add `replayBody` as a preParsing
   * hook, so Fastify parses the same bytes (or meets the same read error) it would have
   * read from the socket. What Fastify decides when a request arrives is kept from the
   * arrival: the request id (Fastify's genReqId returns arrivalId), the start of the
   * request-duration metric (arrivedAt) and the pressure check (admitted). One thing is
   * not: a request declined after close() began meets Fastify's closing 503, where Fastify
   * alone, having taken it before, would have answered it.
   */
  post(path: string, route: BodyLaneRoute): void {
    if (this.#posts.some((e) => e.label === path)) throw new Error(`fast lane: POST ${path} is already served`);
    this.#posts.push({ method: 'POST', label: path, route, ok: undefined, notModified: undefined });
  }

  /** Fastify preParsing hook for a lane POST route: the body the lane already read, as the payload stream. */
  readonly replayBody = (request: { raw: IncomingMessage }, _reply: unknown, payload: Readable, done: (err: Error | null, payload: Readable) => void): void => {
    const arrival = (request.raw as WithArrival)[ARRIVAL];
    const read = arrival?.read;
    if (arrival === undefined || read === undefined) {
      done(null, payload);
      return;
    }
    arrival.read = undefined;
    const { body, err } = read;
    done(
      null,
      new Readable({
        read() {
          if (err) this.destroy(err);
          else {
            if (body !== undefined && body.length > 0) this.push(body);
            this.push(null);
          }
        },
      }),
    );
  };

  /** From Fastify's preClose on: Fastify answers every request (its 503 while closing). */
  close(): void {
    this.#open = false;
  }

  /** The request id Fastify would give this request: the caller's x-request-id, else the next generated one. (A POST the lane took has its id from arrivalId.) */
  requestId(req: IncomingMessage): string {
    return (req.headers['x-request-id'] as string | undefined) || this.#genReqId();
  }

  /**
   * For Fastify, of a POST request the lane took and then declined: its request id, drawn
   * when it arrived (Fastify's genReqId returns it), so ids keep the order requests arrive in.
   */
  arrivalId(req: IncomingMessage): string | undefined {
    return (req as WithArrival)[ARRIVAL]?.id;
  }

  /** For Fastify's request-duration metric: when a POST request the lane took arrived (Fastify's own clock starts at hand-off, after the body). */
  arrivedAt(req: IncomingMessage): number | undefined {
    return (req as WithArrival)[ARRIVAL]?.t0;
  }

  /** Whether the lane took this request: it was not under pressure when it arrived, so Fastify does not shed it at hand-off either. */
  admitted(req: IncomingMessage): boolean {
    return (req as WithArrival)[ARRIVAL] !== undefined;
  }

  /**
   * Answer the request here, or return false for Fastify to answer it. A fault in a route
   * before it has written anything also goes to Fastify, whose handler meets it again and
   * answers it as every fault is answered (problem+json, logged); never a thrown listener.
   */
  serve(req: IncomingMessage, res: ServerResponse): boolean {
    if (!this.#open) return false;
    if (req.method !== 'GET') return req.method === 'POST' && this.#takePost(req, res);
    const path = req.url as string;
    for (const e of this.#routes) {
      if (e.label === path) {
        if (this.#underPressure()) return false;
        const t0 = performance.now();
        return this.#answered(e, this.#run(e.route, req, res, '', t0), t0);
      }
    }
    for (const p of this.#params) {
      if (path.length > p.prefix.length + p.suffix.length && path.startsWith(p.prefix) && path.endsWith(p.suffix)) {
        if (this.#underPressure()) return false;
        const t0 = performance.now();
        return this.#answered(p, this.#run(p.route, req, res, path.slice(p.prefix.length, path.length - p.suffix.length), t0), t0);
      }
    }
    return false;
  }

  /** Read a POST route's body, then answer or hand the request (and the body) to Fastify. */
  #takePost(req: IncomingMessage, res: ServerResponse): boolean {
    const path = req.url as string;
    let entry: Entry<BodyLaneRoute> | undefined;
    for (const e of this.#posts) if (e.label === path) entry = e;
    const fastify = this.#fastify;
    if (entry === undefined || fastify === undefined) return false;
    const route = entry.route;
    const h = req.headers;
    const length = h['content-length'];
    if (h['content-type'] !== 'application/json' || h['transfer-encoding'] !== undefined || length === undefined || !/^\d{1,4}$/.test(length) || Number(length) > LANE_BODY_LIMIT) return false;
    if (this.#underPressure()) return false;
    const arrival: Arrival = { t0: performance.now(), id: this.requestId(req) };
    (req as WithArrival)[ARRIVAL] = arrival;
    const chunks: Buffer[] = [];
    const onData = (chunk: Buffer) => {
      chunks.push(chunk);
    };
    const onEnd = (err?: Error) => {
      req.off('data', onData);
      req.off('end', onEnd);
      req.off('error', onEnd);
      const body = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks);
      let status = 0;
      // A close that began during the read does not stop the answer: Fastify, reading the
      // body itself, would also answer a request that arrived before close began. (One it
      // declines does meet Fastify's closing 503 now: Fastify decides that at hand-off.)
      if (err === undefined && body !== undefined) {
        try {
          status = route(req, res, body);
        } catch (e) {
          if (res.headersSent) {
            res.destroy(e as Error);
            status = 500;
          }
        }
      }
      if (status !== 0) {
        this.answered++;
        this.#cell(entry, status).observe((performance.now() - arrival.t0) / 1000);
        return;
      }
      // Fastify answers it as if it had read the body itself (replayBody).
      arrival.read = { body, err };
      fastify(req, res);
    };
    req.on('data', onData);
    req.on('end', onEnd);
    req.on('error', onEnd);
    return true;
  }

  #run(route: ParamLaneRoute, req: IncomingMessage, res: ServerResponse, param: string, t0: number): number {
    try {
      return route(req, res, param, t0);
    } catch (err) {
      if (!res.headersSent) return 0;
      // Cannot happen with the routes as written (nothing throws after writeHead); if it
      // ever does, the response is cut rather than left hanging.
      res.destroy(err as Error);
      return 500;
    }
  }

  #answered(e: Entry<unknown>, status: number, t0: number): boolean {
    if (status === 0) return false;
    this.answered++;
    this.#cell(e, status).observe((performance.now() - t0) / 1000);
    return true;
  }

  /** The route's duration series for this status: its 200 and 304 series are looked up once. */
  #cell(e: Entry<unknown>, status: number): DurationCell {
    if (status === 200) return (e.ok ??= this.#duration(e.method, e.label, 200));
    if (status === 304) return (e.notModified ??= this.#duration(e.method, e.label, 304));
    return this.#duration(e.method, e.label, status);
  }
}
