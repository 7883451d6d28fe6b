import { accountInfo, type JsonObject } from '../auth-json.js';
import { upstreamErrorCode } from '../upstream.js';
import { LoginError } from './errors.js';
import { jsonObject, nonEmptyString, postToIssuer, type IssuerOptions } from './issuer.js';

export interface IssuedTokens {
  id_token: string;
  access_token: string;
  refresh_token: string;
}

/**
 * The authorization-code exchange (both flows end here): `POST {issuer}/oauth/token`,
 * form-encoded, with the redirect URI of the authorize step and the PKCE verifier.
 * The code is single-use: a failure is final for this login.
 */
export async function exchangeCode(o: IssuerOptions, a: { code: string; redirectUri: string; codeVerifier: string }): Promise<IssuedTokens> {
  const res = await postToIssuer(o, '/oauth/token', {
    form: { grant_type: 'authorization_code', code: a.code, redirect_uri: a.redirectUri, client_id: o.clientId, code_verifier: a.codeVerifier },
  });
  const body = jsonObject(res.text);
  if (res.status !== 200) {
    const code = upstreamErrorCode(body);
    throw new LoginError('exchange_failed', `the issuer refused the authorization code (${res.status}${code ? ` ${code}` : ''}): start a new login`);
  }
  const tokens = {
    id_token: nonEmptyString(body?.['id_token']),
    access_token: nonEmptyString(body?.['access_token']),
    refresh_token: nonEmptyString(body?.['refresh_token']),
  };
  for (const [k, v] of Object.entries(tokens)) {
    if (v === undefined) throw new LoginError('exchange_failed', `the issuer's token answer has no ${k}: start a new login`);
  }
  return tokens as IssuedTokens;
}

/** auth.json exactly as codex writes it after a login, so `codex login status` accepts what workspaces receive. */
export function loginDocument(t: IssuedTokens, now: Date): JsonObject {
  return {
    auth_mode: 'chatgpt',
    OPENAI_API_KEY: null,
    tokens: { id_token: t.id_token, access_token: t.access_token, refresh_token: t.refresh_token, account_id: accountInfo({ id_token: t.id_token }).accountId ?? null },
    last_refresh: now.toISOString(),
  };
}
