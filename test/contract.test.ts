import { strict as assert } from 'node:assert';
import { setTimeout as sleep } from 'node:timers/promises';
import { randomUUID } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import SwaggerParser from '@apidevtools/swagger-parser';
import { Ajv, type ValidateFunction } from 'ajv';
import addFormatsModule from 'ajv-formats';
import type { InjectOptions, LightMyRequestResponse } from 'fastify';
import { ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import { FakeIssuer } from './helpers/fake-issuer.js';
import { FakeUsageBackend } from './helpers/fake-usage.js';
import { useSuite } from './helpers/suite.js';
import { waitFor } from './helpers/wait.js';

const SPEC_PATH = fileURLToPath(new URL('../openapi.yaml', import.meta.url));
const METRICS_TOKEN = 'metrics-token-for-contract-0123456789';
const DAY = 86_400_000;

type Json = Record<string, unknown>;
type Method = 'get' | 'put' | 'post' | 'delete';


const suite = useSuite();

// ---- OpenAPI 3.0 -> JSON Schema (draft 7, what Ajv 8 validates by default) -------------

/**
 * The few OpenAPI 3.0 schema keywords JSON Schema does not have: `nullable` becomes a
 * `null` type (or, with no `type` beside it, an `anyOf` with null), and annotation-only
 * keywords are dropped. Property names are left alone.
 */
function toJsonSchema(schema: unknown): unknown {
  if (typeof schema !== 'object' || schema === null || Array.isArray(schema)) return schema;
  const s: Json = { ...(schema as Json) };
  const nullable = s['nullable'] === true;
  for (const k of ['nullable', 'example', 'xml', 'externalDocs', 'discriminator', 'deprecated']) delete s[k];
  if (s['properties']) s['properties'] = Object.fromEntries(Object.entries(s['properties'] as Json).map(([k, v]) => [k, toJsonSchema(v)]));
  for (const k of ['items', 'not', 'additionalProperties']) if (typeof s[k] === 'object' && s[k] !== null) s[k] = toJsonSchema(s[k]);
  for (const k of ['allOf', 'anyOf', 'oneOf']) if (Array.isArray(s[k])) s[k] = (s[k] as unknown[]).map(toJsonSchema);
  if (!nullable) return s;
  if (typeof s['type'] === 'string') {
    s['type'] = [s['type'], 'null'];
    if (Array.isArray(s['enum'])) s['enum'] = [...(s['enum'] as unknown[]), null];
    return s;
  }
  return { anyOf: [s, { type: 'null' }] };
}

interface MediaType {
  schema?: unknown;
}
interface HeaderObject {
  schema?: unknown;
  required?: boolean;
}
interface ResponseObject {
  description: string;
  headers?: Record<string, HeaderObject>;
  content?: Record<string, MediaType>;
}
interface Operation {
  responses: Record<string, ResponseObject>;
}
interface Spec {
  openapi: string;
  paths: Record<string, Partial<Record<Method, Operation>>>;
  components: { schemas: Record<string, unknown> };
}

let spec: Spec;
const ajv = new Ajv({ strict: false, allErrors: true });
addFormatsModule.default(ajv);
const compiled = new WeakMap<object, ValidateFunction>();
function validatorFor(schema: object): ValidateFunction {
  let v = compiled.get(schema);
  if (!v) {
    v = ajv.compile(toJsonSchema(schema) as object);
    compiled.set(schema, v);
  }
  return v;
}

// ---- checking one response --------------------------------------------------------------

/** Every (path, method, status) a response was checked against: the coverage proof. */
const exercised = new Set<string>();
const violations: string[] = [];

const mediaTypeOf = (ct: unknown) => String(ct ?? '').split(';')[0]!.trim().toLowerCase();

function parseBody(media: string, body: string): unknown {
  if (media === 'application/json' || media.endsWith('+json')) return JSON.parse(body) as unknown;
  return body;
}

/**
 * Check a live response against the spec: status documented for the path and method, a
 * documented media type, the body valid against its schema, and every documented header
 * present and valid (every header the spec documents is one the route always sends).
 */
function check(label: string, res: LightMyRequestResponse, path: string | undefined, method: Method): void {
  const where = `${label}: ${method.toUpperCase()} ${path ?? '(no documented path)'} -> ${res.statusCode}`;
  const fail = (msg: string): void => {
    violations.push(`${where}: ${msg}`);
  };
  let response: ResponseObject | undefined;
  if (path === undefined) {
    // An unknown route: no path documents it; it must still be a Problem.
    response = { description: 'unknown route', content: { 'application/problem+json': { schema: spec.components.schemas['Problem'] } } };
  } else {
    const op = spec.paths[path]?.[method];
    if (!op) return fail('the spec does not document this path and method');
    response = op.responses[String(res.statusCode)] ?? op.responses['default'];
    if (!response) return fail(`status ${res.statusCode} is not documented (documented: ${Object.keys(op.responses).join(', ')})`);
    exercised.add(`${method} ${path} ${res.statusCode}`);
  }

  for (const [name, h] of Object.entries(response.headers ?? {})) {
    const value = res.headers[name.toLowerCase()];
    if (value === undefined) {
      fail(`documented header ${name} is missing`);
      continue;
    }
    if (h.schema && typeof h.schema === 'object') {
      const v = validatorFor(h.schema);
      if (!v(String(value))) fail(`header ${name}: ${JSON.stringify(value)} ${ajv.errorsText(v.errors)}`);
    }
  }

  const content = response.content;
  if (!content || Object.keys(content).length === 0) {
    if (res.body !== '') fail(`the spec documents no body, but got ${res.body.slice(0, 80)}`);
    return;
  }
  const media = mediaTypeOf(res.headers['content-type']);
  const mt = content[media];
  if (!mt) return fail(`content type ${String(res.headers['content-type'])} is not documented (documented: ${Object.keys(content).join(', ')})`);
  let body: unknown;
  try {
    body = parseBody(media, res.body);
  } catch {
    return fail(`the body is not ${media}: ${res.body.slice(0, 80)}`);
  }
  if (mt.schema && typeof mt.schema === 'object') {
    const v = validatorFor(mt.schema);
    if (!v(body)) fail(`body does not validate: ${ajv.errorsText(v.errors)}; body ${res.body.slice(0, 300)}`);
  }
}

// ---- the app under test -----------------------------------------------------------------

async function setup(opts: { now?: () => number; metricsToken?: string } = {}) {
  const upstream = await suite.upstream(opts.now ? { now: opts.now } : {});
  const databaseUrl = await suite.pg.newDatabase();
  const t = await suite.app({
    databaseUrl,
    upstreamUrl: upstream.url,
    ...(opts.now ? { now: opts.now } : {}),
    ...(opts.metricsToken ? { metricsToken: opts.metricsToken } : {}),
  });
  return { upstream, ...t };
}

function req(t: TestApp, o: InjectOptions & { token?: string | undefined }) {
  const { token, ...inject } = o;
  const headers: Record<string, string> = { ...(inject.headers as Record<string, string> | undefined) };
  if (token !== undefined) headers['authorization'] = `Bearer ${token}`;
  return t.app.inject({ ...inject, headers });
}

/** Send, assert the status the case is about, and check the response against the spec. */
async function expect(t: TestApp, label: string, path: string | undefined, o: InjectOptions & { token?: string | undefined }, status: number) {
  const res = await req(t, o);
  assert.equal(res.statusCode, status, `${label}: expected ${status}, got ${res.statusCode} ${res.body.slice(0, 200)}`);
  check(label, res, path, String(o.method ?? 'GET').toLowerCase() as Method);
  return res;
}

// ---------------------------------------------------------------------------------------

test('openapi.yaml is a valid OpenAPI 3.0.3 document', async () => {
  const api = (await SwaggerParser.validate(SPEC_PATH)) as unknown as Spec;
  assert.equal(api.openapi, '3.0.3');
  spec = api;
  // Every schema compiles as JSON Schema once nullable is converted.
  for (const [name, schema] of Object.entries(spec.components.schemas)) {
    assert.doesNotThrow(() => validatorFor(schema as object), name);
  }
});

test('the checker has teeth: it flags what the spec does not allow', async () => {
  if (!spec) spec = (await SwaggerParser.validate(SPEC_PATH)) as unknown as Spec;
  const fake = (statusCode: number, headers: Record<string, string>, body: string) => ({ statusCode, headers, body }) as unknown as LightMyRequestResponse;
  const json = { 'content-type': 'application/json; charset=utf-8' };
  const good = JSON.stringify({ tokens: { id_token: 'a.b.c', access_token: 'a.b.c', refresh_token: 'r' } });
  const cases: Array<[LightMyRequestResponse, string, Method, RegExp]> = [
    [fake(418, json, '{}'), '/codex-auth', 'get', /status 418 is not documented/],
    [fake(200, { ...json, 'cache-control': 'no-store' }, good), '/codex-auth', 'get', /header ETag is missing/],
    [fake(200, { ...json, etag: 'W/"weak"', 'cache-control': 'no-store' }, good), '/codex-auth', 'get', /header ETag/],
    [fake(200, { ...json, etag: '"x"', 'cache-control': 'no-store' }, good), '/codex-auth', 'get', /header X-Codex-Credential is missing/],
    [fake(200, { ...json, etag: '"x"', 'cache-control': 'no-store', 'x-codex-credential': 'Not_A_Name' }, good), '/codex-auth', 'get', /header X-Codex-Credential/],
    [fake(200, { 'content-type': 'text/html', etag: '"x"', 'cache-control': 'no-store' }, good), '/codex-auth', 'get', /content type text\/html is not documented/],
    [fake(200, { ...json, etag: '"x"', 'cache-control': 'no-store' }, '{"tokens":{}}'), '/codex-auth', 'get', /must have required property/],
    [fake(304, { etag: '"x"', 'cache-control': 'no-store' }, 'body'), '/codex-auth', 'get', /documents no body/],
    [fake(401, { 'content-type': 'application/problem+json' }, '{"type":"t","title":"t","status":401,"detail":"d","code":"c"}'), '/codex-auth', 'get', /WWW-Authenticate is missing/],
    [fake(503, { 'content-type': 'application/problem+json' }, '{"type":"t","title":"t","status":503,"detail":"d","code":"c"}'), '/readyz', 'get', /Retry-After is missing/],
    [fake(401, json, '{"error":"unauthorized"}'), '/oauth/token', 'post', /must be object/],
    [fake(200, json, '{"status":{"state":"nope"}}'), '/status', 'get', /must have required property|must be equal to one of/],
    [fake(200, json, '{}'), '/nowhere', 'get', /does not document this path/],
  ];
  for (const [res, path, method, expected] of cases) {
    const before = violations.length;
    check('self-test', res, path, method);
    const found = violations.splice(before);
    assert.ok(
      found.some((v) => expected.test(v)),
      `${method} ${path} ${res.statusCode}: expected a violation matching ${String(expected)}, got ${JSON.stringify(found)}`,
    );
  }
  exercised.clear();
});

test('every response validates against openapi.yaml', async () => {
  if (!spec) spec = (await SwaggerParser.validate(SPEC_PATH)) as unknown as Spec;
  let nowMs = Date.UTC(2030, 0, 1);
  const now = () => nowMs;
  const t = await setup({ now, metricsToken: METRICS_TOKEN });
  const DROP = '/workspaces/{id}/secrets/values';
  const ws = randomUUID();

  // Nothing stored yet.
  await expect(t, 'healthz without a credential', '/healthz', { method: 'GET', url: '/healthz' }, 200);
  await expect(t, 'readyz without a credential', '/readyz', { method: 'GET', url: '/readyz' }, 503);
  await expect(t, 'openapi', '/openapi.yaml', { method: 'GET', url: '/openapi.yaml' }, 200);
  await expect(t, 'unknown route', undefined, { method: 'GET', url: '/no/such/route' }, 404);
  await expect(t, 'metrics without token', '/metrics', { method: 'GET', url: '/metrics' }, 401);
  await expect(t, 'metrics with a wrong token', '/metrics', { method: 'GET', url: '/metrics', token: 'wrong-wrong-wrong' }, 401);
  await expect(t, 'metrics', '/metrics', { method: 'GET', url: '/metrics', token: METRICS_TOKEN }, 200);
  await expect(t, 'status without token', '/status', { method: 'GET', url: '/status' }, 401);
  await expect(t, 'status (admin) without credential', '/status', { method: 'GET', url: '/status', token: ADMIN_TOKEN }, 200);

  // Clients.
  const created = await expect(t, 'create client', '/admin/clients', { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: { name: 'contract' } }, 201);
  const client = created.json() as { token: string; refreshCredential: string };
  await expect(t, 'create bound client', '/admin/clients', { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: { name: 'bound', workspaceId: ws } }, 201);
  const bound = (await req(t, { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: { name: 'bound-2', workspaceId: ws } })).json() as { token: string };
  await expect(t, 'create client with a null workspaceId', '/admin/clients', { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: { name: 'nullws', workspaceId: null } }, 201);
  await expect(t, 'create client: bad name', '/admin/clients', { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: { name: '../x' } }, 400);
  await expect(t, 'create client: bad workspaceId', '/admin/clients', { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: { name: 'y', workspaceId: 'nope' } }, 400);
  await expect(t, 'create client: no body', '/admin/clients', { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN }, 400);
  await expect(t, 'create client: malformed JSON', '/admin/clients', { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, headers: { 'content-type': 'application/json' }, payload: '{"name":' }, 400);
  await expect(t, 'create client: not JSON', '/admin/clients', { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, headers: { 'content-type': 'application/xml' }, payload: '<client/>' }, 415);
  await expect(
    t,
    'create client: 2 MiB body',
    '/admin/clients',
    { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, headers: { 'content-type': 'application/json' }, payload: JSON.stringify({ name: 'big', pad: 'a'.repeat(2 * 1024 * 1024) }) },
    413,
  );
  await expect(t, 'create client: duplicate', '/admin/clients', { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: { name: 'contract' } }, 409);
  await expect(t, 'create client: no admin token', '/admin/clients', { method: 'POST', url: '/admin/clients', payload: { name: 'z' } }, 401);
  await expect(t, 'list clients (never seen)', '/admin/clients', { method: 'GET', url: '/admin/clients', token: ADMIN_TOKEN }, 200);
  await expect(t, 'list clients: wrong admin token', '/admin/clients', { method: 'GET', url: '/admin/clients', token: client.token }, 401);

  // Serving with nothing stored.
  await expect(t, 'codex-auth without a credential', '/codex-auth', { method: 'GET', url: '/codex-auth', token: client.token }, 503);
  await expect(t, 'drop-in without a credential', DROP, { method: 'GET', url: `/workspaces/${ws}/secrets/values`, token: client.token }, 503);
  await expect(
    t,
    'shim without a credential',
    '/oauth/token',
    { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: `${client.refreshCredential}.x` } },
    503,
  );
  await expect(t, 'admin refresh without a credential', '/admin/refresh', { method: 'POST', url: '/admin/refresh', token: ADMIN_TOKEN }, 200);

  // Seeding.
  const doc = t.upstream.seed({ extra: { auth_mode: 'chatgpt' } });
  await expect(t, 'seed', '/admin/credential', { method: 'PUT', url: '/admin/credential', token: ADMIN_TOKEN, payload: doc }, 200);
  await expect(t, 'seed: invalid document', '/admin/credential', { method: 'PUT', url: '/admin/credential', token: ADMIN_TOKEN, payload: { tokens: { refresh_token: 'x' } } }, 400);
  await expect(t, 'seed: not an object', '/admin/credential', { method: 'PUT', url: '/admin/credential', token: ADMIN_TOKEN, payload: [1, 2] }, 400);
  await expect(
    t,
    'seed: malformed JSON',
    '/admin/credential',
    { method: 'PUT', url: '/admin/credential', token: ADMIN_TOKEN, headers: { 'content-type': 'application/json' }, payload: '{"tokens":' },
    400,
  );
  await expect(
    t,
    'seed: 2 MiB body',
    '/admin/credential',
    { method: 'PUT', url: '/admin/credential', token: ADMIN_TOKEN, headers: { 'content-type': 'application/json' }, payload: JSON.stringify({ tokens: {}, pad: 'a'.repeat(2 * 1024 * 1024) }) },
    413,
  );
  await expect(t, 'seed: not JSON', '/admin/credential', { method: 'PUT', url: '/admin/credential', token: ADMIN_TOKEN, headers: { 'content-type': 'application/xml' }, payload: '<auth/>' }, 415);
  await expect(t, 'seed: no admin token', '/admin/credential', { method: 'PUT', url: '/admin/credential', payload: doc }, 401);

  // Ops with a fresh credential.
  await expect(t, 'healthz', '/healthz', { method: 'GET', url: '/healthz' }, 200);
  await expect(t, 'readyz', '/readyz', { method: 'GET', url: '/readyz' }, 200);
  await expect(t, 'status (admin)', '/status', { method: 'GET', url: '/status', token: ADMIN_TOKEN }, 200);
  await expect(t, 'status (client)', '/status', { method: 'GET', url: '/status', token: client.token }, 200);
  await expect(t, 'status: wrong token', '/status', { method: 'GET', url: '/status', token: 'wrong-wrong-wrong-wrong' }, 401);

  // /codex-auth.
  const served = await expect(t, 'codex-auth', '/codex-auth', { method: 'GET', url: '/codex-auth', token: client.token }, 200);
  const etag = String(served.headers['etag']);
  await expect(t, 'codex-auth 304', '/codex-auth', { method: 'GET', url: '/codex-auth', token: client.token, headers: { 'if-none-match': etag } }, 304);
  await expect(t, 'codex-auth without token', '/codex-auth', { method: 'GET', url: '/codex-auth' }, 401);
  await expect(t, 'codex-auth with a wrong token', '/codex-auth', { method: 'GET', url: '/codex-auth', token: 'wrong-wrong-wrong-wrong' }, 401);

  // The drop-in route.
  const dropped = await expect(t, 'drop-in', DROP, { method: 'GET', url: `/workspaces/${ws}/secrets/values`, token: client.token, headers: { 'x-molecule-org-id': randomUUID() } }, 200);
  await expect(t, 'drop-in 304', DROP, { method: 'GET', url: `/workspaces/${ws}/secrets/values`, token: client.token, headers: { 'if-none-match': String(dropped.headers['etag']) } }, 304);
  await expect(t, 'drop-in: malformed id', DROP, { method: 'GET', url: '/workspaces/not-a-uuid/secrets/values', token: client.token }, 400);
  await expect(t, 'drop-in without token', DROP, { method: 'GET', url: `/workspaces/${ws}/secrets/values` }, 401);
  await expect(t, 'drop-in: another workspace', DROP, { method: 'GET', url: `/workspaces/${randomUUID()}/secrets/values`, token: bound.token }, 404);
  await expect(t, 'drop-in: own workspace', DROP, { method: 'GET', url: `/workspaces/${ws}/secrets/values`, token: bound.token }, 200);

  // The refresh shim.
  const served2 = served.json() as { tokens: { refresh_token: string } };
  await expect(t, 'shim (JSON)', '/oauth/token', { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', client_id: 'app_EMoamEEZ73f0CkXaXp7hrann', refresh_token: served2.tokens.refresh_token } }, 200);
  await expect(
    t,
    'shim (form)',
    '/oauth/token',
    {
      method: 'POST',
      url: '/oauth/token',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      payload: new URLSearchParams({ grant_type: 'refresh_token', refresh_token: `${client.refreshCredential}.old` }).toString(),
    },
    200,
  );
  await expect(t, 'shim: unsupported grant', '/oauth/token', { method: 'POST', url: '/oauth/token', payload: { grant_type: 'authorization_code', code: 'x' } }, 400);
  await expect(t, 'shim: no refresh_token', '/oauth/token', { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token' } }, 400);
  await expect(t, 'shim: array body', '/oauth/token', { method: 'POST', url: '/oauth/token', payload: [1] }, 400);
  // Body-parser failures answer like the upstream too (codex parses no problem+json).
  const shimRaw = (contentType: string, payload: string) => ({ method: 'POST' as const, url: '/oauth/token', headers: { 'content-type': contentType }, payload });
  await expect(t, 'shim: malformed JSON', '/oauth/token', shimRaw('application/json', '{"grant_type":'), 400);
  await expect(t, 'shim: empty JSON body', '/oauth/token', shimRaw('application/json', ''), 400);
  await expect(t, 'shim: unsupported media type', '/oauth/token', shimRaw('application/xml', '<grant/>'), 400);
  await expect(t, 'shim: 2 MiB body', '/oauth/token', shimRaw('application/json', JSON.stringify({ grant_type: 'refresh_token', refresh_token: 'a'.repeat(2 * 1024 * 1024) })), 400);
  await expect(t, 'shim: unknown credential', '/oauth/token', { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: 'cabrt_unknown.abc' } }, 401);

  // A workspace's codex logout: acknowledged, never forwarded.
  const revokeRaw = (contentType: string, payload: string) => ({ method: 'POST' as const, url: '/oauth/revoke', headers: { 'content-type': contentType }, payload });
  await expect(t, 'oauth revoke (JSON)', '/oauth/revoke', revokeRaw('application/json', JSON.stringify({ token: served2.tokens.refresh_token, token_type_hint: 'refresh_token', client_id: 'app_EMoamEEZ73f0CkXaXp7hrann' })), 200);
  await expect(t, 'oauth revoke: malformed JSON', '/oauth/revoke', revokeRaw('application/json', '{"token":'), 200);
  await expect(t, 'oauth revoke: 2 MiB body', '/oauth/revoke', revokeRaw('application/json', JSON.stringify({ token: 'a'.repeat(2 * 1024 * 1024) })), 413);

  // A forced refresh.
  await expect(t, 'admin refresh', '/admin/refresh', { method: 'POST', url: '/admin/refresh', token: ADMIN_TOKEN }, 200);
  await expect(t, 'admin refresh: no admin token', '/admin/refresh', { method: 'POST', url: '/admin/refresh' }, 401);
  const events = await expect(t, 'events', '/admin/events', { method: 'GET', url: '/admin/events', token: ADMIN_TOKEN }, 200);
  assert.ok((events.json() as { events: unknown[] }).events.length > 0, 'the forced refresh is audited');
  await expect(t, 'events with a limit', '/admin/events', { method: 'GET', url: '/admin/events?limit=1', token: ADMIN_TOKEN }, 200);
  await expect(t, 'events: limit 0', '/admin/events', { method: 'GET', url: '/admin/events?limit=0', token: ADMIN_TOKEN }, 400);
  await expect(t, 'events: limit not a number', '/admin/events', { method: 'GET', url: '/admin/events?limit=abc', token: ADMIN_TOKEN }, 400);
  await expect(t, 'events: no admin token', '/admin/events', { method: 'GET', url: '/admin/events' }, 401);
  await expect(t, 'list clients (after serving)', '/admin/clients', { method: 'GET', url: '/admin/clients', token: ADMIN_TOKEN }, 200);

  // Named credentials (several logins side by side).
  const CREDS = '/admin/credentials';
  const CRED = '/admin/credentials/{name}';
  const CRED_REFRESH = '/admin/credentials/{name}/refresh';
  const putCred = (name: string, payload: object | string, query = '', headers: Record<string, string> = {}) =>
    ({ method: 'PUT' as const, url: `/admin/credentials/${name}${query}`, token: ADMIN_TOKEN, headers, payload });
  const team = t.upstream.seed({ accountId: 'acct-team' });
  const teamSeeded = await expect(t, 'seed a named credential', CRED, putCred('team', team, '?pool=contract-pool'), 200);
  assert.equal((teamSeeded.json() as { pool: string }).pool, 'contract-pool');
  await expect(t, 'seed a named credential: bad name', CRED, putCred('Team_A', team), 400);
  await expect(t, 'seed a named credential: bad pool', CRED, putCred('team', team, '?pool=Bad_Pool'), 400);
  await expect(t, 'seed a named credential: not a login', CRED, putCred('team', { tokens: {} }), 400);
  await expect(t, 'seed a named credential: not JSON', CRED, putCred('team', '<auth/>', '', { 'content-type': 'application/xml' }), 415);
  await expect(t, 'seed a named credential: 2 MiB body', CRED, putCred('team', JSON.stringify({ tokens: {}, pad: 'a'.repeat(2 * 1024 * 1024) }), '', { 'content-type': 'application/json' }), 413);
  await expect(t, 'seed a named credential: no admin token', CRED, { method: 'PUT', url: '/admin/credentials/team', payload: team }, 401);
  const older = t.upstream.seed({ accountId: 'acct-team', iatSec: Math.floor(nowMs / 1000) - DAY / 1000 });
  await expect(t, 'seed a named credential: stale', CRED, putCred('team', older), 409);
  const listed = await expect(t, 'list credentials', CREDS, { method: 'GET', url: CREDS, token: ADMIN_TOKEN }, 200);
  assert.deepEqual((listed.json() as { credentials: Array<{ name: string }> }).credentials.map((c) => c.name), ['default', 'team']);
  await expect(t, 'list credentials: no admin token', CREDS, { method: 'GET', url: CREDS }, 401);
  await expect(t, 'refresh a named credential', CRED_REFRESH, { method: 'POST', url: '/admin/credentials/team/refresh', token: ADMIN_TOKEN }, 200);
  await expect(t, 'refresh a named credential: unknown', CRED_REFRESH, { method: 'POST', url: '/admin/credentials/nobody/refresh', token: ADMIN_TOKEN }, 404);
  await expect(t, 'refresh a named credential: no admin token', CRED_REFRESH, { method: 'POST', url: '/admin/credentials/team/refresh' }, 401);
  // A client of the credential's pool is served it, and named in x-codex-credential.
  const pooled = (await req(t, { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: { name: 'pooled', pool: 'contract-pool' } })).json() as { token: string };
  await waitFor('the pooled client to be assigned', () => t.core.clients.authenticate(pooled.token)?.assigned === 'team');
  const teamServed = await expect(t, 'codex-auth from a named credential', '/codex-auth', { method: 'GET', url: '/codex-auth', token: pooled.token }, 200);
  assert.equal(teamServed.headers['x-codex-credential'], 'team');
  await expect(t, 'status (client of a pool)', '/status', { method: 'GET', url: '/status', token: pooled.token }, 200);
  await expect(t, 'status (admin, with pools)', '/status', { method: 'GET', url: '/status', token: ADMIN_TOKEN }, 200);
  await expect(t, 'remove a credential: default', CRED, { method: 'DELETE', url: '/admin/credentials/default', token: ADMIN_TOKEN }, 409);
  await expect(t, 'remove a credential: clients assigned', CRED, { method: 'DELETE', url: '/admin/credentials/team', token: ADMIN_TOKEN }, 409);
  await expect(t, 'remove a credential: bad reassign', CRED, { method: 'DELETE', url: '/admin/credentials/team?reassign=maybe', token: ADMIN_TOKEN }, 400);
  await expect(t, 'remove a credential: unknown', CRED, { method: 'DELETE', url: '/admin/credentials/nobody', token: ADMIN_TOKEN }, 404);
  await expect(t, 'remove a credential: no admin token', CRED, { method: 'DELETE', url: '/admin/credentials/team' }, 401);
  await expect(t, 'remove a credential', CRED, { method: 'DELETE', url: '/admin/credentials/team?reassign=true', token: ADMIN_TOKEN }, 204);
  await expect(t, 'revoke a pooled client', '/admin/clients/{name}', { method: 'DELETE', url: '/admin/clients/pooled', token: ADMIN_TOKEN }, 204);

  // Revocation.
  await expect(t, 'revoke', '/admin/clients/{name}', { method: 'DELETE', url: '/admin/clients/contract', token: ADMIN_TOKEN }, 204);
  await expect(t, 'revoke: unknown', '/admin/clients/{name}', { method: 'DELETE', url: '/admin/clients/contract', token: ADMIN_TOKEN }, 404);
  await expect(t, 'revoke: no admin token', '/admin/clients/{name}', { method: 'DELETE', url: '/admin/clients/bound' }, 401);
  await expect(t, 'codex-auth with a revoked token', '/codex-auth', { method: 'GET', url: '/codex-auth', token: client.token }, 401);
  await expect(t, 'shim: revoked credential', '/oauth/token', { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: served2.tokens.refresh_token } }, 401);

  // A latched login (the shim answers with the upstream's code), then an expired token.
  t.upstream.fault({ kind: 'status', status: 401, body: { error: { message: 'reused', type: 'invalid_request_error', code: 'refresh_token_reused' } } });
  nowMs += 9.5 * DAY;
  const report = await t.core.refresher.runCycle();
  assert.ok(report.attempt === 'permanent_failure' || report.check === 'latched', JSON.stringify(report));
  assert.equal(t.core.refresher.state(), 'latched');
  await expect(t, 'status (latched)', '/status', { method: 'GET', url: '/status', token: ADMIN_TOKEN }, 200);
  await expect(t, 'healthz (latched)', '/healthz', { method: 'GET', url: '/healthz' }, 200);
  await expect(t, 'codex-auth (latched, unexpired)', '/codex-auth', { method: 'GET', url: '/codex-auth', token: bound.token }, 200);
  nowMs += DAY;
  await expect(t, 'codex-auth (expired)', '/codex-auth', { method: 'GET', url: '/codex-auth', token: bound.token }, 503);
  await expect(t, 'readyz (expired)', '/readyz', { method: 'GET', url: '/readyz' }, 503);
  const latched = (await req(t, { method: 'POST', url: '/admin/clients', token: ADMIN_TOKEN, payload: { name: 'late' } })).json() as { refreshCredential: string };
  await expect(t, 'shim (latched, expired)', '/oauth/token', { method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: latched.refreshCredential } }, 401);
  await expect(t, 'status (expired)', '/status', { method: 'GET', url: '/status', token: ADMIN_TOKEN }, 200);
  // The operator's upstream revocation.
  const CRED_REVOKE = '/admin/credentials/{name}/revoke';
  await expect(t, 'credential revoke: another name', CRED_REVOKE, { method: 'POST', url: '/admin/credentials/other/revoke', token: ADMIN_TOKEN }, 404);
  await expect(t, 'credential revoke: no admin token', CRED_REVOKE, { method: 'POST', url: '/admin/credentials/default/revoke' }, 401);
  t.upstream.revokeFault({ kind: 'status', status: 503 });
  await expect(t, 'credential revoke: upstream failure', CRED_REVOKE, { method: 'POST', url: '/admin/credentials/default/revoke', token: ADMIN_TOKEN }, 502);
  await expect(t, 'credential revoke', CRED_REVOKE, { method: 'POST', url: '/admin/credentials/default/revoke', token: ADMIN_TOKEN }, 200);
  await expect(t, 'metrics (after all)', '/metrics', { method: 'GET', url: '/metrics', token: METRICS_TOKEN }, 200);

  assert.deepEqual(violations, []);
});

test('with ADMIN_TOKEN unset, the admin routes answer a documented 404', async () => {
  if (!spec) spec = (await SwaggerParser.validate(SPEC_PATH)) as unknown as Spec;
  const upstream = await suite.upstream();
  const t = await suite.app({ databaseUrl: await suite.pg.newDatabase(), upstreamUrl: upstream.url, adminToken: undefined });
  const before = violations.length;
  for (const [path, ops] of Object.entries(spec.paths)) {
    if (!path.startsWith('/admin/')) continue;
    for (const method of Object.keys(ops) as Method[]) {
      const url = path.replace(/\{[^}]+\}/g, 'someone');
      const res = await req(t, { method: method.toUpperCase() as 'GET', url, token: ADMIN_TOKEN, ...(method === 'put' || method === 'post' ? { payload: {} } : {}) });
      assert.equal(res.statusCode, 404, `${method} ${url}`);
      check('admin off', res, path, method);
    }
  }
  assert.deepEqual(violations.slice(before), []);
});

