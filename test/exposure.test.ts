import { strict as assert } from 'node:assert';
import { randomUUID } from 'node:crypto';
import { describe, test } from 'node:test';
import { ADMIN_TOKEN, type TestApp } from './helpers/app.js';
import { LogCapture } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';

const KEY = 'CODEX_AUTH_JSON';
const suite = useSuite();
const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };

type Doc = Record<string, unknown>;

async function appWith(exposure: 'proxy' | 'omit' | 'raw', logs?: LogCapture) {
  const upstream = await suite.upstream();
  const t = await suite.app({ databaseUrl: await suite.pg.newDatabase(), upstreamUrl: upstream.url, exposure, start: false, ...(logs ? { logs } : {}) });
  const ws = randomUUID();
  const res = await t.app.inject({ method: 'POST', url: '/admin/clients', headers: admin, payload: { name: 'ws', workspaceId: ws } });
  assert.equal(res.statusCode, 201, res.body);
  await t.core.clients.reload();
  return { t, upstream, ws, client: res.json<{ token: string; refreshCredential: string }>() };
}

/** Store a document as the platform might have (no seed validation), and adopt it. */
async function store(t: TestApp, doc: Doc) {
  await t.core.store.put(KEY, JSON.stringify(doc));
  await t.core.refresher.reload();
}

/** Every way a stored document can hide a copy of its refresh token outside tokens.refresh_token. */
function hidingPlaces(base: Doc, rt: string): Array<[string, Doc]> {
  const tokens = base['tokens'] as Doc;
  return [
    ['a top-level refresh_token beside tokens', { ...base, refresh_token: rt }],
    ['a nested extra field', { ...base, meta: { previous: { token: rt } } }],
    ['an extra field inside tokens', { ...base, tokens: { ...tokens, backup_refresh: rt } }],
    ['inside an array', { ...base, history: ['x', [rt], { list: [rt, 1] }] }],
    ['a substring of a longer string', { ...base, note: `copied from laptop: refresh=${rt}; done`, twice: `${rt}${rt}` }],
    ['a key', { ...base, seen: { [rt]: true, [`k-${rt}`]: 1 } }],
    ['a flat document with copies', { ...tokens, old_refresh: rt, extra: { again: rt } }],
    ['a field named refresh_token deeper down', { ...base, other: { refresh_token: rt } }],
  ];
}

describe('what is served: the upstream refresh token never leaves under proxy and omit', () => {
  for (const exposure of ['proxy', 'omit'] as const) {
    test(`${exposure}: no served byte holds the refresh token, wherever the stored document hides a copy`, async () => {
      const { t, upstream, ws, client } = await appWith(exposure);
      let searched = 0;
      const base = upstream.seed();
      const rt = (base['tokens'] as Doc)['refresh_token'] as string;
      for (const [place, doc] of hidingPlaces(base, rt)) {
        await store(t, doc);
        assert.equal(t.core.refresher.current()?.parsed.tokens.refresh_token, rt, place);
        for (const url of ['/codex-auth', `/workspaces/${ws}/secrets/values`]) {
          const res = await t.app.inject({ method: 'GET', url, headers: { authorization: `Bearer ${client.token}` } });
          assert.equal(res.statusCode, 200, `${place} ${url}: ${res.body}`);
          searched++;
          assert.ok(!res.body.includes(rt), `${place}: ${url} served the refresh token`);
          assert.ok(!res.body.includes(JSON.stringify(rt).slice(1, -1)), `${place}: ${url} served the escaped refresh token`);
          // The document stays readable and keeps the tokens codex needs.
          const served = (url === '/codex-auth' ? res.json() : JSON.parse(res.json<{ CODEX_AUTH_JSON: string }>().CODEX_AUTH_JSON)) as Doc;
          const tokens = served['tokens'] as Doc;
          assert.equal(tokens['access_token'], (base['tokens'] as Doc)['access_token'], place);
          if (exposure === 'omit') assert.equal(tokens['refresh_token'], '', place);
          else assert.ok(String(tokens['refresh_token']).startsWith(client.refreshCredential), place);
        }
      }
      assert.equal(searched, 16);
    });
  }

  test('other fields survive the scrub: only the copies are cut out', async () => {
    const { t, upstream, client } = await appWith('proxy');
    const base = upstream.seed();
    const rt = (base['tokens'] as Doc)['refresh_token'] as string;
    await store(t, { ...base, note: `refresh=${rt}; done`, keep: { a: 1, b: ['x'] }, auth_mode: 'chatgpt' });
    const served = (await t.app.inject({ method: 'GET', url: '/codex-auth', headers: { authorization: `Bearer ${client.token}` } })).json<Doc>();
    assert.equal(served['note'], 'refresh=; done');
    assert.deepEqual(served['keep'], { a: 1, b: ['x'] });
    assert.equal(served['auth_mode'], 'chatgpt');
  });

  test('raw serves the stored document as it is (by explicit choice)', async () => {
    const { t, upstream, client } = await appWith('raw');
    const base = upstream.seed();
    const rt = (base['tokens'] as Doc)['refresh_token'] as string;
    await store(t, { ...base, refresh_token: rt });
    const res = await t.app.inject({ method: 'GET', url: '/codex-auth', headers: { authorization: `Bearer ${client.token}` } });
    assert.equal(res.json<{ tokens: Doc }>().tokens['refresh_token'], rt);
  });
});

describe('raw exposure warns at start', () => {
  test('exposure raw logs one warning at start naming the logout risk', async () => {
    const logs = new LogCapture();
    await appWith('raw', logs);
    const warnings = logs.withEvent('refresh_token_exposure_raw');
    assert.equal(warnings.length, 1);
    assert.equal(warnings[0]!['level'], 40);
    assert.match(String(warnings[0]!['msg']), /codex logout.*CODEX_REFRESH_TOKEN_URL_OVERRIDE.*revokes the shared login/);
  });

  for (const exposure of ['proxy', 'omit'] as const) {
    test(`exposure ${exposure} logs no such warning`, async () => {
      const logs = new LogCapture();
      await appWith(exposure, logs);
      assert.equal(logs.withEvent('refresh_token_exposure_raw').length, 0);
    });
  }
});
