import { isCredentialName, secretKeyOf } from '../credential/names.js';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleepFor } from 'node:timers/promises';
import type { Pool, PoolClient } from '../db.js';
import { open, seal } from '../lib/secret-crypto.js';
import type { Logger } from '../logger.js';
import type { SecretStore } from '../secret-store.js';
import { authorizeUrl, BROWSER_REDIRECT_URI, codeFromCallback } from './browser.js';
import { deviceRedirectUri, LOGIN_TTL_MS, pollDeviceCode, requestDeviceCode, verificationUri } from './device.js';
import { LoginError } from './errors.js';
import { exchangeCode, loginDocument } from './exchange.js';
import type { IssuerOptions } from './issuer.js';
import { createPkce, createState } from './pkce.js';
import { storeLogin, type LoginMethod } from './store.js';

export type LoginState = 'pending' | 'succeeded' | 'failed' | 'expired';

export interface LoginView {
  id: string;
  credential: string;
  method: LoginMethod;
  state: LoginState;
  error?: string;
  expires_at: string;
  account_id?: string;
  plan_type?: string;
}

export type StartedLogin =
  | { id: string; method: 'device'; verification_uri: string; user_code: string; expires_at: string }
  | { id: string; method: 'browser'; authorize_url: string; expires_at: string };

export interface LoginManagerOptions {
  pool: Pool;
  store: SecretStore;
  /** Where credential `default` is stored (CODEX_AUTH_SECRET_KEY): the only credential today. */
  secretKey: string;
  replicaId: string;
  /** SECRETS_ENCRYPTION_KEY: login secrets are sealed with it like the credential. */
  encryptionKey: Buffer | undefined;
  issuer: IssuerOptions;
  logger: Logger;
  /** Make the credential known (a login may create one): runs in the transaction that stores the login, so only a stored login creates one. */
  register?: (credential: string, db: PoolClient) => Promise<unknown>;
  /** After a login is stored (this replica takes up the credential and reloads at once; the others on NOTIFY). */
  onStored?: (credential: string) => Promise<void>;
  /** A login ended (metrics). */
  onFinished?: (method: LoginMethod, state: Exclude<LoginState, 'pending'>) => void;
  /** Seams for tests: login lifetime, poller lease, poll interval (default: the issuer's), sweep period. */
  ttlMs?: number;
  leaseMs?: number;
  pollIntervalMs?: number;
  sweepMs?: number;
}

interface DeviceSecrets {
  deviceAuthId: string;
  userCode: string;
}
interface BrowserSecrets {
  verifier: string;
  state: string;
}

interface Row {
  id: string;
  credential: string;
  method: LoginMethod;
  state: LoginState;
  error: string | null;
  expires_at: Date;
  account_id: string | null;
  plan_type: string | null;
  expired: boolean;
  lease_lapsed: boolean;
}

const ROW = `id, credential, method, state, error, expires_at, account_id, plan_type, expires_at < now() AS expired,
  (lease_until IS NULL OR lease_until < now()) AS lease_lapsed`;

function view(r: Row): LoginView {
  return {
    id: r.id,
    credential: r.credential,
    method: r.method,
    state: r.state,
    ...(r.error !== null ? { error: r.error } : {}),
    expires_at: r.expires_at.toISOString(),
    ...(r.account_id !== null ? { account_id: r.account_id } : {}),
    ...(r.plan_type !== null ? { plan_type: r.plan_type } : {}),
  };
}

/**
 * Logins performed by the broker, kept in broker_logins so that every step may land on any
 * replica. A device login is polled by the replica that holds its lease (the one that
 * started it, renewing before each poll); a replica that reads a pending device login
 * whose lease has lapsed (its poller died or stopped) claims it and polls on. Every
 * completed login is stored through storeLogin.
 */
export class LoginManager {
  readonly #o: LoginManagerOptions;
  readonly #ttlMs: number;
  readonly #leaseMs: number;
  readonly #pollers = new Map<string, { abort: AbortController; done: Promise<void> }>();
  #timer: NodeJS.Timeout | undefined;
  #closed = false;

  constructor(o: LoginManagerOptions) {
    this.#o = o;
    this.#ttlMs = o.ttlMs ?? LOGIN_TTL_MS;
    this.#leaseMs = o.leaseMs ?? 60_000;
  }

