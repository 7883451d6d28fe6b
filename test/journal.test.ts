import { strict as assert } from 'node:assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { RotationJournal } from '../src/journal.js';
import { keyFor } from './helpers/app.js';
import { tempDirs } from './helpers/tmp.js';
import type { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { useSuite } from './helpers/suite.js';

const KEY = 'CODEX_AUTH_JSON';
const suite = useSuite();
let nowMs = Date.UTC(2027, 0, 1);
const now = () => nowMs;

const tmp = tempDirs('cab-journal-');

async function app(databaseUrl: string, upstream: FakeUpstream, journalDir: string, start = false) {
  return suite.app({ databaseUrl, upstreamUrl: upstream.url, now, journalDir, start });
}

function dueSeed(upstream: FakeUpstream) {
  const nowSec = Math.floor(nowMs / 1000);
  return upstream.seed({ iatSec: nowSec - 10 * 86_400 + 3_600, expSec: nowSec + 3_600 });
}

test('a rotation is journaled encrypted (0600) before the write-back and cleared once it lands', async () => {
  const upstream = await suite.upstream({ now });
  const url = await suite.pg.newDatabase();
  const dir = tmp();
  const t = await app(url, upstream, dir);
  await t.core.store.put(KEY, JSON.stringify(dueSeed(upstream)));
  // The database refuses the write-back: the rotation must live on, in memory and on disk.
  const store = t.core.store as unknown as { compareAndSet: (...a: unknown[]) => Promise<boolean> };
  const real = store.compareAndSet.bind(t.core.store);
  store.compareAndSet = async () => {
    throw new Error('database down');
  };
  assert.equal((await t.core.refresher.runCycle()).attempt, 'rotated');
  const files = fs.readdirSync(dir).filter((f) => f.startsWith('rotation-journal.'));
  assert.equal(files.length, 1);
  const file = path.join(dir, files[0] ?? '');
  assert.equal(fs.statSync(file).mode & 0o777, 0o600);
  const bytes = fs.readFileSync(file);
  assert.deepEqual(findLeaks([bytes.toString('latin1')], upstream.issuedTokens()), [], 'the journal holds no plaintext token');
  assert.equal(t.core.refresher.status().writebackPending, true);
  assert.equal(t.core.refresher.current()?.parsed.tokens.access_token, upstream.lastAccessToken(), 'the pending rotation is what is served');
  store.compareAndSet = real;
  await t.core.refresher.runCycle();
  assert.equal(t.core.refresher.status().writebackPending, false);
  assert.deepEqual(fs.readdirSync(dir).filter((f) => f.startsWith('rotation-journal.')), []);
  const row = await t.core.store.read(KEY);
  assert.ok(row);
  assert.equal(JSON.parse(t.core.store.decrypt(row)).tokens.access_token, upstream.lastAccessToken());
});

test('a journaled rotation is written back at start, before any POST; zero reuse afterwards', async () => {
  const upstream = await suite.upstream({ now });
  const url = await suite.pg.newDatabase();
  const dir = tmp();
  const first = await app(url, upstream, dir);
  const seed = dueSeed(upstream);
  await first.core.store.put(KEY, JSON.stringify(seed));
  const before = await first.core.store.read(KEY);
  assert.ok(before);
  // A broker got the upstream's answer, journaled it, and died before the write-back.
  const store = first.core.store as unknown as { compareAndSet: (...a: unknown[]) => Promise<boolean> };
  store.compareAndSet = async () => {
    throw new Error('killed');
  };
  assert.equal((await first.core.refresher.runCycle()).attempt, 'rotated');
  const rotatedAccess = upstream.lastAccessToken();
  await first.close();
  const restarted = await app(url, upstream, dir, true);
  const row = await restarted.core.store.read(KEY);
  assert.ok(row);
  assert.equal(JSON.parse(restarted.core.store.decrypt(row)).tokens.access_token, rotatedAccess);
  assert.equal(restarted.logs.withEvent('journal_recovered').length, 1);
  assert.equal(upstream.posts, 1);
  nowMs += 10 * 86_400_000;
  assert.equal((await restarted.core.refresher.runCycle()).attempt, 'rotated');
  assert.equal(upstream.posts, 2);
  assert.equal(upstream.reuseAnswers, 0);
});

test('a stale journal entry is discarded with a log line', async () => {
  const upstream = await suite.upstream({ now });
  const url = await suite.pg.newDatabase();
  const dir = tmp();
  const t = await app(url, upstream, dir);
  await t.core.store.put(KEY, JSON.stringify(upstream.seed()));
  await new RotationJournal(dir, keyFor(url)).write({ secretKey: KEY, expectedRaw: Buffer.from('not what the row holds'), plaintext: '{"tokens":{}}', at: new Date().toISOString() });
  const seeded = await t.core.store.read(KEY);
  assert.equal(await t.core.refresher.recoverJournal(), 'stale');
  assert.deepEqual((await t.core.store.read(KEY))?.raw, seeded?.raw);
  assert.equal(t.logs.withEvent('journal_discarded').length, 1);
  assert.deepEqual(fs.readdirSync(dir).filter((f) => f.startsWith('rotation-journal.')), []);
});

test('no token value appears in any log line of the journal tests', () => {
  assert.deepEqual(findLeaks(suite.logLines(), suite.issuedTokens()), []);
});
