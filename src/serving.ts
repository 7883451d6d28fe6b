import { hash as digest } from 'node:crypto';
import type { JsonObject } from './auth-json.js';
import { generationOf } from './clients/credentials.js';
import type { Client } from './clients/registry.js';
import { unusable, type Snapshot } from './credential.js';
import type { Refresher } from './refresher.js';

export type Exposure = 'proxy' | 'omit' | 'raw';

/**
 * Whether a string is all ASCII, given its UTF-8 length: a character outside ASCII takes 2
 * or more UTF-8 bytes, so equal counts mean none. Such a body written as Latin-1 has its
 * UTF-8 bytes, and Node copies the characters instead of encoding them.
 */
export function isAscii(text: string, utf8Bytes: number): boolean {
  return utf8Bytes === text.length;
}

export interface Rendered {
  /** Built on first read: a 304 never builds it. */
  readonly body: string;
  /** The platform's drop-in shape, `{"CODEX_AUTH_JSON": body as a string}`, built on first read. */
  readonly platformBody: string;
  /** Buffer.byteLength(body), known without building or measuring the body (the content-length). */
  readonly bodyBytes: number;
  /** Buffer.byteLength(platformBody), likewise. */
  readonly platformBodyBytes: number;
  /**
   * Both bodies are ASCII (a byte per character, as every auth.json of ASCII tokens is):
   * written as Latin-1, their bytes are their UTF-8 bytes, copied instead of encoded.
   */
  readonly ascii: boolean;
  readonly etag: string;
  /** The drop-in shape's ETag: the same validator with `-v` (another representation). */
  readonly platformEtag: string;
  generation: string;
}

export type Unavailable = { code: 'no_credential' | 'token_expired'; detail: string };

// A string no real document can contain, replaced by each client's refresh credential.
const SLOT = '\u0000codex-auth-broker:refresh_token\u0000';

interface Template {
  snap: Snapshot;
  pre: string;
  post: string;
  /** pre and post as they appear inside a JSON string (the drop-in shape). */
  escapedPre: string;
  escapedPost: string;
  /** What follows a client's credential in the slot: `.<generation>"`, and as it appears inside a JSON string. */
  slotEnd: string;
  escapedSlotEnd: string;
  /** The UTF-8 bytes of each shape's body but the client's credential (which is ASCII: a byte per character). */
  bytes: number;
  escapedBytes: number;
  /** Every character of both shapes is ASCII (then so is every client's body: its credential is base64url). */
  ascii: boolean;
  generation: string;
  /** Names the template's bytes; with the client's credential it names the served bytes. */
  hash: string;
  /** `"<hash>-`: what every client's ETag starts with (then its tag, and `"` or `-v"`). */
  etagOpen: string;
  /** Same bytes for every client (omit, raw): rendered once. */
  shared: Rendered | undefined;
  /** The shim's view of this snapshot, built on first use. */
  tokens?: ShimTokens;
}

/**
 * One snapshot's tokens as the refresh shim answers them. The answer's bytes are those of
 * JSON.stringify({ access_token, id_token?, refresh_token, token_type, expires_in }), with
 * the part before the client's refresh token serialised once per snapshot.
 */
export class ShimTokens {
  readonly accessToken: string;
  readonly idToken: string | undefined;
  readonly exp: number | undefined;
  readonly generation: string;
  readonly #head: string;
  readonly #slotEnd: string;
  /** The UTF-8 bytes of an answer but the client's credential and the seconds (both ASCII: a byte per character). */
  readonly #bytes: number;
  /** Every answer is ASCII (its tokens are): its Latin-1 bytes are its UTF-8 bytes. */
  readonly ascii: boolean;

