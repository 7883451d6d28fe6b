import { createInterface } from 'node:readline';
import type { Config } from '../config.js';
import type { Logger } from '../logger.js';
import type { SecretStore } from '../secret-store.js';
import { LoginError } from './errors.js';
import { loginDocument } from './exchange.js';
import { browserLogin, deviceLogin } from './interactive.js';
import { storeLogin } from './store.js';

export const LOGIN_USAGE = 'usage: npx codex-auth-broker login [--credential default] [--browser] [--force]';

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
 * `codex-auth-broker login [--credential default] [--browser]`: log in from here and store
 * the result like any login (storeLogin). Ctrl-C cancels: exit 130, nothing stored.
 */
export async function loginCommand(config: Config, logger: Logger, args: string[], withStore: WithStore, io: Io): Promise<number> {
  let credential = 'default';
  let browser = false;
  let force = false;
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === '--help' || a === '-h') {
      io.out(`${LOGIN_USAGE}\n\nLog in the shared ChatGPT account from here and store it (as codex writes auth.json): by default with a\ndevice code typed at ${config.OAUTH_ISSUER.replace(/\/+$/, '')}/codex/device; with --browser, by signing in through an authorize URL\nand pasting back the address the browser lands on. Ctrl-C cancels (nothing is stored).`);
      return 0;
    }
    if (a === '--browser') browser = true;
    else if (a === '--force') force = true;
    else if (a === '--credential' && args[i + 1] !== undefined) credential = args[++i] ?? '';
    else if (a?.startsWith('--credential=')) credential = a.slice('--credential='.length);
    else {
      io.err(`login: unexpected argument ${JSON.stringify(a)}\n${LOGIN_USAGE}`);
      return 2;
    }
  }
  if (credential !== 'default') {
    io.err(`login: no credential named ${JSON.stringify(credential)}: only "default" exists today (named credentials come later). Nothing was stored.`);
    return 2;
  }
  const issuer = { issuer: config.OAUTH_ISSUER, clientId: config.OAUTH_CLIENT_ID, timeoutMs: config.UPSTREAM_TIMEOUT_SECONDS * 1000 };
  const cancel = new AbortController();
  const onSigint = () => cancel.abort();
  process.on('SIGINT', onSigint);
  const started = Date.now();
  try {
    return await withStore(async (store) => {
      io.out(`Logging in credential "${credential}" (stored under ${config.CODEX_AUTH_SECRET_KEY}) with ${browser ? 'a browser sign-in' : 'a device code'} at ${config.OAUTH_ISSUER}:`);
      const ui = { issuer, signal: cancel.signal, say: io.out, readCallback: readLine };
      const tokens = browser ? await browserLogin(ui) : await deviceLogin(ui);
      if (cancel.signal.aborted) throw new LoginError('cancelled', 'the login was cancelled');
      const account = await storeLogin({
        store,
        secretKey: config.CODEX_AUTH_SECRET_KEY,
        replicaId: `cli-${process.pid}`,
        method: browser ? 'browser' : 'device',
        doc: loginDocument(tokens, new Date()),
        startedAt: started,
        logger,
        source: 'cli',
        force,
      });
      io.out(`Logged in: account ${account.accountId ?? 'unknown'}, plan ${account.planType ?? 'unknown'}. Stored under ${config.CODEX_AUTH_SECRET_KEY}; running brokers pick it up at once.`);
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
  }
}
