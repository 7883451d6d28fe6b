import { createInterface } from 'node:readline';
import { EnvHttpProxyAgent } from '../lib/http-client.js';
import type { Config } from '../config.js';
import { registerCredential } from '../credential/catalog.js';
import { badNameFlag, DEFAULT_CREDENTIAL, secretKeyOf } from '../credential/names.js';
import type { PoolClient } from '../db.js';
import type { Logger } from '../logger.js';
import type { SecretStore } from '../secret-store.js';
import { LoginError } from './errors.js';
import { loginDocument } from './exchange.js';
import { browserLogin, deviceLogin } from './interactive.js';
import { storeLogin } from './store.js';

export const LOGIN_USAGE = 'usage: npx codex-auth-broker login [--credential <name>] [--pool <pool>] [--browser] [--force]';

type WithStore = <T>(fn: (store: SecretStore) => Promise<T>) => Promise<T>;
/** Standard output and error, passed in by the CLI. */
export interface Io {
  out: (line: string) => void;
  err: (line: string) => void;
}

/** The first line typed (or piped) on standard input. */
function readLine(signal: AbortSignal): Promise<string> {
  return new Promise((resolve, reject) => {
    const rl = createInterface({ input: process.stdin, terminal: false });
    const done = (fn: () => void) => {
      signal.removeEventListener('abort', onAbort);
      rl.removeAllListeners();
      rl.close();
      process.stdin.pause();
      fn();
    };
    const onAbort = () => done(() => reject(new Error('aborted')));
    signal.addEventListener('abort', onAbort, { once: true });
    rl.once('line', (line) => done(() => resolve(line)));
    rl.once('close', () => done(() => reject(new LoginError('bad_callback', 'standard input ended before a callback URL was pasted; nothing was stored'))));
  });
}

/**
 * `codex-auth-broker login [--credential <name>] [--pool <pool>] [--browser]`: log in from
 * here and store the result like any login (storeLogin); a new name is created with the
 * stored login, never before it. Ctrl-C cancels: exit 130, nothing stored.
 */
export async function loginCommand(config: Config, logger: Logger, args: string[], withStore: WithStore, io: Io): Promise<number> {
  let credential = DEFAULT_CREDENTIAL;
  let pool: string | undefined;
  let browser = false;
  let force = false;
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === '--help' || a === '-h') {
      io.out(
        `${LOGIN_USAGE}\n\nLog in a ChatGPT account from here and store it (as codex writes auth.json): by default with a\ndevice code typed at ${config.OAUTH_ISSUER.replace(/\/+$/, '')}/codex/device; with --browser, by signing in through an authorize URL\nand pasting back the address the browser lands on. --credential stores it as a named login beside\ndefault (created if new), --pool puts that credential in a pool (default: default). Ctrl-C cancels\n(nothing is stored).`,
      );
      return 0;
    }
    if (a === '--browser') browser = true;
    else if (a === '--force') force = true;
    else if (a === '--credential' && args[i + 1] !== undefined) credential = args[++i] ?? '';
    else if (a?.startsWith('--credential=')) credential = a.slice('--credential='.length);
    else if (a === '--pool' && args[i + 1] !== undefined) pool = args[++i] ?? '';
    else if (a?.startsWith('--pool=')) pool = a.slice('--pool='.length);
    else {
      io.err(`login: unexpected argument ${JSON.stringify(a)}\n${LOGIN_USAGE}`);
      return 2;
    }
  }
  const badName = badNameFlag('login', [['--credential', credential], ['--pool', pool]]);
  if (badName) {
    io.err(badName);
    return 2;
  }
  const secretKey = secretKeyOf(credential, config.CODEX_AUTH_SECRET_KEY);
  // As for seed: a named login joins the list every replica holds (default needs a row only for a pool).
  const listed = credential !== DEFAULT_CREDENTIAL || pool !== undefined;
  // Through HTTPS_PROXY / HTTP_PROXY / NO_PROXY, like every call serve makes.
  const dispatcher = new EnvHttpProxyAgent();
  const issuer = { issuer: config.OAUTH_ISSUER, clientId: config.OAUTH_CLIENT_ID, timeoutMs: config.UPSTREAM_TIMEOUT_SECONDS * 1000, dispatcher };
  const cancel = new AbortController();
  const onSigint = () => cancel.abort();
  process.on('SIGINT', onSigint);
  const started = Date.now();
  try {
    return await withStore(async (store) => {
      io.out(`Logging in credential "${credential}"${pool ? ` (pool ${pool})` : ''} (stored under ${secretKey}) with ${browser ? 'a browser sign-in' : 'a device code'} at ${config.OAUTH_ISSUER}:`);
      const ui = { issuer, signal: cancel.signal, say: io.out, readCallback: readLine };
      const tokens = browser ? await browserLogin(ui) : await deviceLogin(ui);
      if (cancel.signal.aborted) throw new LoginError('cancelled', 'the login was cancelled');
      const account = await storeLogin({
        store,
        secretKey,
        replicaId: `cli-${process.pid}`,
        method: browser ? 'browser' : 'device',
        doc: loginDocument(tokens, new Date()),
        startedAt: started,
        logger,
        source: 'cli',
        force,
        ...(listed ? { register: (db: PoolClient) => registerCredential(db, credential, config.CODEX_AUTH_SECRET_KEY, pool) } : {}),
      });
      io.out(`Logged in: account ${account.accountId ?? 'unknown'}, plan ${account.planType ?? 'unknown'}. Stored under ${secretKey}; running brokers pick it up at once.`);
      return 0;
    });
  } catch (err) {
    if (!(err instanceof LoginError)) throw err;
    if (err.reason === 'cancelled') {
      io.err('login: cancelled; nothing was stored.');
      return 130;
    }
    io.err(`login: ${err.message}${/nothing was stored/.test(err.message) ? '' : '. Nothing was stored.'}`);
    // The same exit code as a stale seed: the guard refused it.
    return err.reason === 'stale_login' ? 4 : 1;
  } finally {
    process.off('SIGINT', onSigint);
    await dispatcher.close().catch(() => undefined);
  }
}
