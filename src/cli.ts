#!/usr/bin/env node
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { validateSeed } from './auth-json.js';
import { buildSnapshot, stateOf } from './credential.js';
import { loadConfig, type Config } from './config.js';
import { createPool, migrate } from './db.js';
import { AuthJsonError, BrokerError, ConfigError } from './errors.js';
import { readLatch } from './refresh-guards.js';
import { createLogger, type Logger } from './logger.js';
import { isoFromMs, isoFromSeconds } from './lib/time.js';
import { ClientInputError, createClient, listClients, revokeClient } from './clients/client-store.js';
import { loadCredentialSecret } from './clients/credentials.js';
import { fdExhaustionReporter } from './http/connection-limits.js';
import { guardMemoryUsage, isFdExhaustion } from './lib/fd-limit.js';
import { openDatabase, startBroker } from './runtime.js';
import { SecretStore } from './secret-store.js';
import { describeRefusal, seedCredential } from './seed-guard.js';
import { loginCommand } from './login/command.js';
import { parseCommand, usage } from './cli/args.js';
import { credentialsCommand } from './cli/credentials.js';
import { describePools, poolsStatus } from './cli/pools-status.js';
import { registerCredential } from './credential/catalog.js';
import { badNameFlag, DEFAULT_CREDENTIAL, secretKeyOf } from './credential/names.js';
import { generationOf } from './clients/credentials.js';
import { readUsage } from './usage/store.js';
import { describeUsage, usageViewOfRow, type UsageView } from './usage/view.js';

async function withStore<T>(
  config: Config,
  logger: Logger,
  fn: (store: SecretStore, db: ReturnType<typeof createPool>, key: Buffer | undefined) => Promise<T>,
): Promise<T> {
  const db = await openDatabase(config, logger);
  const pool = createPool(db.url, logger, 2);
  try {
    await migrate(pool, logger);
    return await fn(new SecretStore(pool, db.config.encryptionKey), pool, db.config.encryptionKey);
  } finally {
    await pool.end().catch(() => undefined);
    if (db.embedded?.owned) await db.embedded.stop().catch(() => undefined);
  }
}

/** Exit code of a seed the stale-seed guard refused (nothing stored). */
const EXIT_STALE_SEED = 4;
const EXIT_POOL_EXHAUSTED = 5;

