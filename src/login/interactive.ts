import { authorizeUrl, BROWSER_REDIRECT_URI, codeFromCallback } from './browser.js';
import { deviceRedirectUri, LOGIN_TTL_MS, requestDeviceCode, verificationUri, waitForDeviceApproval } from './device.js';
import { LoginError } from './errors.js';
import { exchangeCode, type IssuedTokens } from './exchange.js';
import type { IssuerOptions } from './issuer.js';
import { createPkce, createState } from './pkce.js';

/** A login driven from a terminal (the CLI): the flows without persisted state. */
export interface InteractiveOptions {
  issuer: IssuerOptions;
  /** Aborts on Ctrl-C. */
  signal: AbortSignal;
  /** One line for the operator (never a secret other than the user code they must type). */
  say: (line: string) => void;
  /** The browser flow's pasted callback URL. */
  readCallback: (signal: AbortSignal) => Promise<string>;
  now?: () => number;
}

export async function deviceLogin(o: InteractiveOptions): Promise<IssuedTokens> {
  const now = o.now ?? Date.now;
  const code = await requestDeviceCode(o.issuer, o.signal);
  const deadline = now() + LOGIN_TTL_MS;
  o.say(`1. Open ${verificationUri(o.issuer)} in a browser and sign in to the ChatGPT account the fleet should use.`);
  o.say(`2. Enter this one-time code (it expires in 15 minutes):  ${code.userCode}`);
  o.say('Go on only if you started this login yourself. Waiting for the code to be entered (Ctrl-C cancels)...');
  const approved = await waitForDeviceApproval(o.issuer, code, {
    deadline,
    signal: o.signal,
    now,
    onTransient: (err) => o.say(`(${err.message}; still waiting)`),
  });
  return exchangeCode(o.issuer, { code: approved.authorizationCode, redirectUri: deviceRedirectUri(o.issuer), codeVerifier: approved.codeVerifier });
}

export async function browserLogin(o: InteractiveOptions): Promise<IssuedTokens> {
  const pkce = createPkce();
  const state = createState();
  o.say('1. Open this URL in a browser and sign in to the ChatGPT account the fleet should use:');
  o.say('');
  o.say(`   ${authorizeUrl(o.issuer, pkce.challenge, state)}`);
  o.say('');
  o.say(`2. The browser then lands on ${BROWSER_REDIRECT_URI}?code=... and shows an error page (nothing listens there):`);
  o.say('   copy that whole address from the address bar and paste it here, then press Enter (it expires in 15 minutes; Ctrl-C cancels).');
  const deadline = AbortSignal.timeout(LOGIN_TTL_MS);
  let pasted: string;
  try {
    pasted = await o.readCallback(AbortSignal.any([o.signal, deadline]));
  } catch (err) {
    if (o.signal.aborted) throw new LoginError('cancelled', 'the login was cancelled', { cause: err });
    if (deadline.aborted) throw new LoginError('expired', 'no callback URL was pasted within 15 minutes: start a new login', { cause: err });
    throw err;
  }
  const code = codeFromCallback(pasted, state);
  return exchangeCode(o.issuer, { code, redirectUri: BROWSER_REDIRECT_URI, codeVerifier: pkce.verifier });
}
