import { strict as assert } from 'node:assert';
import { describe, it } from 'node:test';
import { runProcess } from './helpers/process.js';

// The helper every script and CLI test runs programs with. CI once failed on an uncaught
// `write EPIPE`: the sync script exited (not configured) before its empty stdin was written.
describe('runProcess (test helper)', () => {
  it('a program that exits without reading its input is a result, not an uncaught EPIPE', async () => {
    for (let i = 0; i < 5; i++) {
      const r = await runProcess('sh', ['-c', 'exit 3'], { env: { PATH: process.env.PATH }, input: 'x'.repeat(8 << 20) });
      assert.equal(r.code, 3);
    }
  });

  it('with no input, standard input is at end of file at once', async () => {
    const r = await runProcess('cat', [], { env: { PATH: process.env.PATH }, timeoutMs: 10_000 });
    assert.equal(r.timedOut, false);
    assert.equal(r.code, 0);
    assert.equal(r.stdout, '');
  });

  it('input is written to standard input and then closed', async () => {
    const r = await runProcess('cat', [], { env: { PATH: process.env.PATH }, input: 'hello\n', timeoutMs: 10_000 });
    assert.equal(r.stdout, 'hello\n');
  });
});
