import { after, before } from 'node:test';
import { createTestApp, type TestApp, type TestAppOptions } from './app.js';
import { FakeUpstream, type FakeUpstreamOptions } from './fake-upstream.js';
import { startTestPostgres, type TestPostgres } from './pg.js';

export interface Suite {
  /** The file's Postgres (started in before()). */
  readonly pg: TestPostgres;
  readonly apps: TestApp[];
  readonly upstreams: FakeUpstream[];
  /** A fake upstream closed when the file ends. */
  upstream(opts?: FakeUpstreamOptions): Promise<FakeUpstream>;
  /** A test app closed when the file ends. */
  app(opts: TestAppOptions): Promise<TestApp>;
  /** Every log line of every app, and every token every fake upstream issued: for leak scans. */
  logLines(): string[];
  issuedTokens(): string[];
}

/**
 * One real Postgres per test file, and every app and fake upstream a test opens, closed
 * when the file ends (apps first, so no pool outlives its server).
 */
export function useSuite(): Suite {
  let pg: TestPostgres | undefined;
  const apps: TestApp[] = [];
  const upstreams: FakeUpstream[] = [];
  before(async () => {
    pg = await startTestPostgres();
  });
  after(async () => {
    for (const a of apps) await a.close().catch(() => undefined);
    for (const u of upstreams) await u.close().catch(() => undefined);
    await pg?.stop();
  });
  return {
    get pg() {
      if (!pg) throw new Error('useSuite: Postgres is not started yet (use it inside a test)');
      return pg;
    },
    apps,
    upstreams,
    async upstream(opts = {}) {
      const u = await FakeUpstream.start(opts);
      upstreams.push(u);
      return u;
    },
    async app(opts) {
      const t = await createTestApp(opts);
      apps.push(t);
      return t;
    },
    logLines: () => apps.flatMap((a) => a.logs.lines),
    issuedTokens: () => upstreams.flatMap((u) => u.issuedTokens()),
  };
}