  constructor(accessToken: string, idToken: string | undefined, exp: number | undefined, generation: string) {
    this.accessToken = accessToken;
    this.idToken = idToken;
    this.exp = exp;
    this.generation = generation;
    const head = JSON.stringify({ access_token: accessToken, ...(idToken ? { id_token: idToken } : {}) });
    this.#head = `${head.slice(0, -1)},"refresh_token":"`;
    this.#slotEnd = `.${generation}","token_type":"Bearer","expires_in":`;
    const fixed = this.#head + this.#slotEnd + '}';
    this.#bytes = Buffer.byteLength(fixed);
    this.ascii = isAscii(fixed, this.#bytes);
  }

  /** The JSON answer for a client (its refresh credential is base64url, which JSON never escapes), with the seconds left as digits. */
  answer(refreshCredential: string, expiresIn: string): string {
    return this.#head + refreshCredential + this.#slotEnd + expiresIn + '}';
  }

  /** Buffer.byteLength(answer(refreshCredential, expiresIn)), without building or measuring the answer. */
  answerBytes(refreshCredential: string, expiresIn: string): number {
    return this.#bytes + refreshCredential.length + expiresIn.length;
  }
}

function isObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** A string's JSON escaping without the quotes: per character, so pieces concatenate. */
function escaped(s: string): string {
  return JSON.stringify(s).slice(1, -1);
}

const PLATFORM_OPEN = '{"CODEX_AUTH_JSON":"';
const PLATFORM_CLOSE = '"}';

/** The same bytes for every client (omit and raw exposure). */
class SharedDocument implements Rendered {
  readonly body: string;
  readonly etag: string;
  readonly platformEtag: string;
  readonly generation: string;
  readonly bodyBytes: number;
  readonly ascii: boolean;
  #platformBody: string | undefined;
  #platformBodyBytes: number | undefined;

  constructor(body: string, generation: string) {
    this.body = body;
    this.bodyBytes = Buffer.byteLength(body);
    // The drop-in shape's escaping adds no character outside ASCII.
    this.ascii = isAscii(body, this.bodyBytes);
    this.etag = etagOf(body);
    this.platformEtag = `${this.etag.slice(0, -1)}-v"`;
    this.generation = generation;
  }

  get platformBody(): string {
    this.#platformBody ??= JSON.stringify({ CODEX_AUTH_JSON: this.body });
    return this.#platformBody;
  }

  get platformBodyBytes(): number {
    this.#platformBodyBytes ??= Buffer.byteLength(this.platformBody);
    return this.#platformBodyBytes;
  }
}

function etagOf(body: string): string {
  return `"${digest('sha256', body, 'base64url').slice(0, 32)}"`;
}

/**
 * One client's document. The served bytes are a function of (template, credential), so
 * naming both is a strong validator: no per-request hash of the body, and no body at all
 * for a 304.
 */
class ClientDocument implements Rendered {
  readonly generation: string;
  readonly #t: Template;
  readonly #client: Client;
  readonly #credential: string;
  #body: string | undefined;

  constructor(t: Template, client: Client) {
    this.#t = t;
    this.#client = client;
    this.#credential = client.refreshCredential;
    this.generation = t.generation;
  }

  /**
   * `"<template hash>-<client tag>"`, kept on the client record while the template is the
   * same: a string built and flattened per request (and each template part converted) was
   * a measured share of serving (BENCHMARKS.md, session 22). A record's tag never changes
   * (it is derived from the token the record is keyed by), so the template prefix alone
   * says whether the kept one is current.
   */
  get etag(): string {
    const c = this.#client;
    const open = this.#t.etagOpen;
    if (c.etagFor !== open) {
      c.etag = open + c.etagTag + '"';
      c.etagFor = open;
    }
    return c.etag;
  }

  get platformEtag(): string {
    const c = this.#client;
    const open = this.#t.etagOpen;
    if (c.platformEtagFor !== open) {
      c.platformEtag = open + c.etagTag + '-v"';
      c.platformEtagFor = open;
    }
    return c.platformEtag;
  }

  get body(): string {
    // The slot is a JSON string of `<credential>.<generation>`: both are base64url (the
    // credential with its cabrt_ prefix), which JSON never escapes, so no stringify here.
    this.#body ??= this.#t.pre + '"' + this.#credential + this.#t.slotEnd + this.#t.post;
    return this.#body;
  }

  /**
   * The body's UTF-8 length from the template's and the credential's (base64url: a byte
   * per character), without building the body: measuring a body flattened it, which was
   * a measured share of each served request (BENCHMARKS.md, session 16).
   */
  get bodyBytes(): number {
    return this.#t.bytes + this.#credential.length;
  }

  get platformBodyBytes(): number {
    return this.#t.escapedBytes + this.#credential.length;
  }

  get ascii(): boolean {
    return this.#t.ascii;
  }

