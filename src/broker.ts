import { readFileSync } from 'node:fs';
import type { Dispatcher } from 'undici';
import { EnvHttpProxyAgent } from './lib/http-client.js';
import { ChangeListener } from './change-listener.js';
import { CLIENTS_CHANNEL, loadCredentialSecret } from './clients/credentials.js';
import { ClientRegistry } from './clients/registry.js';
import type { Config } from './config.js';
import { createPool, migrate, type Pool } from './db.js';
import type { Logger } from './logger.js';
import { credentialMetrics, type BrokerMetrics } from './metrics.js';
import { RotationJournal } from './journal.js';
import { CREDENTIALS_CHANNEL, registerCredential } from './credential/catalog.js';
import { CredentialSet } from './credential/set.js';
import { Assignments } from './pools/assignments.js';
import { Refresher } from './refresher.js';
import { CHANGE_CHANNEL, SecretStore } from './secret-store.js';
import { LoginManager, type LoginManagerOptions } from './login/logins.js';
import { createBackendTokenCheck, TokenVerifier, type TokenCheckFn } from './token-check.js';
import { createRevokeClient, createUpstreamClient, revokeUrlFor, type RefreshFn, type RevokeFn } from './upstream.js';
import { createUsageFetch, type UsageFetchFn } from './usage/fetch.js';
import { UsageMonitor } from './usage/monitor.js';
import { USAGE_CHANNEL } from './usage/store.js';

export type CoreConfig = Pick<
  Config,
  | 'CODEX_AUTH_SECRET_KEY'
  | 'OAUTH_TOKEN_URL'
  | 'OAUTH_ISSUER'
  | 'CHATGPT_BASE_URL'
  | 'OAUTH_CLIENT_ID'
  | 'REFRESH_MARGIN_SECONDS'
  | 'REFRESH_CHECK_INTERVAL_SECONDS'
  | 'PERMANENT_FAILURE_BACKOFF_SECONDS'
  | 'TRANSIENT_BACKOFF_BASE_SECONDS'
  | 'UPSTREAM_TIMEOUT_SECONDS'
  | 'USAGE_POLL_INTERVAL_SECONDS'
  | 'POOL_SWITCH_PERCENT'
  | 'encryptionKey'
  | 'replicaId'
> &
  Partial<Pick<Config, 'PLATFORM_WORKSPACE_TOKENS'>>;

export interface BrokerCoreOptions {
  config: CoreConfig;
  databaseUrl: string;
  logger: Logger;
  metrics: BrokerMetrics;
  /** Seams for tests: the upstream call, its dispatcher, the clock, the jitter source. */
  refresh?: RefreshFn;
  /** Asks the backend whether it accepts an access token (default: GET {CHATGPT_BASE_URL}/wham/usage). */
  tokenCheck?: TokenCheckFn;
  revoke?: RevokeFn;
  /** Fetches a credential's usage (default: GET {CHATGPT_BASE_URL}/wham/usage); usageTickMs: how often a replica looks for a due poll. */
  usageFetch?: UsageFetchFn;
  usageTickMs?: number;
  dispatcher?: Dispatcher;
  now?: () => number;
  random?: () => number;
  poolSize?: number;
  /** How often clients are reloaded without a NOTIFY (platform tokens have none) and last-seen facts flushed. */
  clientReloadMs?: number;
  clientFlushMs?: number;
  /** Where rotations are journaled before their write-back (DATA_DIR); needs an encryption key. */
  journalDir?: string;
  /** Seams for broker-performed logins (lifetime, poller lease, poll interval, sweep period). */
  login?: Pick<LoginManagerOptions, 'ttlMs' | 'leaseMs' | 'pollIntervalMs' | 'sweepMs'>;
}

export interface BrokerCore {
  pool: Pool;
  store: SecretStore;
  /** Every credential this replica holds, each with its own refresher. */
  credentials: CredentialSet;
  /** The refresher of credential `default`. */
  refresher: Refresher;
  /** Which credential each client is served, within its pool. */
  assignments: Assignments;
  /** Whether the backend really rejects the current access token, before the shim forces a rotation. */
  tokenVerifier: TokenVerifier;
  /** Upstream revocation of a refresh token (an operator's explicit request only). */
  revoke: RevokeFn;
  clients: ClientRegistry;
  /** The secret behind broker refresh credentials (see clients/credentials.ts). */
  credentialSecret: Buffer;
  listener: ChangeListener;
  /** Logins the broker performs (device code, browser), shared by every replica through the database. */
  logins: LoginManager;
  /** Usage limits per credential, polled by one replica per interval and shared (view() is memory only). */
  usage: UsageMonitor;
  /** Load the credentials (journals first) and the clients and listen for changes, without refreshing yet. */
  load(): Promise<void>;
  /** Start the refresh loops (after the HTTP port is bound). Synchronous: nothing runs between the bind and the caller's next step. */
  run(): void;
  /** load() then run(). */
  start(): Promise<void>;
  /** Stop refreshing (waiting, bounded, for one in flight), then close connections. */
  close(timeoutMs: number): Promise<boolean>;
}

