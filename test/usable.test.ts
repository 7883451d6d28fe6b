import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { ADMIN_TOKEN } from './helpers/app.js';
import { useSuite } from './helpers/suite.js';

const KEY = 'CODEX_AUTH_JSON';
const suite = useSuite();
const b64url = (s: string) => Buffer.from(s).toString('base64url');
const jwt = (payload: object) => `${b64url('{"alg":"RS256"}')}.${b64url(JSON.stringify(payload))}.${b64url('sig')}`;

test('/codex-auth and /readyz agree on every stored token: one rule for usable (no readable exp is usable)', async () => {
  const upstream = await suite.upstream();
  const t = await suite.app({ databaseUrl: await suite.pg.newDatabase(), upstreamUrl: upstream.url, start: false });
  const made = await t.app.inject({ method: 'POST', url: '/admin/clients', headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, payload: { name: 'w' } });
  await t.core.clients.reload();
  const token = made.json<{ token: string }>().token;
  const nowSec = Math.floor(Date.now() / 1000);
  const cases: Array<[string, unknown, number]> = [
    ['no exp', jwt({ iat: nowSec }), 200],
    ['an opaque access token', 'opaque-access-token', 200],
    ['an exp past 2100 (unreadable)', jwt({ exp: 1e13 }), 200],
    ['a string exp (unreadable)', jwt({ exp: String(nowSec + 3600) }), 200],
    ['an unexpired exp', jwt({ exp: nowSec + 3600 }), 200],
    ['an expired exp', jwt({ exp: nowSec - 60 }), 503],
    ['exp 0', jwt({ exp: 0 }), 503],
    ['no access token', undefined, 503],
  ];
  for (const [name, access, expected] of cases) {
    await t.core.store.put(KEY, JSON.stringify({ tokens: { access_token: access, refresh_token: 'rt_x', id_token: jwt({}) } }));
    await t.core.refresher.reload();
    const served = await t.app.inject({ method: 'GET', url: '/codex-auth', headers: { authorization: `Bearer ${token}` } });
    const ready = await t.app.inject({ method: 'GET', url: '/readyz' });
    assert.equal(served.statusCode, expected, `${name}: /codex-auth ${served.body}`);
    assert.equal(ready.statusCode, expected, `${name}: /readyz ${ready.body}`);
    if (expected === 503) assert.equal(served.json<{ code: string }>().code, ready.json<{ code: string }>().code, name);
    else assert.equal(ready.json<{ accessTokenExpiresAt: string | null }>().accessTokenExpiresAt, name === 'an unexpired exp' ? new Date((nowSec + 3600) * 1000).toISOString() : null, name);
  }
});
