/**
 * Running the real codex CLI (`@openai/codex`, a dev dependency) from tests.
 *
 * - `runCodex` spawns it ASYNCHRONOUSLY (a fake server living in the test process must
 *   keep answering while codex runs), with a clean environment: PATH, a throw-away HOME,
 *   CODEX_HOME, and only what the caller adds. Nothing from the parent's OPENAI_*,
 *   CODEX_*, RUST_LOG or proxy variables leaks in. The process group is killed (SIGKILL)
 *   after `timeoutMs`.
 * - `writeAuthJson` writes an auth.json the way codex does (mode 0600).
 * - `makeChatgptLogin` builds a plausible ChatGPT login (access/id tokens are JWTs with
 *   the claims codex reads; signature HS256 with a random key: codex never verifies it).
 */
import { createHmac, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { runProcess, type ProcessResult } from './process.js';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const PROJECT_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CODEX_CLIENT_ID = 'app_EMoamEEZ73f0CkXaXp7hrann';
const AUTH_CLAIM = 'https://api.openai.com/auth';
const PROFILE_CLAIM = 'https://api.openai.com/profile';

/** Path of the codex executable installed by npm (`node_modules/.bin/codex`). */
export function codexBin(): string {
  return path.join(PROJECT_ROOT, 'node_modules', '.bin', 'codex');
}

export interface RunCodexOptions {
  codexHome: string;
  env?: Record<string, string>;
  /** Default 60 000 ms; the process group is SIGKILLed when it is exceeded. */
  timeoutMs?: number;
  cwd?: string;
}

export type CodexResult = ProcessResult;

/** Run `codex <args>` asynchronously with a clean environment. Never rejects on a non-zero exit. */
export async function runCodex(args: string[], opts: RunCodexOptions): Promise<CodexResult> {
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const home = fs.mkdtempSync(path.join(os.tmpdir(), 'codex-home-'));
  const env: Record<string, string> = {
    PATH: process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin',
    HOME: home,
    CODEX_HOME: opts.codexHome,
    NO_COLOR: '1',
    ...(opts.env ?? {}),
  };
  for (const k of Object.keys(env)) {
    if (k.startsWith('OPENAI_') || k === 'RUST_LOG') delete env[k];
  }
  try {
    return await runProcess(codexBin(), args, { cwd: opts.cwd ?? home, env, timeoutMs });
  } finally {
    fs.rmSync(home, { recursive: true, force: true });
  }
}

/**
 * Write `${codexHome}/auth.json` (pretty JSON, mode 0600), creating codexHome (0700) if
 * needed. Atomic (temp file + rename), so a running codex never reads half a file.
 */
export function writeAuthJson(codexHome: string, doc: unknown): void {
  fs.mkdirSync(codexHome, { recursive: true, mode: 0o700 });
  const file = path.join(codexHome, 'auth.json');
  const tmp = path.join(codexHome, `.auth.json.${process.pid}.${randomBytes(4).toString('hex')}`);
  fs.writeFileSync(tmp, JSON.stringify(doc, null, 2), { mode: 0o600 });
  fs.chmodSync(tmp, 0o600);
  fs.renameSync(tmp, file);
}

export function readAuthJson(codexHome: string): Record<string, unknown> {
  return JSON.parse(fs.readFileSync(path.join(codexHome, 'auth.json'), 'utf8')) as Record<string, unknown>;
}

const JWT_KEY = randomBytes(32);

/** A compact HS256 JWS of `payload` (random per-process key; codex does not verify it). */
export function signJwt(payload: Record<string, unknown>): string {
  const b64 = (v: unknown): string => Buffer.from(JSON.stringify(v)).toString('base64url');
  const input = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(payload)}`;
  return `${input}.${createHmac('sha256', JWT_KEY).update(input).digest('base64url')}`;
}

export interface ChatgptLoginOptions {
  accountId?: string;
  userId?: string;
  planType?: string;
  email?: string;
  /** Access token lifetime in seconds from now (default 10 days). Negative = already expired. */
  accessTtlSec?: number;
  refreshToken?: string;
  /** last_refresh (default now). */
  lastRefresh?: Date;
  /** Distinguishes tokens minted in the same second. */
  tag?: string;
}

export interface ChatgptLogin {
  accessToken: string;
  idToken: string;
  refreshToken: string;
  accountId: string;
  /** The auth.json document codex reads. */
  doc: {
    OPENAI_API_KEY: null;
    tokens: { id_token: string; access_token: string; refresh_token: string; account_id: string };
    last_refresh: string;
  };
}

/** A plausible ChatGPT login: JWT access and id tokens with the claims codex reads. */
export function makeChatgptLogin(o: ChatgptLoginOptions = {}): ChatgptLogin {
  const accountId = o.accountId ?? 'acct-test-0001';
  const userId = o.userId ?? 'user-test-0001';
  const planType = o.planType ?? 'pro';
  const email = o.email ?? 'codex-test@example.com';
  const now = Math.floor(Date.now() / 1000);
  const auth = { chatgpt_account_id: accountId, chatgpt_plan_type: planType, chatgpt_user_id: userId };
  const jti = o.tag ?? randomBytes(6).toString('hex');
  const accessToken = signJwt({
    iss: 'https://auth.openai.com',
    aud: ['https://api.openai.com/v1'],
    sub: userId,
    iat: now,
    exp: now + (o.accessTtlSec ?? 864_000),
    jti,
    [AUTH_CLAIM]: auth,
    [PROFILE_CLAIM]: { email, email_verified: true },
  });
  const idToken = signJwt({
    iss: 'https://auth.openai.com',
    aud: [CODEX_CLIENT_ID],
    sub: userId,
    email,
    email_verified: true,
    iat: now,
    exp: now + 3600,
    jti,
    [AUTH_CLAIM]: auth,
  });
  const refreshToken = o.refreshToken ?? `rt_${randomBytes(16).toString('base64url')}`;
  return {
    accessToken,
    idToken,
    refreshToken,
    accountId,
    doc: {
      OPENAI_API_KEY: null,
      tokens: { id_token: idToken, access_token: accessToken, refresh_token: refreshToken, account_id: accountId },
      last_refresh: (o.lastRefresh ?? new Date()).toISOString(),
    },
  };
}