test('a flood of wrong admin tokens gets a documented 429 on every admin route and /status; a stale seed a documented 409', async () => {
  if (!spec) spec = (await SwaggerParser.validate(SPEC_PATH)) as unknown as Spec;
  const t = await setup();
  const before = violations.length;
  // Fill every delayed-answer slot with wrong guesses; while they are held, a route answers 429 unchecked.
  const pending: Promise<unknown>[] = [];
  for (const [path, ops] of Object.entries(spec.paths)) {
    if (!path.startsWith('/admin/') && path !== '/status') continue;
    for (const method of Object.keys(ops) as Method[]) {
      const url = path.replace(/\{[^}]+\}/g, 'someone');
      let res;
      for (let attempt = 0; attempt < 20; attempt++) {
        pending.push(...Array.from({ length: 40 }, () => req(t, { method: 'GET', url: '/admin/clients', token: 'wrong-admin-token-0123456789' })));
        await sleep(20);
        res = await req(t, { method: method.toUpperCase() as 'GET', url, token: 'another-wrong-token-0123456789', ...(method === 'put' || method === 'post' ? { payload: {} } : {}) });
        if (res.statusCode === 429) break;
      }
      assert.equal(res?.statusCode, 429, `${method} ${url}: ${res?.body}`);
      check('auth flood', res!, path, method);
    }
  }
  await Promise.all(pending);
  // The stale-seed guard's 409.
  const nowSec = Math.floor(Date.now() / 1000);
  const newer = t.upstream.seed({ accountId: 'acct-contract', iatSec: nowSec - 60 });
  const older = t.upstream.seed({ accountId: 'acct-contract', iatSec: nowSec - 86_400 });
  await expect(t, 'seed', '/admin/credential', { method: 'PUT', url: '/admin/credential', token: ADMIN_TOKEN, payload: newer }, 200);
  await expect(t, 'stale seed', '/admin/credential', { method: 'PUT', url: '/admin/credential', token: ADMIN_TOKEN, payload: older }, 409);
  assert.deepEqual(violations.slice(before), []);
});