async function seed(config: Config, logger: Logger, file: string, force: boolean, credential = DEFAULT_CREDENTIAL, credentialPool?: string): Promise<number> {
  const badName = badNameFlag('seed', [['--credential', credential], ['--pool', credentialPool]]);
  if (badName) {
    console.error(badName);
    return 2;
  }
  const secretKey = secretKeyOf(credential, config.CODEX_AUTH_SECRET_KEY);
  let text: string;
  try {
    text = file === '-' ? await readStdin() : await readFile(file, 'utf8');
  } catch (err) {
    console.error(`seed: cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    return 2;
  }
  let parsed;
  try {
    parsed = validateSeed(text);
  } catch (err) {
    if (err instanceof AuthJsonError) {
      console.error(`seed: ${file} is not a usable codex login: ${err.message}. Nothing was stored.`);
      return 2;
    }
    throw err;
  }
  const snap = buildSnapshot(Buffer.alloc(0), JSON.stringify(parsed.doc));
  const result = await withStore(config, logger, async (store, pool) => {
    const r = await seedCredential({ store, secretKey, parsed, source: 'cli', force, replicaId: config.replicaId, logger });
    // A named login joins the list every replica holds (default needs a row only for a pool).
    if (r.stored && (credential !== DEFAULT_CREDENTIAL || credentialPool !== undefined)) await registerCredential(pool, credential, config.CODEX_AUTH_SECRET_KEY, credentialPool);
    return r;
  });
  if (!result.stored) {
    console.error(`seed: refused ${file}: ${describeRefusal(result.refusal)}. Nothing was stored.`);
    console.error('Log in again for a fresh auth.json, or, if you are sure this is the login to keep, repeat with --force.');
    return EXIT_STALE_SEED;
  }
  const exp = snap.claims.exp !== undefined ? new Date(snap.claims.exp * 1000).toISOString() : 'unknown';
  if (result.overrode) console.log(`forced past the stale-seed guard: ${describeRefusal(result.overrode)}`);
  console.log(
    `stored the login${credential === DEFAULT_CREDENTIAL ? '' : ` as credential ${credential}${credentialPool ? ` (pool ${credentialPool})` : ''}`} under ${secretKey}: account ${snap.account.accountId ?? 'unknown'}, plan ${snap.account.planType ?? 'unknown'}, access token expires ${exp}`,
  );
  console.log('running brokers pick it up at once (NOTIFY codex_auth_changed). Delete the local auth.json copy: the broker owns this login now.');
  return 0;
}

/** The `default` credential as `status` has always described it (the first lines, and the JSON's top level). */
async function defaultStatus(config: Config, store: SecretStore, pool: ReturnType<typeof createPool>) {
  const row = await store.read(config.CODEX_AUTH_SECRET_KEY);
  if (!row) return { state: 'absent' as string, detail: 'no credential stored: log in (`npx codex-auth-broker login`) or seed (`npx codex-auth-broker seed auth.json`)' };
  let plaintext: string;
  try {
    plaintext = store.decrypt(row);
  } catch (err) {
    return { state: 'invalid', detail: (err as Error).message, encryptionVersion: row.version };
  }
  if (plaintext.trim() === '') return { state: 'absent', detail: 'the stored value is blank' };
  let snap;
  try {
    snap = buildSnapshot(row.raw, plaintext);
  } catch (err) {
    return { state: 'invalid', detail: (err as Error).message };
  }
  const client = await pool.connect();
  const latch = await readLatch(client, config.CODEX_AUTH_SECRET_KEY).finally(() => client.release());
  const latched = latch !== undefined && latch.refreshTokenSha === snap.refreshTokenSha;
  const intervalMs = config.USAGE_POLL_INTERVAL_SECONDS * 1000;
  const usageRow = intervalMs > 0 ? (await readUsage(pool, [config.CODEX_AUTH_SECRET_KEY])).get(config.CODEX_AUTH_SECRET_KEY) : undefined;
  return {
    state: stateOf(snap, latched, Date.now(), config.REFRESH_MARGIN_SECONDS),
    accountId: snap.account.accountId ?? null,
    planType: snap.account.planType ?? null,
    accessTokenExpiresAt: isoFromSeconds(snap.claims.exp),
    lastRefresh: isoFromMs(snap.lastRefreshMs),
    encryptionVersion: row.version,
    updatedAt: isoFromMs(row.updatedAt.getTime()),
    latch: latched ? { upstreamStatus: latch.status ?? null, upstreamCode: latch.code ?? null, at: isoFromMs(latch.at.getTime()) } : null,
    usage: intervalMs > 0 ? usageViewOfRow(usageRow, intervalMs) : null,
  };
}

async function status(config: Config, logger: Logger, json: boolean): Promise<number> {
  const [defaultReport, pools] = await withStore(config, logger, async (store, pool) => [
    await defaultStatus(config, store, pool),
    await poolsStatus(store, pool, {
      defaultKey: config.CODEX_AUTH_SECRET_KEY,
      marginSeconds: config.REFRESH_MARGIN_SECONDS,
      usageIntervalMs: config.USAGE_POLL_INTERVAL_SECONDS * 1000,
      switchPercent: config.POOL_SWITCH_PERCENT,
    }),
  ] as const);
  const report = { ...defaultReport, credentials: pools.credentials, exhaustedPools: pools.exhaustedPools };
  if (json) console.log(JSON.stringify(report, null, 2));
  else {
    for (const [k, v] of Object.entries(defaultReport)) {
      const text = k === 'usage' && v !== null ? describeUsage(v as UsageView) : typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v);
      console.log(`${k.padEnd(22)} ${text}`);
    }
    console.log('credentials');
    for (const line of describePools(pools)) console.log(line);
  }
  // 3: a credential cannot serve; 5: it can, but a pool has no headroom left.
  if (pools.unusable.length > 0) return 3;
  return pools.exhaustedPools.length > 0 ? EXIT_POOL_EXHAUSTED : 0;
}

async function clients(config: Config, logger: Logger, sub: string, name: string | undefined, flags: Record<string, string | true>): Promise<number> {
  return withStore(config, logger, async (store, pool, key) => {
    switch (sub) {
      case 'add': {
        const workspace = typeof flags['--workspace'] === 'string' ? flags['--workspace'] : undefined;
        const clientPool = typeof flags['--pool'] === 'string' ? flags['--pool'] : undefined;
        try {
          const c = await createClient(pool, await loadCredentialSecret(pool, key), name, workspace, clientPool);
          console.log(`client ${c.name} created${c.workspaceId ? ` for workspace ${c.workspaceId}` : ''}${c.pool !== 'default' ? ` in pool ${c.pool}` : ''}. Shown once, store them now:`);
          console.log(`token               ${c.token}`);
          console.log(`refresh credential  ${c.refreshCredential}`);
          return 0;
        } catch (err) {
          if (err instanceof ClientInputError) {
            console.error(`clients add: ${err.message}`);
            return 2;
          }
          throw err;
        }
      }
      case 'list': {
        const rows = await listClients(pool);
        const current = await currentGeneration(store, config.CODEX_AUTH_SECRET_KEY);
        const list = rows.map((r) => ({
          name: r.name,
          workspaceId: r.workspaceId,
          state: r.lastUsedAt === null ? 'never_seen' : current !== undefined && r.lastServedGeneration === current ? 'active' : 'stale',
          lastSeenAt: r.lastUsedAt,
          createdAt: r.createdAt,
        }));
        if (flags['--json']) {
          console.log(JSON.stringify({ clients: list }, null, 2));
          return 0;
        }
        if (list.length === 0) {
          console.log('no clients: add one with `npx codex-auth-broker clients add <name>`');
          return 0;
        }
        // No part of a token: a prefix narrows a guess and ends up in screenshots and tickets.
        printTable(
          ['NAME', 'WORKSPACE', 'STATE', 'LAST SEEN'],
          list.map((c) => [c.name, c.workspaceId ?? '-', c.state, c.lastSeenAt ?? 'never']),
        );
        return 0;
      }
      default: {
        if (!(await revokeClient(pool, name ?? ''))) {
          console.error(`clients revoke: no live client named ${name}`);
          return 1;
        }
        console.log(`revoked ${name}; every replica drops it at once`);
        return 0;
      }
    }
  });
}

/** The generation of the stored access token: what an active client last fetched. */
async function currentGeneration(store: SecretStore, secretKey: string): Promise<string | undefined> {
  try {
    const row = await store.read(secretKey);
    const at = row ? buildSnapshot(row.raw, store.decrypt(row)).parsed.tokens.access_token : undefined;
    return at ? generationOf(at) : undefined;
  } catch {
    return undefined;
  }
}

function printTable(header: string[], rows: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i] ?? 0))).join('  ');
  console.log(line(header));
  for (const r of rows) console.log(line(r));
}

function version(): string {
  // src/cli.ts and dist/cli.js both sit one level below package.json.
  return (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

async function serve(config: Config, logger: Logger): Promise<void> {
  // Out of file descriptors (a connection flood) is survivable: connections close and free
  // them. It must not end the process, least of all through the load-shedding sampler.
  const fdExhausted = fdExhaustionReporter(logger);
  guardMemoryUsage(process, (err) => fdExhausted(err, 'memory sampling'));
  const broker = await startBroker(config, logger);
  let closing = false;
  const exit = (code: number) => {
    logger.flush();
    process.exit(code);
  };
  const shutdown = (reason: string, code: number) => {
    if (closing) {
      // npm and a terminal both deliver Ctrl-C: a second signal must not cut short the
      // write-back of a refresh in flight. SIGKILL still ends the process at once.
      logger.warn({ event: 'shutdown_in_progress', reason }, 'already shutting down; waiting for any refresh in flight (SIGKILL forces)');
      return;
    }
    closing = true;
    logger.info({ event: 'shutdown', reason }, `${reason}: finishing any refresh in flight, then stopping`);
    const deadline = setTimeout(() => {
      // Something held the orderly shutdown (a connection, a hung query). Exiting without
      // the embedded Postgres would leave it running, owned by nobody.
      const embedded = broker.db.embedded?.owned ? broker.db.embedded : undefined;
      logger.error({ event: 'shutdown_timeout', embedded: embedded !== undefined }, `shutdown did not finish in time; ${embedded ? 'stopping the embedded Postgres, then ' : ''}exiting`);
      if (!embedded) return exit(1);
      embedded
        .forceStop(5_000)
        .catch(() => false)
        .then((gone) => {
          if (!gone) logger.error({ event: 'embedded_db_stop_failed' }, 'the embedded Postgres did not stop; the next serve on this DATA_DIR takes it over and stops it');
          exit(1);
        });
    }, (config.SHUTDOWN_TIMEOUT_SECONDS + 10) * 1000);
    deadline.unref();
    broker
      .close()
      .catch((err: Error) => logger.error({ event: 'shutdown_failed', err: { message: err.message } }, 'shutdown failed'))
      .finally(() => exit(code));
  };
  process.on('SIGTERM', () => shutdown('received SIGTERM', 0));
  process.on('SIGINT', () => shutdown('received SIGINT', 0));
  process.on('uncaughtException', (err) => {
    if (isFdExhaustion(err)) return fdExhausted(err, 'an uncaught exception');
    logger.fatal({ event: 'fatal', err: { message: err.message } }, 'unexpected error; shutting down');
    shutdown('uncaught exception', 1);
  });
  process.on('unhandledRejection', (err) => {
    if (isFdExhaustion(err)) return fdExhausted(err as Error, 'an unhandled rejection');
    logger.fatal({ event: 'fatal', err: { message: (err as Error)?.message ?? String(err) } }, 'unhandled rejection; shutting down');
    shutdown('unhandled rejection', 1);
  });
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    console.log(usage());
    return command ? 0 : 2;
  }
  if (command === '--version' || command === '-v') {
    console.log(version());
    return 0;
  }
  // Help and argument errors come before the configuration: `--help` never acts.
  const parsed = parseCommand(command, rest);
  if (parsed.kind === 'help') {
    console.log(parsed.text);
    return 0;
  }
  if (parsed.kind === 'error') {
    console.error(`codex-auth-broker ${parsed.message}${parsed.message.startsWith('unknown command') ? `\n\n${usage()}` : ''}`);
    return 2;
  }
  let config: Config;
  try {
    config = loadConfig(command === 'serve' ? process.env : { LOG_LEVEL: 'warn', ...process.env });
  } catch (err) {
    if (err instanceof ConfigError) {
      console.error(`codex-auth-broker: invalid configuration: ${err.message}`);
      return 78;
    }
    throw err;
  }
  const logger =
    command === 'serve'
      ? createLogger(config.LOG_LEVEL, undefined, { pretty: config.LOG_FORMAT === 'pretty' || (config.LOG_FORMAT === 'auto' && process.stdout.isTTY === true) })
      : createLogger(config.LOG_LEVEL, process.stderr);
  if (command !== 'serve' && command !== 'login') {
    // Ctrl-C in a one-shot command: say so and stop, no stack trace. An embedded Postgres it
    // started is taken over and stopped by the next command or serve in DATA_DIR.
    process.once('SIGINT', () => {
      console.error(`\ncodex-auth-broker ${command}: interrupted`);
      process.exit(130);
    });
  }
  const { flags, positionals } = parsed;
  try {
    switch (command) {
      case 'serve':
        await serve(config, logger);
        return -1;
      case 'seed':
        return await seed(
          config,
          logger,
          positionals[0]!,
          flags['--force'] === true,
          typeof flags['--credential'] === 'string' ? flags['--credential'] : undefined,
          typeof flags['--pool'] === 'string' ? flags['--pool'] : undefined,
        );
      case 'login':
        return await loginCommand(config, logger, rest, (fn) => withStore(config, logger, (store) => fn(store)), {
          out: (l) => console.log(l),
          err: (l) => console.error(l),
        });
      case 'status':
        return await status(config, logger, flags['--json'] === true);
      case 'clients':
        return await clients(config, logger, parsed.sub!, positionals[0], flags);
      case 'credentials':
        return await withStore(config, logger, (store, pool) =>
          credentialsCommand(
            parsed.sub!,
            positionals[0],
            flags,
            { store, pool, defaultKey: config.CODEX_AUTH_SECRET_KEY, marginSeconds: config.REFRESH_MARGIN_SECONDS },
            { out: (l) => console.log(l), err: (l) => console.error(l), table: printTable },
          ),
        );
      default: {
        const db = await openDatabase(config, logger);
        const pool = createPool(db.url, logger, 1);
        try {
          const applied = await migrate(pool, logger);
          console.log(applied.length ? `applied migrations: ${applied.join(', ')}` : 'database is up to date');
        } finally {
          await pool.end();
          if (db.embedded?.owned) await db.embedded.stop();
        }
        return 0;
      }
    }
  } catch (err) {
    const msg = err instanceof BrokerError ? `${err.code}: ${err.message}` : (err as Error).message;
    logger.fatal({ event: 'command_failed', command, err: { message: msg } }, `${command} failed: ${msg}`);
    logger.flush();
    console.error(`codex-auth-broker ${command}: ${msg}`);
    return err instanceof ConfigError ? 78 : 1;
  }
}

// `status | head -1`: the reader went away. That is the reader's choice, not an error.
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(process.exitCode ?? 0);
    throw err;
  });
}

const code = await main(process.argv.slice(2));
if (code >= 0) process.exitCode = code;