  /** Equal to JSON.stringify({ CODEX_AUTH_JSON: body }), without escaping the document per request. */
  get platformBody(): string {
    return PLATFORM_OPEN + this.#t.escapedPre + '\\"' + this.#credential + this.#t.escapedSlotEnd + this.#t.escapedPost + PLATFORM_CLOSE;
  }
}

/**
 * The auth.json codex reads, as stored, with tokens.refresh_token per the exposure policy.
 * Rendered from a per-snapshot template: serving costs a string concatenation,
 * never a hash of the body or a database query.
 */
export class DocumentRenderer {
  readonly #refresher: Refresher;
  readonly #exposure: Exposure;
  readonly #now: () => number;
  #template: Template | undefined;

  constructor(refresher: Refresher, exposure: Exposure, now: () => number = Date.now) {
    this.#refresher = refresher;
    this.#exposure = exposure;
    this.#now = now;
  }

  /** Why nothing can be served right now (at `now`, by this renderer's clock unless given), or undefined when a token is usable. */
  unavailable(now: number = this.#now()): Unavailable | undefined {
    const why = unusable(this.#refresher.current(), now);
    if (why === 'no_credential') {
      return { code: why, detail: 'the broker holds no usable login; an operator must log in (npx codex-auth-broker login) or seed one' };
    }
    if (why === 'token_expired') {
      return { code: why, detail: 'the held access token has expired and could not be refreshed yet; see /status' };
    }
    return undefined;
  }

  currentGeneration(): string | undefined {
    const snap = this.#refresher.current();
    return snap?.parsed.tokens.access_token ? this.#templateFor(snap).generation : undefined;
  }

  #templateFor(snap: Snapshot): Template {
    if (this.#template?.snap === snap) return this.#template;
    const doc = codexDocument(snap, this.#exposure !== 'raw');
    // Always an object here, even if scrubbing renamed a key that equalled the refresh token.
    const tokens: JsonObject = isObject(doc['tokens']) ? doc['tokens'] : {};
    doc['tokens'] = tokens;
    const generation = generationOf(String(snap.parsed.tokens.access_token));
    let shared: Rendered | undefined;
    let pre = '';
    let post = '';
    let escapedPre = '';
    let escapedPost = '';
    let hash = '';
    if (this.#exposure === 'proxy') {
      tokens['refresh_token'] = SLOT;
      const text = JSON.stringify(doc);
      const at = text.indexOf(JSON.stringify(SLOT));
      pre = text.slice(0, at);
      post = text.slice(at + JSON.stringify(SLOT).length);
      escapedPre = escaped(pre);
      escapedPost = escaped(post);
      hash = digest('sha256', `${pre}\u0000${post}`, 'base64url').slice(0, 22);
    } else {
      // codex rejects a file whose refresh_token is not a string: omit serves an empty one.
      if (this.#exposure === 'omit') tokens['refresh_token'] = '';
      shared = new SharedDocument(JSON.stringify(doc), generation);
    }
    const slotEnd = `.${generation}"`;
    const escapedSlotEnd = escaped(slotEnd);
    // What ClientDocument's body and platformBody add to the credential, in UTF-8 bytes.
    const fixed = pre + '"' + slotEnd + post;
    const escapedFixed = PLATFORM_OPEN + escapedPre + '\\"' + escapedSlotEnd + escapedPost + PLATFORM_CLOSE;
    const bytes = Buffer.byteLength(fixed);
    const escapedBytes = Buffer.byteLength(escapedFixed);
    const ascii = isAscii(fixed, bytes) && isAscii(escapedFixed, escapedBytes);
    this.#template = { snap, pre, post, escapedPre, escapedPost, slotEnd, escapedSlotEnd, bytes, escapedBytes, ascii, generation, hash, etagOpen: `"${hash}-`, shared };
    return this.#template;
  }

  /** The served document for one client. Call only when unavailable() is undefined. */
  render(client: Client): Rendered {
    const snap = this.#refresher.current();
    if (!snap) throw new Error('render called with no credential');
    const t = this.#templateFor(snap);
    if (t.shared) return t.shared;
    return new ClientDocument(t, client);
  }

  /** The current tokens for the refresh shim's answer (one object per snapshot). */
  tokens(): ShimTokens | undefined {
    const snap = this.#refresher.current();
    const at = snap?.parsed.tokens.access_token;
    if (!snap || !at) return undefined;
    const t = this.#templateFor(snap);
    t.tokens ??= new ShimTokens(at, snap.parsed.tokens.id_token, snap.claims.exp, t.generation);
    return t.tokens;
  }
}

/**
 * The stored document in the shape codex reads. A nested document is served as stored;
 * a flat one (the original refresher accepted both) is lifted into `tokens`, since codex
 * cannot read flat tokens. With `scrub`, every other copy of the upstream refresh token
 * is cut out too (tokens.refresh_token is then set by the exposure policy).
 */
export function codexDocument(snap: Snapshot, scrub = false): JsonObject {
  const doc = structuredClone(snap.parsed.doc);
  const rt = snap.parsed.tokens.refresh_token;
  const lifted = snap.parsed.shape === 'nested' ? doc : liftFlat(doc);
  return scrub && rt ? (withoutSecret(lifted, rt) as JsonObject) : lifted;
}

function liftFlat(doc: JsonObject): JsonObject {
  const tokens: JsonObject = {};
  for (const f of ['id_token', 'access_token', 'refresh_token', 'account_id'] as const) {
    if (f in doc) {
      tokens[f] = doc[f];
      delete doc[f];
    }
  }
  return { OPENAI_API_KEY: null, ...doc, tokens };
}

/** Below this length a refresh token is cut out only where it is a whole value: a 3-character one would shred the JWTs. */
const MIN_SUBSTRING_SECRET = 8;

/**
 * A copy of a JSON value with the secret cut out of every string (keys included) and
 * every string field named refresh_token emptied. codex reads only tokens.refresh_token,
 * but a stored document may hold the upstream refresh token elsewhere (a flat leftover
 * beside `tokens`, an extra or nested field, an array): any served copy is the fleet's
 * single-use login in a workspace's hands.
 */
export function withoutSecret(v: unknown, secret: string): unknown {
  if (typeof v === 'string') {
    if (v === secret) return '';
    if (secret.length < MIN_SUBSTRING_SECRET) return v;
    let out = v;
    // Cutting one copy can join two halves into another: repeat until none is left.
    while (out.includes(secret)) out = out.split(secret).join('');
    return out;
  }
  if (Array.isArray(v)) return v.map((x) => withoutSecret(x, secret));
  if (typeof v !== 'object' || v === null) return v;
  const out: JsonObject = {};
  for (const [k, x] of Object.entries(v)) {
    // A field named refresh_token is one by its name, whatever it holds (an older or another login's).
    const value = k === 'refresh_token' && typeof x === 'string' ? '' : withoutSecret(x, secret);
    // defineProperty: a stored "__proto__" key stays a plain key, never a prototype.
    Object.defineProperty(out, withoutSecret(k, secret) as string, { value, enumerable: true, writable: true, configurable: true });
  }
  return out;
}

export interface ServedCredential {
  /** The credential's name: the x-codex-credential header. */
  name: string;
  refresher: Refresher;
  renderer: DocumentRenderer;
}

/**
 * Which credential's document a client is served: its assignment in its pool (see
 * pools/assignments.ts), rendered by one renderer per credential. Memory only.
 */
export class ServedCredentials {
  readonly #pick: (client: Client, now?: number) => { name: string; refresher: Refresher } | undefined;
  readonly #exposure: Exposure;
  readonly #now: () => number;
  readonly #renderers = new WeakMap<Refresher, DocumentRenderer>();
  /** One answer per held credential, so serving allocates none per request. */
  readonly #served = new WeakMap<{ name: string; refresher: Refresher }, ServedCredential>();

  constructor(pick: (client: Client, now?: number) => { name: string; refresher: Refresher } | undefined, exposure: Exposure, now: () => number = Date.now) {
    this.#pick = pick;
    this.#exposure = exposure;
    this.#now = now;
  }

  rendererOf(refresher: Refresher): DocumentRenderer {
    let r = this.#renderers.get(refresher);
    if (!r) {
      r = new DocumentRenderer(refresher, this.#exposure, this.#now);
      this.#renderers.set(refresher, r);
    }
    return r;
  }

  /** Undefined when the client's pool holds no credential at all. `now`: the clock already read by the caller, for the credential's state. */
  for(client: Client, now?: number): ServedCredential | undefined {
    const held = this.#pick(client, now);
    if (!held) return undefined;
    let served = this.#served.get(held);
    if (served?.name !== held.name || served.refresher !== held.refresher) {
      served = { name: held.name, refresher: held.refresher, renderer: this.rendererOf(held.refresher) };
      this.#served.set(held, served);
    }
    return served;
  }

  /** The generation the client should hold now (for its active/stale state). */
  currentGeneration(client: Client): string | undefined {
    return this.for(client)?.renderer.currentGeneration();
  }
}