test('the login routes validate against openapi.yaml', async () => {
  if (!spec) spec = (await SwaggerParser.validate(SPEC_PATH)) as unknown as Spec;
  const issuer = await FakeIssuer.start();
  try {
    const upstream = await suite.upstream();
    const t = await suite.app({ databaseUrl: await suite.pg.newDatabase(), upstreamUrl: upstream.url, config: { OAUTH_ISSUER: issuer.url }, login: { pollIntervalMs: 50 } });
    const LOGIN = '/admin/credentials/{name}/login';
    const GET = '/admin/logins/{id}';
    const CB = '/admin/logins/{id}/callback';
    const begin = (method: string, name = 'default') => ({ method: 'POST' as const, url: `/admin/credentials/${name}/login`, token: ADMIN_TOKEN, payload: { method } });
    const paste = (id: string, payload: object) => ({ method: 'POST' as const, url: `/admin/logins/${id}/callback`, token: ADMIN_TOKEN, payload });
    const landOn = async (authorizeUrl: string) => String((await fetch(authorizeUrl, { redirect: 'manual' })).headers.get('location'));

    await expect(t, 'login: no admin token', LOGIN, { method: 'POST', url: '/admin/credentials/default/login', payload: { method: 'device' } }, 401);
    await expect(t, 'login: unknown method', LOGIN, begin('password'), 400);
    await expect(t, 'login: not a credential name', LOGIN, begin('device', 'Not_A_Name'), 404);
    issuer.setDeviceDisabled(true);
    await expect(t, 'login: device login off', LOGIN, begin('device'), 502);
    issuer.setDeviceDisabled(false);
    const device = (await expect(t, 'login: device', LOGIN, begin('device'), 202)).json() as { id: string };
    await expect(t, 'login: another in progress', LOGIN, begin('browser'), 409);
    await expect(t, 'login progress (pending)', GET, { method: 'GET', url: `/admin/logins/${device.id}`, token: ADMIN_TOKEN }, 200);
    await expect(t, 'login progress: unknown', GET, { method: 'GET', url: '/admin/logins/nope', token: ADMIN_TOKEN }, 404);
    await expect(t, 'login progress: no admin token', GET, { method: 'GET', url: `/admin/logins/${device.id}` }, 401);
    await expect(t, 'callback: device login', CB, paste(device.id, { callback_url: 'http://localhost:1455/auth/callback?code=c&state=s' }), 409);
    issuer.approveDevice();
    await waitFor('the device login to succeed', async () => ((await req(t, { method: 'GET', url: `/admin/logins/${device.id}`, token: ADMIN_TOKEN })).json() as { state: string }).state === 'succeeded');
    await expect(t, 'login progress (succeeded)', GET, { method: 'GET', url: `/admin/logins/${device.id}`, token: ADMIN_TOKEN }, 200);

    const browser = (await expect(t, 'login: browser', LOGIN, begin('browser'), 202)).json() as { id: string; authorize_url: string };
    await expect(t, 'callback: no URL', CB, paste(browser.id, {}), 400);
    await expect(t, 'callback: unknown login', CB, paste('nope', { callback_url: 'http://localhost:1455/auth/callback?code=c&state=s' }), 404);
    await expect(t, 'callback: no admin token', CB, { method: 'POST', url: `/admin/logins/${browser.id}/callback`, payload: { callback_url: 'x' } }, 401);
    issuer.failNextExchange(400);
    await expect(t, 'callback: exchange refused', CB, paste(browser.id, { callback_url: await landOn(browser.authorize_url) }), 502);
    const again = (await expect(t, 'login: browser again', LOGIN, begin('browser'), 202)).json() as { id: string; authorize_url: string };
    await expect(t, 'callback', CB, paste(again.id, { callback_url: await landOn(again.authorize_url) }), 200);
    assert.deepEqual(violations, []);
  } finally {
    await issuer.close();
  }
});

