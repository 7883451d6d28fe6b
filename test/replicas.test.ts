import { strict as assert } from 'node:assert';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { decodeJwt } from 'jose';
import { createTestBroker, SECRET_KEY, type TestBroker } from './helpers/broker.js';
import { FakeUpstream } from './helpers/fake-upstream.js';
import { findLeaks } from './helpers/logs.js';
import { startTestPostgres, type TestPostgres } from './helpers/pg.js';
import { waitFor } from './helpers/wait.js';

const MIN = 60_000;
const ROUNDS = 50;
const REPLICAS = 3;
const MAX_PROPAGATION_MS = 2_000;

let pgs: TestPostgres;

before(async () => {
  pgs = await startTestPostgres();
});

after(async () => {
  await pgs?.stop();
});


function expIsoOf(accessToken: string | undefined): string {
  assert.ok(accessToken, 'the upstream has issued an access token');
  const exp = decodeJwt(accessToken).exp;
  assert.ok(exp !== undefined);
  return new Date(exp * 1000).toISOString();
}

test('three replicas on one database rotate exactly once per due window and all adopt the rotation within 2 s', async (t) => {
  // One fake clock shared by the upstream and every replica.
  let nowMs = Date.UTC(2030, 0, 1, 12, 0, 0);
  const now = (): number => nowMs;

  // 1-hour access tokens, 1-day margin: the lead is min(1 day, 1 h / 2) = 30 min.
  const upstream = await FakeUpstream.start({ now, accessLifetimeSec: 3_600 });
  t.after(() => upstream.close());
  const databaseUrl = await pgs.newDatabase();
  const key = randomBytes(32); // every replica shares SECRETS_ENCRYPTION_KEY

  const brokers: TestBroker[] = [];
  t.after(async () => {
    await Promise.all(brokers.map((b) => b.close()));
  });
  for (let i = 0; i < REPLICAS; i++) {
    brokers.push(
      await createTestBroker({
        databaseUrl,
        upstreamUrl: upstream.url,
        now,
        key,
        replicaId: `replica-${i}`,
        checkIntervalMs: 100,
        marginSeconds: 86_400,
      }),
    );
  }

  const seed = upstream.seed();
  await brokers[0]!.store.put(SECRET_KEY, JSON.stringify(seed));
  for (const b of brokers) b.refresher.start();

  const seededExp = expIsoOf((seed['tokens'] as Record<string, string>)['access_token']);
  await waitFor('every replica to load the seed', () => brokers.every((b) => b.refresher.status().accessTokenExpiresAt === seededExp));
  assert.equal(upstream.posts, 0, 'a fresh seed is not refreshed');

  const propagation: number[] = [];
  for (let round = 1; round <= ROUNDS; round++) {
    const before = upstream.rotations;
    nowMs += 40 * MIN; // 20 min left of 60: inside the 30-min lead, so due
    await waitFor(`round ${round}: a rotation`, () => upstream.rotations > before);
    const started = performance.now();
    assert.equal(upstream.rotations, before + 1, `round ${round}: exactly one rotation`);

    const expIso = expIsoOf(upstream.lastAccessToken());
    await waitFor(`round ${round}: every replica to adopt the rotation`, () => brokers.every((b) => b.refresher.status().accessTokenExpiresAt === expIso));
    const ms = performance.now() - started;
    propagation.push(ms);
    assert.ok(ms <= MAX_PROPAGATION_MS, `round ${round}: propagation took ${ms.toFixed(0)} ms`);
    assert.equal(upstream.rotations, before + 1, `round ${round}: still exactly one rotation`);
    assert.equal(upstream.reuseAnswers, 0, `round ${round}: no reuse`);
  }

  // A little longer at the final clock: nothing else is due, nothing else is POSTed.
  await sleep(300);

  const max = Math.max(...propagation);
  const mean = propagation.reduce((a, b) => a + b, 0) / propagation.length;
  const perReplica = brokers.map((b) => `${b.refresher.status().replicaId}=${b.logs.withEvent('rotation').length}`).join(' ');
  console.log(
    `replicas: ${ROUNDS} rounds, propagation max ${max.toFixed(1)} ms, mean ${mean.toFixed(1)} ms; ` +
      `upstream POSTs ${upstream.posts}, rotations ${upstream.rotations}, reuse answers ${upstream.reuseAnswers}; rotations by replica: ${perReplica}`,
  );

  assert.equal(upstream.posts, ROUNDS);
  assert.equal(upstream.rotations, ROUNDS);
  assert.equal(upstream.reuseAnswers, 0);
  const totalRotationLogs = brokers.reduce((n, b) => n + b.logs.withEvent('rotation').length, 0);
  assert.equal(totalRotationLogs, ROUNDS, 'one rotation log line per round across the fleet');
  for (const b of brokers) {
    assert.equal(b.refresher.status().state, 'fresh');
    assert.equal(b.refresher.status().lastError, null);
  }
  const stored = await brokers[0]!.store.read(SECRET_KEY);
  assert.ok(stored);
  const doc = JSON.parse(brokers[0]!.store.decrypt(stored)) as { tokens: Record<string, string> };
  assert.equal(doc.tokens['refresh_token'], upstream.currentRefreshToken());
  assert.deepEqual(
    findLeaks(
      brokers.flatMap((b) => b.logs.lines),
      upstream.issuedTokens(),
    ),
    [],
  );
});
