import { timingSafeEqual } from 'node:crypto';
import { sha256 } from '../clients/credentials.js';
import { LoginError } from './errors.js';
import { issuerBase } from './issuer.js';

/**
 * The redirect codex registers for this client (1455, or the fallback 1457, are the only
 * ones the issuer accepts). Nothing listens there for the broker: the operator's browser
 * lands on a page that fails to load, and the operator pastes that URL back.
 */
export const BROWSER_REDIRECT_URI = 'http://localhost:1455/auth/callback';
export const SCOPES = 'openid profile email offline_access api.connectors.read api.connectors.invoke';

/** The authorize request codex sends (server.rs), parameter for parameter. */
export function authorizeUrl(o: { issuer: string; clientId: string }, challenge: string, state: string): string {
  const q = new URLSearchParams({
    response_type: 'code',
    client_id: o.clientId,
    redirect_uri: BROWSER_REDIRECT_URI,
    scope: SCOPES,
    code_challenge: challenge,
    code_challenge_method: 'S256',
    id_token_add_organizations: 'true',
    codex_cli_simplified_flow: 'true',
    state,
    originator: 'codex_cli_rs',
  });
  // codex encodes spaces as %20; the issuer takes either, and %20 reads better when pasted.
  return `${issuerBase(o)}/oauth/authorize?${q.toString().replaceAll('+', '%20')}`;
}

// What is safe to repeat from an issuer's error callback: a code-shaped identifier, and a
// short human description without control characters.
const ERROR_CODE = /^[A-Za-z0-9_.:-]{1,64}$/;

function parseCallbackParams(pasted: string): URLSearchParams {
  const text = pasted.trim();
  try {
    return new URL(text).searchParams;
  } catch {
    // A bare query string ("code=…&state=…" or "?code=…") is accepted too.
    return new URLSearchParams(text.replace(/^[^?]*\?/, ''));
  }
}

/**
 * The authorization code from the URL the browser landed on, after checking its state
 * against the one this login made. Throws LoginError: an `error=` callback, a state that
 * is not this login's (another attempt's URL, or a forged one), or no code.
 */
export function codeFromCallback(pasted: string, expectedState: string): string {
  if (pasted.length > 8192) throw new LoginError('bad_callback', 'the callback URL is longer than 8192 characters; paste the address the browser landed on');
  const p = parseCallbackParams(pasted);
  const error = p.get('error');
  if (error !== null) {
    const code = ERROR_CODE.test(error) ? error : 'an error';
    const description = (p.get('error_description') ?? '').replace(/[^\x20-\x7e]/g, '').slice(0, 200);
    throw new LoginError('authorization_denied', `the issuer answered ${code}${description ? ` (${description})` : ''}: sign in again with a new login`);
  }
  const state = p.get('state');
  if (state === null || !timingSafeEqual(sha256(state), sha256(expectedState))) {
    throw new LoginError('state_mismatch', "the callback's state is not this login's: paste the URL from the sign-in that this login's authorize URL started");
  }
  const code = p.get('code');
  if (code === null || code === '') throw new LoginError('bad_callback', 'the callback URL carries no code: paste the whole address the browser landed on (http://localhost:1455/auth/callback?code=…&state=…)');
  return code;
}