test('the operator page and its assets match the spec', async () => {
  const t = await setup();
  const before = violations.length;
  const page = await expect(t, 'operator page', '/', { method: 'GET', url: '/' }, 200);
  await expect(t, 'operator page, unchanged', '/', { method: 'GET', url: '/', headers: { 'if-none-match': String(page.headers['etag']) } }, 304);
  const assets = [...page.body.matchAll(/(?:src|href)="\/assets\/([^"]+)"/g)].map((m) => m[1]!);
  assert.ok(assets.some((a) => a.endsWith('.js')) && assets.some((a) => a.endsWith('.css')) && assets.some((a) => a.endsWith('.svg')), assets.join(' '));
  for (const a of assets) await expect(t, `asset ${a}`, '/assets/{file}', { method: 'GET', url: `/assets/${a}` }, 200);
  await expect(t, 'asset: unknown', '/assets/{file}', { method: 'GET', url: '/assets/main.0000000000000000.js' }, 404);
  assert.deepEqual(violations.slice(before), []);
});

test('/status with usage polling on validates: fresh figures, then stale ones with a reason', async (t) => {
  const backend = await FakeUsageBackend.start();
  t.after(() => backend.close());
  const upstream = await suite.upstream();
  const a = await suite.app({
    databaseUrl: await suite.pg.newDatabase(),
    upstreamUrl: upstream.url,
    config: { CHATGPT_BASE_URL: backend.url, USAGE_POLL_INTERVAL_SECONDS: 0.1 },
  });
  await a.core.store.put('CODEX_AUTH_JSON', JSON.stringify(upstream.seed()));
  await a.core.refresher.reload();
  const before = violations.length;
  const usage = async () => ((await req(a, { method: 'GET', url: '/status', token: ADMIN_TOKEN })).json() as { usage: { stale: boolean; lastError: string | null } }).usage;
  await waitFor('a first usage snapshot', async () => (await usage()).stale === false);
  await expect(a, 'status with usage', '/status', { method: 'GET', url: '/status', token: ADMIN_TOKEN }, 200);
  backend.answer = 'error';
  await waitFor('a failed usage poll', async () => (await usage()).lastError === 'status_502');
  await expect(a, 'status with stale usage', '/status', { method: 'GET', url: '/status', token: ADMIN_TOKEN }, 200);
  assert.deepEqual(violations.slice(before), []);
});

test('/openapi.yaml serves this very file', async () => {
  const t = await setup();
  const res = await req(t, { method: 'GET', url: '/openapi.yaml' });
  assert.equal(res.statusCode, 200);
  assert.equal(res.body, await readFile(SPEC_PATH, 'utf8'));
});

test('every documented path, method and status was exercised', (t) => {
  if (exercised.size === 0) return t.skip('run with the whole file');
  // Every documented status but the ones a test cannot provoke without breaking the process.
  const notProvoked = new Set(['get /healthz 503']);
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops as Record<string, Operation>)) {
      for (const status of Object.keys(op.responses)) {
        const key = `${method} ${path} ${status}`;
        if (!notProvoked.has(key)) assert.ok(exercised.has(key), `not exercised: ${key}`);
      }
    }
  }
  return undefined;
});