  /** The store key of a credential name (any valid name: a login may create the credential). */
  secretKeyOf(credential: string): string | undefined {
    return isCredentialName(credential) ? secretKeyOf(credential, this.#o.secretKey) : undefined;
  }

  /** Device logins being polled by this replica (for tests and shutdown). */
  get polling(): number {
    return this.#pollers.size;
  }

  async begin(credential: string, method: LoginMethod): Promise<StartedLogin> {
    if (this.secretKeyOf(credential) === undefined) {
      throw new LoginError('unknown_credential', `${JSON.stringify(credential)} is not a credential name: lower-case letters, digits and -, at most 40 characters`);
    }
    await this.#expireStale();
    const busy = await this.#o.pool.query<{ id: string }>(`SELECT id FROM broker_logins WHERE credential = $1 AND state = 'pending'`, [credential]);
    if (busy.rows[0]) throw this.#inProgress(credential, busy.rows[0].id);
    const id = randomUUID();
    if (method === 'device') {
      const code = await requestDeviceCode(this.#o.issuer);
      const interval = this.#o.pollIntervalMs ?? code.intervalMs;
      const expiresAt = await this.#insert(id, credential, method, { deviceAuthId: code.deviceAuthId, userCode: code.userCode } satisfies DeviceSecrets, interval);
      this.#poll(id, code, interval);
      this.#log(id, credential, method);
      return { id, method, verification_uri: verificationUri(this.#o.issuer), user_code: code.userCode, expires_at: expiresAt };
    }
    const pkce = createPkce();
    const state = createState();
    const expiresAt = await this.#insert(id, credential, method, { verifier: pkce.verifier, state } satisfies BrowserSecrets, null);
    this.#log(id, credential, method);
    return { id, method, authorize_url: authorizeUrl(this.#o.issuer, pkce.challenge, state), expires_at: expiresAt };
  }

  async get(id: string): Promise<LoginView | undefined> {
    let row = await this.#read(id);
    if (!row) return undefined;
    if (row.state === 'pending' && row.expired) {
      await this.#finish(id, 'expired', 'the login was not completed within 15 minutes: start a new one');
      row = (await this.#read(id)) ?? row;
    } else if (row.state === 'pending' && row.method === 'device' && row.lease_lapsed) {
      await this.#resume(id);
    }
    return view(row);
  }

  /** Complete a browser login with the URL the operator's browser landed on. */
  async completeBrowser(id: string, callbackUrl: string): Promise<LoginView> {
    // Claim the login so two pasted callbacks cannot both spend the single-use code.
    const claimed = await this.#o.pool.query<{ credential: string; secrets: Buffer; secrets_version: number; expired: boolean; created_at: Date }>(
      `UPDATE broker_logins SET lease_owner = $2, lease_until = now() + make_interval(secs => $3)
       WHERE id = $1 AND method = 'browser' AND state = 'pending' AND (lease_until IS NULL OR lease_until < now())
       RETURNING credential, secrets, secrets_version, expires_at < now() AS expired, created_at`,
      [id, this.#o.replicaId, this.#leaseMs / 1000],
    );
    const c = claimed.rows[0];
    if (!c) {
      const row = await this.#read(id);
      if (!row) throw new LoginError('unknown_login', `no login ${id}`);
      if (row.method !== 'browser') throw new LoginError('wrong_method', `login ${id} is a device login: it completes when the code is entered, with no callback`);
      if (row.state !== 'pending') throw new LoginError('login_finished', `login ${id} has already ${row.state === 'succeeded' ? 'succeeded' : `ended (${row.state})`}: start a new one`);
      throw new LoginError('login_busy', `a callback for login ${id} is being handled right now`);
    }
    if (c.expired) {
      await this.#finish(id, 'expired', 'the login was not completed within 15 minutes: start a new one');
      throw new LoginError('expired', `login ${id} expired (15 minutes): start a new one`);
    }
    const secrets = JSON.parse(open(c.secrets, c.secrets_version, this.#o.encryptionKey).toString('utf8')) as BrowserSecrets;
    let code: string;
    try {
      code = codeFromCallback(callbackUrl, secrets.state);
    } catch (err) {
      if (err instanceof LoginError && err.reason === 'authorization_denied') await this.#finish(id, 'failed', err.message);
      // A wrong or incomplete paste leaves the login pending: the right URL may follow.
      else await this.#release(id);
      throw err;
    }
    await this.#complete(id, c.credential, 'browser', () => exchangeCode(this.#o.issuer, { code, redirectUri: BROWSER_REDIRECT_URI, codeVerifier: secrets.verifier }), c.created_at.getTime());
    const row = await this.#read(id);
    if (!row) throw new LoginError('unknown_login', `no login ${id}`);
    if (row.state === 'failed') throw new LoginError('exchange_failed', row.error ?? 'the login failed');
    return view(row);
  }

  /** Expire old logins and take over device logins whose poller is gone, every sweepMs. */
  startSweeping(): void {
    if (this.#timer || this.#o.sweepMs === 0) return;
    this.#timer = setInterval(() => void this.sweep(), this.#o.sweepMs ?? 15_000);
    this.#timer.unref();
  }

  async sweep(): Promise<void> {
    try {
      await this.#expireStale();
      const lapsed = await this.#o.pool.query<{ id: string }>(
        `SELECT id FROM broker_logins WHERE state = 'pending' AND method = 'device' AND (lease_until IS NULL OR lease_until < now())`,
      );
      for (const r of lapsed.rows) await this.#resume(r.id);
    } catch (err) {
      this.#o.logger.warn({ event: 'login_sweep_failed', err: { message: (err as Error).message } }, 'could not check pending logins; will retry');
    }
  }

  /** Stop polling (bounded) and hand this replica's device logins to the others at once. */
  async close(timeoutMs = 5_000): Promise<void> {
    this.#closed = true;
    if (this.#timer) clearInterval(this.#timer);
    for (const p of this.#pollers.values()) p.abort.abort();
    const all = Promise.allSettled([...this.#pollers.values()].map((p) => p.done));
    await Promise.race([all, sleepFor(timeoutMs, undefined, { ref: false })]);
    await this.#o.pool
      .query(`UPDATE broker_logins SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1 AND state = 'pending'`, [this.#o.replicaId])
      .catch(() => undefined);
  }

  // ---- the state machine's steps ----

  async #insert(id: string, credential: string, method: LoginMethod, secrets: DeviceSecrets | BrowserSecrets, intervalMs: number | null): Promise<string> {
    const sealed = seal(Buffer.from(JSON.stringify(secrets), 'utf8'), this.#o.encryptionKey);
    try {
      const r = await this.#o.pool.query<{ expires_at: Date }>(
        `INSERT INTO broker_logins (id, credential, method, secrets, secrets_version, poll_interval_ms, lease_owner, lease_until, created_by, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $7::text IS NULL THEN NULL ELSE now() + make_interval(secs => $8) END, $9, now() + make_interval(secs => $10))
         RETURNING expires_at`,
        [id, credential, method, sealed.bytes, sealed.version, intervalMs, method === 'device' ? this.#o.replicaId : null, this.#leaseMs / 1000, this.#o.replicaId, this.#ttlMs / 1000],
      );
      return (r.rows[0]?.expires_at ?? new Date()).toISOString();
    } catch (err) {
      // Another replica started one between the check and the insert.
      if ((err as { code?: string }).code === '23505') throw this.#inProgress(credential);
      throw err;
    }
  }

  #inProgress(credential: string, id?: string): LoginError {
    return new LoginError(
      'login_in_progress',
      `a login for ${credential} is already in progress${id ? ` (${id})` : ''}: finish it, or wait until it expires (15 minutes after it started)`,
    );
  }

  async #read(id: string): Promise<Row | undefined> {
    const r = await this.#o.pool.query<Row>(`SELECT ${ROW} FROM broker_logins WHERE id = $1`, [id]);
    return r.rows[0];
  }

  async #expireStale(): Promise<void> {
    const r = await this.#o.pool.query<{ id: string; method: LoginMethod }>(
      `UPDATE broker_logins SET state = 'expired', error = 'the login was not completed within 15 minutes: start a new one', finished_at = now(),
         secrets = ''::bytea, lease_owner = NULL, lease_until = NULL
       WHERE state = 'pending' AND expires_at < now() RETURNING id, method`,
    );
    for (const row of r.rows) this.#ended(row.id, row.method, 'expired');
  }

  /** End a pending login (once: a login already ended stays as it ended) and forget its secrets. */
  async #finish(id: string, state: Exclude<LoginState, 'pending'>, error?: string, account?: { accountId?: string | undefined; planType?: string | undefined }): Promise<void> {
    const r = await this.#o.pool.query<{ method: LoginMethod }>(
      `UPDATE broker_logins SET state = $2, error = $3, account_id = $4, plan_type = $5, finished_at = now(), secrets = ''::bytea, lease_owner = NULL, lease_until = NULL
       WHERE id = $1 AND state = 'pending' RETURNING method`,
      [id, state, error ?? null, account?.accountId ?? null, account?.planType ?? null],
    );
    const row = r.rows[0];
    if (row) this.#ended(id, row.method, state, error);
  }

  #ended(id: string, method: LoginMethod, state: Exclude<LoginState, 'pending'>, error?: string): void {
    this.#o.onFinished?.(method, state);
    const level = state === 'succeeded' ? 'info' : 'warn';
    this.#o.logger[level]({ event: 'login_finished', login: id, method, state, ...(error ? { error } : {}) }, `${method} login ${id} ${state}${error ? `: ${error}` : ''}`);
  }

  async #release(id: string): Promise<void> {
    await this.#o.pool.query(`UPDATE broker_logins SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND lease_owner = $2 AND state = 'pending'`, [id, this.#o.replicaId]);
  }

  #log(id: string, credential: string, method: LoginMethod): void {
    this.#o.logger.info({ event: 'login_started', login: id, credential, method }, `started a ${method} login (${id}) for credential ${credential}`);
  }

  /** Exchange, store, record: the end both flows share. A failure ends the login (the code is single-use). */
  async #complete(id: string, credential: string, method: LoginMethod, exchange: () => ReturnType<typeof exchangeCode>, createdAt: number): Promise<void> {
    const secretKey = this.secretKeyOf(credential);
    try {
      if (!secretKey) throw new LoginError('unknown_credential', `no credential named ${credential}`);
      const tokens = await exchange();
      const register = this.#o.register;
      const account = await storeLogin({
        store: this.#o.store,
        secretKey,
        replicaId: this.#o.replicaId,
        method,
        doc: loginDocument(tokens, new Date()),
        startedAt: createdAt,
        logger: this.#o.logger,
        source: 'admin_api',
        ...(register ? { register: (db: PoolClient) => register(credential, db) } : {}),
      });
      await this.#finish(id, 'succeeded', undefined, account);
      await this.#o.onStored?.(credential).catch(() => undefined);
    } catch (err) {
      const msg = err instanceof LoginError ? err.message : `the login could not be stored (${(err as Error).message}): start a new one`;
      await this.#finish(id, 'failed', msg).catch(() => undefined);
    }
  }

  async #resume(id: string): Promise<void> {
    if (this.#closed || this.#pollers.has(id)) return;
    const r = await this.#o.pool.query<{ secrets: Buffer; secrets_version: number; poll_interval_ms: number | null }>(
      `UPDATE broker_logins SET lease_owner = $2, lease_until = now() + make_interval(secs => $3)
       WHERE id = $1 AND state = 'pending' AND method = 'device' AND (lease_until IS NULL OR lease_until < now()) AND expires_at > now()
       RETURNING secrets, secrets_version, poll_interval_ms`,
      [id, this.#o.replicaId, this.#leaseMs / 1000],
    );
    const row = r.rows[0];
    if (!row) return;
    const secrets = JSON.parse(open(row.secrets, row.secrets_version, this.#o.encryptionKey).toString('utf8')) as DeviceSecrets;
    this.#o.logger.info({ event: 'login_resumed', login: id }, `took over polling device login ${id} (its poller's lease lapsed)`);
    this.#poll(id, secrets, this.#o.pollIntervalMs ?? row.poll_interval_ms ?? 5_000);
  }

  #poll(id: string, code: DeviceSecrets, intervalMs: number): void {
    if (this.#closed || this.#pollers.has(id)) return;
    const abort = new AbortController();
    const done = this.#pollLoop(id, code, intervalMs, abort.signal)
      .catch((err: Error) => this.#o.logger.warn({ event: 'login_poll_failed', login: id, err: { message: err.message } }, `polling device login ${id} stopped; another replica takes it over when its lease lapses`))
      .finally(() => this.#pollers.delete(id));
    this.#pollers.set(id, { abort, done });
  }

  async #pollLoop(id: string, code: DeviceSecrets, intervalMs: number, signal: AbortSignal): Promise<void> {
    for (;;) {
      try {
        await sleepFor(intervalMs, undefined, { signal });
      } catch {
        return; // closing: the lease is released, another replica polls on
      }
      // Renew the lease before each poll; losing it means another replica took over or the login ended.
      const lease = await this.#o.pool.query<{ expired: boolean; created_at: Date; credential: string }>(
        `UPDATE broker_logins SET lease_until = now() + make_interval(secs => $3)
         WHERE id = $1 AND state = 'pending' AND lease_owner = $2 RETURNING expires_at < now() AS expired, created_at, credential`,
        [id, this.#o.replicaId, this.#leaseMs / 1000],
      );
      const held = lease.rows[0];
      if (!held) return;
      if (held.expired) {
        await this.#finish(id, 'expired', 'the code was not entered within 15 minutes: start a new login');
        return;
      }
      let poll;
      try {
        poll = await pollDeviceCode(this.#o.issuer, code, signal);
      } catch (err) {
        if (signal.aborted) return;
        if (err instanceof LoginError && err.transient) {
          this.#o.logger.warn({ event: 'login_poll_retry', login: id, err: { message: err.message } }, `device login ${id}: ${err.message}; polling again`);
          continue;
        }
        await this.#finish(id, 'failed', err instanceof LoginError ? err.message : `polling failed (${(err as Error).message}): start a new login`);
        return;
      }
      if (poll.kind === 'pending') continue;
      const approved = poll;
      await this.#complete(id, held.credential, 'device', () =>
        exchangeCode(this.#o.issuer, { code: approved.authorizationCode, redirectUri: deviceRedirectUri(this.#o.issuer), codeVerifier: approved.codeVerifier }),
        held.created_at.getTime(),
      );
      return;
    }
  }
}
