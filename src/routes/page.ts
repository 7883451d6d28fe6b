import { hash as digest } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import type { FastifyInstance, FastifyReply } from 'fastify';
import { notFoundHandler } from '../http/problem.js';

export interface PageRoutesOptions {
  /** Whether ADMIN_TOKEN is set: without it the page says how to turn the admin routes on. */
  adminRoutes: boolean;
}

const WEB_DIR = new URL('../../web/', import.meta.url);
const PACKAGE_JSON = new URL('../../package.json', import.meta.url);

/**
 * No inline script or style, nothing from another origin: a token typed into this page can
 * only ever be sent where the page's own code sends it.
 */
export const PAGE_CSP = [
  "default-src 'self'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self' data:",
  "connect-src 'self'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
].join('; ');

const TYPES: Record<string, string> = {
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
};

interface Asset {
  body: Buffer;
  type: string;
}

const hash = (data: string | Buffer) => digest('sha256', data, 'hex').slice(0, 16);
const escapeAttr = (s: string) => s.replace(/&/g, '&amp;').replace(/"/g, '&quot;').replace(/</g, '&lt;');

/**
 * Every file under web/ (but the HTML) as `/assets/<name>.<hash><ext>`, the hash taken over
 * the content as served. A module's `from './x.js'` is rewritten to x's fingerprinted name
 * first, so a changed dependency changes every importer's hash too: each URL can be cached
 * forever, and a new build is never mixed with a cached old one.
 */
export function fingerprint(files: Map<string, Buffer>): { urls: Map<string, string>; assets: Map<string, Asset> } {
  const urls = new Map<string, string>();
  const assets = new Map<string, Asset>();
  const visiting = new Set<string>();
  const visit = (name: string): string => {
    const known = urls.get(name);
    if (known) return known;
    const raw = files.get(name);
    if (!raw) throw new Error(`web/: ${name} is imported but does not exist`);
    if (visiting.has(name)) throw new Error(`web/: import cycle through ${name}`);
    visiting.add(name);
    const ext = name.slice(name.lastIndexOf('.'));
    let body = raw;
    if (ext === '.js') {
      const text = raw.toString('utf8').replace(/(\bfrom\s*)(['"])\.\/([\w.-]+\.js)\2/g, (_m, from: string, q: string, dep: string) => `${from}${q}./${visit(dep).slice('/assets/'.length)}${q}`);
      body = Buffer.from(text);
    }
    const served = `${name.slice(0, -ext.length)}.${hash(body)}${ext}`;
    const url = `/assets/${served}`;
    assets.set(served, { body, type: TYPES[ext] ?? 'application/octet-stream' });
    urls.set(name, url);
    visiting.delete(name);
    return url;
  };
  for (const name of files.keys()) visit(name);
  return { urls, assets };
}

function pageHeaders(reply: FastifyReply): FastifyReply {
  return reply.headers({
    'content-security-policy': PAGE_CSP,
    'x-content-type-options': 'nosniff',
    'referrer-policy': 'no-referrer',
    'cross-origin-opener-policy': 'same-origin',
  });
}

/**
 * The operator page (`GET /`) and its assets, read from web/ once, when the app is built.
 * The page is open; everything it shows comes from the admin API with the token typed
 * into it. The security headers are set here only, so /metrics and the rest are untouched.
 */
export async function pageRoutes(app: FastifyInstance, o: PageRoutesOptions): Promise<void> {
  const names = (await readdir(WEB_DIR)).filter((n) => n !== 'index.html' && Object.hasOwn(TYPES, n.slice(n.lastIndexOf('.'))));
  const files = new Map(await Promise.all(names.map(async (n) => [n, await readFile(new URL(n, WEB_DIR))] as const)));
  const { urls, assets } = fingerprint(files);
  const { version } = JSON.parse(await readFile(PACKAGE_JSON, 'utf8')) as { version: string };
  const html = (await readFile(new URL('index.html', WEB_DIR), 'utf8')).replace(/\{\{([\w.-]+)\}\}/g, (m, key: string) => {
    if (key === 'version') return escapeAttr(version);
    if (key === 'adminRoutes') return o.adminRoutes ? 'on' : 'off';
    const url = urls.get(key);
    if (!url) throw new Error(`web/index.html names ${m}, which is not a file in web/`);
    return url;
  });
  const etag = `"${hash(html)}"`;

  app.get('/', async (req, reply) => {
    pageHeaders(reply).header('cache-control', 'no-cache').header('etag', etag);
    if (req.headers['if-none-match'] === etag) return reply.code(304).send();
    return reply.type('text/html; charset=utf-8').send(html);
  });

  app.get<{ Params: { file: string } }>('/assets/:file', async (req, reply) => {
    const asset = assets.get(req.params.file);
    if (!asset) return notFoundHandler(req, reply);
    return pageHeaders(reply).header('cache-control', 'public, max-age=31536000, immutable').type(asset.type).send(asset.body);
  });
}
