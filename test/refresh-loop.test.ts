import { strict as assert } from 'node:assert';
import { afterEach, beforeEach, describe, mock, test } from 'node:test';
import { RefreshLoop } from '../src/refresh-loop.js';

/** Let the loop's promise chains run (a tick's run() resolving, then the re-arm). */
const settle = async (): Promise<void> => {
  for (let i = 0; i < 5; i++) await Promise.resolve();
};

describe('refresh loop (fake clock)', () => {
  let clock = 0;
  beforeEach(() => {
    clock = 0;
    mock.timers.enable({ apis: ['setTimeout'] });
  });
  afterEach(() => mock.timers.reset());
  const tick = async (ms: number): Promise<void> => {
    clock += ms;
    mock.timers.tick(ms);
    await settle();
  };

  test('checks at start, then after the delay each check chose', async () => {
    const ran: number[] = [];
    const delays = [1_000, 5_000, 60_000];
    const loop = new RefreshLoop({ run: () => (ran.push(clock), Promise.resolve(delays.shift() ?? 60_000)), inflight: () => undefined, now: () => clock });
    assert.equal(loop.nextCheckAt, undefined, 'not running: no next check');
    loop.start();
    assert.equal(loop.nextCheckAt, 0);
    await tick(0);
    assert.deepEqual(ran, [0]);
    assert.equal(loop.nextCheckAt, 1_000);
    await tick(999);
    assert.deepEqual(ran, [0]);
    await tick(1);
    assert.deepEqual(ran, [0, 1_000]);
    await tick(5_000);
    assert.deepEqual(ran, [0, 1_000, 6_000]);
    assert.equal(loop.nextCheckAt, 66_000);
    await loop.stop(1_000);
  });

  test('a poke brings the next check forward, and start twice arms one timer', async () => {
    const ran: number[] = [];
    const loop = new RefreshLoop({ run: () => (ran.push(clock), Promise.resolve(60_000)), inflight: () => undefined, now: () => clock });
    loop.start();
    loop.start();
    await tick(0);
    assert.deepEqual(ran, [0]);
    await tick(10_000);
    loop.poke();
    await tick(0);
    assert.deepEqual(ran, [0, 10_000]);
    await tick(59_999);
    assert.deepEqual(ran, [0, 10_000], 'the poked check re-armed the full delay; the old timer is gone');
    await tick(1);
    assert.deepEqual(ran, [0, 10_000, 70_000]);
    await loop.stop(1_000);
  });

  test('stop waits for the refresh in flight, and never schedules again', async () => {
    const ran: number[] = [];
    let finish!: () => void;
    const inflight = new Promise<void>((r) => (finish = r));
    const loop = new RefreshLoop({ run: () => (ran.push(clock), inflight.then(() => 1_000)), inflight: () => inflight, now: () => clock });
    loop.start();
    await tick(0);
    let stopped: boolean | undefined;
    const stopping = loop.stop(30_000).then((v) => (stopped = v));
    await tick(10_000);
    assert.equal(stopped, undefined, 'still waiting for the write-back in flight');
    finish();
    await stopping;
    assert.equal(stopped, true);
    loop.poke();
    loop.start();
    await tick(120_000);
    assert.deepEqual(ran, [0], 'no check after stop, poked or restarted');
    assert.equal(loop.nextCheckAt, undefined);
  });

  test('stop gives up after its timeout and says so', async () => {
    const never = new Promise<number>(() => undefined);
    const loop = new RefreshLoop({ run: () => never, inflight: () => never, now: () => clock });
    loop.start();
    await tick(0);
    let stopped: boolean | undefined;
    const stopping = loop.stop(30_000).then((v) => (stopped = v));
    await tick(29_999);
    assert.equal(stopped, undefined);
    await tick(1);
    await stopping;
    assert.equal(stopped, false);
  });

  test('stop with nothing in flight returns at once', async () => {
    const loop = new RefreshLoop({ run: () => Promise.resolve(1_000), inflight: () => undefined, now: () => clock });
    loop.start();
    await tick(0);
    assert.equal(await loop.stop(30_000), true);
  });
});