const ms = (s: number) => Math.round(s * 1000);
// src/broker.ts and dist/broker.js both sit one level below package.json.
const VERSION = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;
// DESIGN: backend calls take at most 10 s. A verdict is reused for a minute: a storm of
// callers reporting the same token costs one GET, and a flood cannot hammer the backend.
const TOKEN_CHECK_TIMEOUT_MS = 10_000;
const TOKEN_CHECK_TTL_MS = 60_000;

/** The framework-free core, wired the one way serve, the CLI and the tests use it. */
export async function createBrokerCore(o: BrokerCoreOptions): Promise<BrokerCore> {
  const { config, logger } = o;
  const pool = createPool(o.databaseUrl, logger, o.poolSize, () => o.metrics.dbQueries.inc());
  try {
    await migrate(pool, logger);
  } catch (err) {
    await pool.end().catch(() => undefined);
    throw err;
  }
  const store = new SecretStore(pool, config.encryptionKey);
  o.metrics.buildInfo.set({ version: VERSION, replica: config.replicaId }, 1);
  o.metrics.poolSwitchPercent.set(config.POOL_SWITCH_PERCENT);
  let credentialSecret: Buffer;
  try {
    credentialSecret = await loadCredentialSecret(pool, config.encryptionKey);
  } catch (err) {
    await pool.end().catch(() => undefined);
    throw err;
  }
  // Every upstream and backend call goes through one dispatcher. By default it honours
  // HTTPS_PROXY / HTTP_PROXY / NO_PROXY (read once, at start), as operators behind an
  // egress proxy expect; without them it connects directly.
  const dispatcher = o.dispatcher ?? new EnvHttpProxyAgent();
  const clients = new ClientRegistry({ pool, logger, credentialSecret, platformTokens: config.PLATFORM_WORKSPACE_TOKENS === true });
  const refresh =
    o.refresh ??
    createUpstreamClient(
      { url: config.OAUTH_TOKEN_URL, clientId: config.OAUTH_CLIENT_ID, timeoutMs: ms(config.UPSTREAM_TIMEOUT_SECONDS), dispatcher },
      o.now,
    );
  const revoke =
    o.revoke ??
    createRevokeClient(
      { url: revokeUrlFor(config.OAUTH_TOKEN_URL), clientId: config.OAUTH_CLIENT_ID, timeoutMs: ms(config.UPSTREAM_TIMEOUT_SECONDS), dispatcher },
      o.now,
    );
  const journal = o.journalDir && config.encryptionKey ? new RotationJournal(o.journalDir, config.encryptionKey) : undefined;
  const createRefresher = (name: string, secretKey: string) =>
    new Refresher({
    name,
    store,
    secretKey,
    refresh,
    logger: name === 'default' ? logger : logger.child({ credential: name }),
    metrics: credentialMetrics(o.metrics, name),
    // A credential that stops (or starts) being usable moves clients of its pool.
    onStateChange: () => assignments.schedule(),
    replicaId: config.replicaId,
    marginSeconds: config.REFRESH_MARGIN_SECONDS,
    checkIntervalMs: ms(config.REFRESH_CHECK_INTERVAL_SECONDS),
    permanentBackoffMs: ms(config.PERMANENT_FAILURE_BACKOFF_SECONDS),
    transientBaseMs: ms(config.TRANSIENT_BACKOFF_BASE_SECONDS),
    ...(o.now ? { now: o.now } : {}),
    ...(o.random ? { random: o.random } : {}),
    journal,
  });
  const credentials = new CredentialSet({
    pool,
    defaultKey: config.CODEX_AUTH_SECRET_KEY,
    logger,
    create: (e) => createRefresher(e.name, e.secretKey),
    changed: () => assignments.schedule(),
  });
  const assignments = new Assignments({
    pool,
    clients,
    credentials,
    logger,
    metrics: o.metrics,
    // Usage figures (memory only) decide who moves before an account runs dry.
    headroom: (h) => usage.headroom(h.secretKey),
  });
  clients.onReload = () => {
    assignments.recount();
    assignments.schedule();
  };
  const refresher = credentials.default;
  const check = o.tokenCheck ?? createBackendTokenCheck({ baseUrl: config.CHATGPT_BASE_URL, timeoutMs: TOKEN_CHECK_TIMEOUT_MS, dispatcher });
  const tokenVerifier = new TokenVerifier({
    ttlMs: TOKEN_CHECK_TTL_MS,
    ...(o.now ? { now: o.now } : {}),
    check: async (token, account) => {
      const r = await check(token, account);
      o.metrics.tokenChecks.inc({ verdict: r.verdict });
      const level = r.verdict === 'unknown' ? 'warn' : 'info';
      logger[level](
        { event: 'token_check', verdict: r.verdict, detail: r.detail },
        r.verdict === 'rejected'
          ? 'the backend rejects the current access token: a forced refresh may follow'
          : r.verdict === 'accepted'
            ? 'a workspace reported the current access token rejected, but the backend accepts it: no refresh (the workspace gets the same token back)'
            : `could not verify the current access token against CHATGPT_BASE_URL (${r.detail}): no forced refresh; check CHATGPT_BASE_URL and the network`,
      );
      return r;
    },
  });
  if (o.journalDir && !config.encryptionKey) {
    logger.warn({ event: 'journal_disabled' }, 'no SECRETS_ENCRYPTION_KEY: rotations are not journaled to DATA_DIR (it would hold a plaintext token)');
  }
  const usage = new UsageMonitor({
    pool,
    logger,
    metrics: o.metrics,
    replicaId: config.replicaId,
    intervalMs: ms(config.USAGE_POLL_INTERVAL_SECONDS),
    fetch: o.usageFetch ?? createUsageFetch({ baseUrl: config.CHATGPT_BASE_URL, timeoutMs: TOKEN_CHECK_TIMEOUT_MS, dispatcher }),
    ...(o.usageTickMs ? { tickMs: o.usageTickMs } : {}),
    switchPercent: config.POOL_SWITCH_PERCENT,
    // New figures: a login that filled up moves its clients (on every replica; the stored compare-and-set lets one write win).
    onChange: () => assignments.schedule(),
    // Every credential this replica holds, asked on every tick (credentials come and go).
    credentials: () =>
      credentials.list().map((h) => ({
        name: h.name,
        secretKey: h.secretKey,
        access: () => {
          const s = h.refresher.current();
          const state = h.refresher.state();
          // A latched or expired token would only be refused; a 401 here must never lead to a refresh anyway.
          if (!s?.parsed.tokens.access_token || (state !== 'fresh' && state !== 'due')) return undefined;
          return { accessToken: s.parsed.tokens.access_token, accountId: s.account.accountId };
        },
      })),
  });
  const reloadClients = () =>
    clients.reload().catch((err: Error) => logger.warn({ event: 'clients_reload_failed', err: { message: err.message } }, 'could not reload clients; serving the last known set'));
  const listener = new ChangeListener({
    connectionString: o.databaseUrl,
    logger,
    channels: [CHANGE_CHANNEL, CLIENTS_CHANNEL, CREDENTIALS_CHANNEL, USAGE_CHANNEL],
    onNotify: (channel, key) => {
      if (channel === USAGE_CHANNEL) {
        usage.onNotify(key);
        return;
      }
      if (channel === CLIENTS_CHANNEL) {
        void reloadClients();
        return;
      }
      if (channel === CREDENTIALS_CHANNEL) {
        void credentials.sync();
        return;
      }
      // Reload first so a client never gets the burned token; then re-check, since a
      // re-seed may be due or may clear a latch. No key: a reconnect, anything may have changed.
      const held = key === undefined ? credentials.list() : [credentials.bySecretKey(key)];
      for (const h of held) {
        h?.refresher
          .reload()
          .then(() => h.refresher.poke())
          .catch(() => undefined);
      }
    },
  });
  const logins = new LoginManager({
    pool,
    store,
    secretKey: config.CODEX_AUTH_SECRET_KEY,
    replicaId: config.replicaId,
    encryptionKey: config.encryptionKey,
    issuer: { issuer: config.OAUTH_ISSUER, clientId: config.OAUTH_CLIENT_ID, timeoutMs: ms(config.UPSTREAM_TIMEOUT_SECONDS), dispatcher },
    logger,
    register: async (name, db) => {
      if (name !== 'default') await registerCredential(db, name, config.CODEX_AUTH_SECRET_KEY, undefined);
    },
    onStored: async (name) => {
      await credentials.sync();
      const r = credentials.get(name)?.refresher;
      await r?.reload().then(() => r.poke());
    },
    onFinished: (method, result) => o.metrics.logins.inc({ method, result }),
    ...o.login,
  });
  const timers: NodeJS.Timeout[] = [];
  const flush = () =>
    clients.flush().catch((err: Error) => logger.debug({ event: 'clients_flush_failed', err: { message: err.message } }, 'could not record client last-seen facts; will retry'));
  const core: BrokerCore = {
    pool,
    store,
    credentials,
    refresher,
    assignments,
    tokenVerifier,
    revoke,
    clients,
    credentialSecret,
    listener,
    logins,
    usage,
    async load() {
      // A rotation journaled before a crash lands before anything may refresh.
      await credentials.load();
      await clients.reload();
      await listener.start();
      logins.startSweeping();
      await usage.start();
      timers.push(setInterval(() => void reloadClients(), o.clientReloadMs ?? (config.PLATFORM_WORKSPACE_TOKENS ? 5_000 : 30_000)));
      timers.push(setInterval(() => void flush(), o.clientFlushMs ?? 2_000));
      for (const t of timers) t.unref();
    },
    run() {
      credentials.start();
    },
    async start() {
      await core.load();
      core.run();
    },
    async close(timeoutMs) {
      assignments.stop();
      const finished = await credentials.stop(timeoutMs);
      await logins.close();
      await usage.close();
      for (const t of timers) clearInterval(t);
      await flush();
      await listener.close();
      await pool.end().catch(() => undefined);
      if (!o.dispatcher) await dispatcher.close().catch(() => undefined);
      return finished;
    },
  };
  return core;
}
