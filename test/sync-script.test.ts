/**
 * scripts/codex_auth_sync.sh, the reference workspace client, against a local fake
 * broker that implements the GET /codex-auth contract. The script runs as an async child
 * process (the fake lives in this process and must keep answering).
 */
import { strict as assert } from 'node:assert';
import { spawn } from 'node:child_process';
import { runProcess } from './helpers/process.js';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { createServer } from 'node:http';
import type { IncomingHttpHeaders, Server } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, afterEach, before, beforeEach, describe, test } from 'node:test';

const SCRIPT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', 'scripts', 'codex_auth_sync.sh');
const CLIENT_TOKEN = 'cab_client_token_5u9cR3t-DO-NOT-PRINT-0123456789abcdef';

type Mode = 'ok' | '401' | '503' | '500' | 'drop' | 'non-json' | 'empty' | 'array' | 'slow';

interface SeenRequest {
  method: string;
  url: string;
  headers: IncomingHttpHeaders;
}

/** Fake broker: GET /codex-auth with bearer auth, strong ETag and If-None-Match. */
class FakeBroker {
  mode: Mode = 'ok';
  body = '';
  readonly requests: SeenRequest[] = [];
  private server!: Server;
  private readonly sockets = new Set<Socket>();
  port = 0;

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  get etag(): string {
    return `"${createHash('sha256').update(this.body).digest('base64url').slice(0, 27)}"`;
  }

  setDocument(doc: unknown): void {
    // Pretty-printed with a trailing newline: the client must keep it byte for byte.
    this.body = `${JSON.stringify(doc, null, 2)}\n`;
  }

  async start(): Promise<void> {
    this.server = createServer((req, res) => {
      req.resume();
      this.requests.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers });
      const problem = (status: number, code: string, extra: Record<string, string> = {}): void => {
        res.writeHead(status, { 'content-type': 'application/problem+json', ...extra });
        res.end(JSON.stringify({ type: 'about:blank', title: code, status, detail: `fake ${code}`, code }));
      };
      if (req.url !== '/codex-auth' || req.method !== 'GET') return problem(404, 'not_found');
      if (req.headers.authorization !== `Bearer ${CLIENT_TOKEN}`) return problem(401, 'unauthorized');
      switch (this.mode) {
        case '401':
          return problem(401, 'unauthorized');
        case '503':
          return problem(503, 'no_usable_token', { 'retry-after': '30' });
        case '500':
          return problem(500, 'internal');
        case 'drop':
          req.socket.destroy();
          return;
        case 'non-json':
          res.writeHead(200, { 'content-type': 'text/html', etag: '"html"' });
          res.end('<html>captive portal</html>\n');
          return;
        case 'empty':
          res.writeHead(200, { 'content-type': 'application/json', etag: '"empty"' });
          res.end();
          return;
        case 'array':
          res.writeHead(200, { 'content-type': 'application/json', etag: '"array"' });
          res.end('[1,2,3]');
          return;
        default:
          break;
      }
      const send = (): void => {
        if (req.headers['if-none-match'] === this.etag) {
          res.writeHead(304, { etag: this.etag, 'cache-control': 'no-store' });
          res.end();
          return;
        }
        res.writeHead(200, { 'content-type': 'application/json', etag: this.etag, 'cache-control': 'no-store' });
        res.end(this.body);
      };
      if (this.mode === 'slow') setTimeout(send, 700);
      else send();
    });
    this.server.on('connection', (s: Socket) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.port = (this.server.address() as AddressInfo).port;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Run the script asynchronously with a clean environment (no proxies, no inherited config). */
function runScript(env: Record<string, string>, args: string[] = [], timeoutMs = 60_000): Promise<RunResult> {
  return runProcess('bash', [SCRIPT, ...args], { env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...env }, timeoutMs });
}

function sampleDoc(tag: string): Record<string, unknown> {
  return {
    OPENAI_API_KEY: null,
    tokens: {
      id_token: `eyJhbGciOiJIUzI1NiJ9.eyJpZCI6IiR7dGFnfSJ9.id-${tag}-SECRETSIG`,
      access_token: `eyJhbGciOiJIUzI1NiJ9.eyJhdCI6IiR7dGFnfSJ9.at-${tag}-SECRETSIG`,
      refresh_token: `cabr_broker_refresh_${tag}_SECRET`,
      account_id: 'acct-sync-test',
    },
    last_refresh: '2026-11-20T10:00:00Z',
  };
}

function listDir(dir: string): string[] {
  return fs.readdirSync(dir).sort();
}

describe('scripts/codex_auth_sync.sh', () => {
  let broker: FakeBroker;
  let root: string;
  let codexHome: string;
  let home: string;
  let authFile: string;
  let etagFile: string;
  const env = (extra: Record<string, string> = {}): Record<string, string> => ({
    HOME: home,
    CODEX_HOME: codexHome,
    CODEX_AUTH_BROKER_URL: broker.url,
    CODEX_AUTH_BROKER_TOKEN: CLIENT_TOKEN,
    ...extra,
  });

  before(async () => {
    broker = new FakeBroker();
    await broker.start();
  });
  after(async () => {
    await broker.close();
  });
  beforeEach(() => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'sync-script-'));
    home = path.join(root, 'home');
    fs.mkdirSync(home);
    codexHome = path.join(root, 'workspace', 'codex-home');
    authFile = path.join(codexHome, 'auth.json');
    etagFile = path.join(codexHome, '.auth.json.etag');
    broker.mode = 'ok';
    broker.setDocument(sampleDoc('v1'));
    broker.requests.length = 0;
  });
  afterEach(() => {
    fs.rmSync(root, { recursive: true, force: true });
  });

  test('passes bash -n', async () => {
    const r = await new Promise<number | null>((resolve) => {
      spawn('bash', ['-n', SCRIPT], { stdio: 'ignore' }).on('close', resolve);
    });
    assert.equal(r, 0);
    assert.ok((fs.statSync(SCRIPT).mode & 0o111) !== 0, 'script is executable');
  });

  test('writes auth.json on 200 with mode 0600', async () => {
    const r = await runScript(env());
    assert.equal(r.code, 0, r.stderr);
    assert.equal(fs.readFileSync(authFile, 'utf8'), broker.body, 'byte for byte');
    assert.equal(fs.statSync(authFile).mode & 0o777, 0o600);
    assert.equal(fs.statSync(codexHome).mode & 0o777, 0o700, 'CODEX_HOME created 0700');
    assert.equal(fs.statSync(etagFile).mode & 0o777, 0o600);
    assert.equal(fs.readFileSync(etagFile, 'utf8').split('\n')[0], broker.etag);
    assert.deepEqual(listDir(codexHome), ['.auth.json.etag', 'auth.json']);

    assert.equal(broker.requests.length, 1);
    const h = broker.requests[0]!.headers;
    assert.equal(broker.requests[0]!.url, '/codex-auth');
    assert.equal(h.authorization, `Bearer ${CLIENT_TOKEN}`);
    assert.equal(h.accept, 'application/json');
    assert.equal(h['if-none-match'], undefined, 'no If-None-Match without a saved ETag');
    assert.equal(r.stderr.trim().split('\n').length, 1, `one line: ${r.stderr}`);
    assert.match(r.stderr, /wrote/);
    assert.equal(r.stdout, '');
  });

  test('defaults CODEX_HOME to $HOME/.codex and reads the token from CODEX_AUTH_BROKER_TOKEN_FILE', async () => {
    const tokenFile = path.join(root, 'token');
    fs.writeFileSync(tokenFile, `${CLIENT_TOKEN}\n`, { mode: 0o600 });
    const e = env({ CODEX_AUTH_BROKER_TOKEN_FILE: tokenFile });
    delete e.CODEX_HOME;
    delete e.CODEX_AUTH_BROKER_TOKEN;
    const r = await runScript(e);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(fs.readFileSync(path.join(home, '.codex', 'auth.json'), 'utf8'), broker.body);
    assert.equal(broker.requests[0]!.headers.authorization, `Bearer ${CLIENT_TOKEN}`);
  });

  test('is a no-op when unchanged and sends If-None-Match (304)', async () => {
    assert.equal((await runScript(env())).code, 0);
    const before = fs.statSync(authFile);
    await new Promise((r) => setTimeout(r, 20));

    const r = await runScript(env());
    assert.equal(r.code, 0, r.stderr);
    assert.equal(broker.requests.length, 2);
    assert.equal(broker.requests[1]!.headers['if-none-match'], broker.etag);
    assert.match(r.stderr, /unchanged \(304\)/);
    const afterStat = fs.statSync(authFile);
    assert.equal(afterStat.ino, before.ino, 'not rewritten');
    assert.equal(afterStat.mtimeMs, before.mtimeMs, 'not rewritten');

    // A 200 with identical content (no usable ETag on our side) is also a no-op.
    fs.rmSync(etagFile);
    const r2 = await runScript(env());
    assert.equal(r2.code, 0, r2.stderr);
    assert.equal(broker.requests[2]!.headers['if-none-match'], undefined);
    assert.match(r2.stderr, /unchanged \(200/);
    assert.equal(fs.statSync(authFile).ino, before.ino, 'identical content is not rewritten');
    assert.equal(fs.readFileSync(etagFile, 'utf8').split('\n')[0], broker.etag, 'ETag saved again');

    // No If-None-Match when auth.json is gone, even with a saved ETag.
    fs.rmSync(authFile);
    const r3 = await runScript(env());
    assert.equal(r3.code, 0, r3.stderr);
    assert.equal(broker.requests[3]!.headers['if-none-match'], undefined);
    assert.equal(fs.readFileSync(authFile, 'utf8'), broker.body);
  });

  test('rewrites when the document changes', async () => {
    assert.equal((await runScript(env())).code, 0);
    const oldEtag = broker.etag;
    broker.setDocument(sampleDoc('v2'));
    const r = await runScript(env());
    assert.equal(r.code, 0, r.stderr);
    assert.equal(broker.requests[1]!.headers['if-none-match'], oldEtag);
    assert.equal(fs.readFileSync(authFile, 'utf8'), broker.body);
    assert.equal(fs.readFileSync(etagFile, 'utf8').split('\n')[0], broker.etag);
    assert.match(r.stderr, /wrote/);
  });

  test('re-syncs an auth.json changed locally since the last write (no stale If-None-Match)', async () => {
    assert.equal((await runScript(env())).code, 0);
    // e.g. codex rewrote the file after a refresh through the shim
    fs.writeFileSync(authFile, JSON.stringify({ tokens: { access_token: 'local' } }));
    const r = await runScript(env());
    assert.equal(r.code, 0, r.stderr);
    assert.equal(broker.requests[1]!.headers['if-none-match'], undefined);
    assert.equal(fs.readFileSync(authFile, 'utf8'), broker.body);
  });

  test('leaves auth.json untouched on 401, 503, 500, network failure and a non-JSON body (exit 2)', async () => {
    fs.mkdirSync(codexHome, { recursive: true, mode: 0o700 });
    const original = '{"tokens":{"access_token":"the-old-one"}}\n';
    fs.writeFileSync(authFile, original, { mode: 0o600 });
    const ino = fs.statSync(authFile).ino;

    const cases: Array<{ name: string; mode?: Mode; url?: string; expect: RegExp }> = [
      { name: '401', mode: '401', expect: /401/ },
      { name: '401 (wrong client token)', expect: /401/ },
      { name: '503', mode: '503', expect: /503.*retry-after=30/ },
      { name: '500', mode: '500', expect: /500/ },
      { name: 'dropped connection', mode: 'drop', expect: /unreachable|curl exit/ },
      { name: 'connection refused', url: 'http://127.0.0.1:1', expect: /unreachable|curl exit/ },
      { name: 'non-JSON body', mode: 'non-json', expect: /not a JSON object/ },
      { name: 'JSON array body', mode: 'array', expect: /not a JSON object/ },
      { name: 'empty body', mode: 'empty', expect: /empty body/ },
    ];
    for (const c of cases) {
      broker.mode = c.mode ?? 'ok';
      const extra: Record<string, string> = {};
      if (c.url) extra.CODEX_AUTH_BROKER_URL = c.url;
      if (c.name.startsWith('401 (wrong')) extra.CODEX_AUTH_BROKER_TOKEN = 'not-the-token';
      const r = await runScript(env(extra));
      assert.equal(r.code, 2, `${c.name}: ${r.stderr}`);
      assert.match(r.stderr, c.expect, c.name);
      assert.equal(r.stderr.trim().split('\n').length, 1, `${c.name}: one line: ${r.stderr}`);
      assert.equal(fs.readFileSync(authFile, 'utf8'), original, `${c.name}: content untouched`);
      assert.equal(fs.statSync(authFile).ino, ino, `${c.name}: file not replaced`);
      assert.deepEqual(listDir(codexHome), ['auth.json'], `${c.name}: no temp or ETag file left`);
    }
  });

  test('exits 1 when not configured', async () => {
    const noUrl = env();
    delete noUrl.CODEX_AUTH_BROKER_URL;
    const noToken = env();
    delete noToken.CODEX_AUTH_BROKER_TOKEN;
    const missingTokenFile = env({ CODEX_AUTH_BROKER_TOKEN_FILE: path.join(root, 'nope') });
    delete missingTokenFile.CODEX_AUTH_BROKER_TOKEN;
    const emptyTokenFile = path.join(root, 'empty-token');
    fs.writeFileSync(emptyTokenFile, '\n');
    const emptyToken = env({ CODEX_AUTH_BROKER_TOKEN_FILE: emptyTokenFile });
    delete emptyToken.CODEX_AUTH_BROKER_TOKEN;
    const badInterval = env({ CODEX_AUTH_SYNC_INTERVAL_SECONDS: 'soon' });

    for (const [name, e, args] of [
      ['no URL', noUrl, []],
      ['no token', noToken, []],
      ['unreadable token file', missingTokenFile, []],
      ['empty token file', emptyToken, []],
      ['bad interval', badInterval, ['--loop']],
    ] as Array<[string, Record<string, string>, string[]]>) {
      const r = await runScript(e, args);
      assert.equal(r.code, 1, `${name}: ${r.stderr}`);
      assert.match(r.stderr, /not configured/, name);
    }
    assert.equal(broker.requests.length, 0, 'nothing was fetched');
    assert.ok(!fs.existsSync(authFile));
  });

  test('writes atomically (no temp files left, rename over the old file: inode changes)', async () => {
    fs.mkdirSync(codexHome, { recursive: true, mode: 0o700 });
    fs.writeFileSync(authFile, '{"old":true}\n', { mode: 0o644 });
    const before = fs.statSync(authFile);
    const r = await runScript(env());
    assert.equal(r.code, 0, r.stderr);
    const afterStat = fs.statSync(authFile);
    assert.notEqual(afterStat.ino, before.ino, 'a new file was renamed over the old one');
    assert.equal(afterStat.mode & 0o777, 0o600, 'the new file is 0600 even though the old one was 0644');
    assert.equal(fs.readFileSync(authFile, 'utf8'), broker.body);
    assert.deepEqual(listDir(codexHome), ['.auth.json.etag', 'auth.json'], 'no temp files left');
  });

  test('never prints the token or the document, nor puts the token on a command line', async () => {
    const secrets = [CLIENT_TOKEN, ...Object.values((sampleDoc('v1').tokens as Record<string, string>))].filter(
      (s) => s !== 'acct-sync-test',
    );
    const outputs: string[] = [];
    for (const mode of ['ok', 'ok', '401', '503', '500', 'drop', 'non-json'] as Mode[]) {
      broker.mode = mode;
      const r = await runScript(env());
      outputs.push(r.stdout, r.stderr);
    }
    // While curl waits on a slow answer, no process has the token in its argv.
    broker.mode = 'slow';
    fs.rmSync(codexHome, { recursive: true, force: true });
    const pending = runScript(env());
    await new Promise((r) => setTimeout(r, 350));
    const leaking: string[] = [];
    for (const pid of fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
      try {
        const cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
        if (cmdline.includes(CLIENT_TOKEN)) leaking.push(`${pid}: ${cmdline.replace(/\0/g, ' ')}`);
      } catch {
        // process gone
      }
    }
    const r = await pending;
    assert.equal(r.code, 0, r.stderr);
    outputs.push(r.stdout, r.stderr);
    assert.deepEqual(leaking, [], 'token visible in a command line');

    const all = outputs.join('\n');
    for (const s of secrets) assert.ok(!all.includes(s), `printed a secret: ${s.slice(0, 12)}…`);
    assert.ok(!all.includes('"tokens"'), 'printed the document');
    assert.ok(!all.includes('captive portal'), 'printed the body of an error');
  });

  test('--loop syncs again every CODEX_AUTH_SYNC_INTERVAL_SECONDS', async () => {
    const child = spawn('bash', [SCRIPT, '--loop'], {
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...env({ CODEX_AUTH_SYNC_INTERVAL_SECONDS: '1' }) },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const closed = new Promise<void>((resolve) => child.on('close', () => resolve()));
    try {
      const deadline = Date.now() + 10_000;
      while (broker.requests.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
      assert.ok(broker.requests.length >= 2, `requests: ${broker.requests.length}; ${stderr}`);
      assert.equal(broker.requests[1]!.headers['if-none-match'], broker.etag);
      assert.equal(fs.readFileSync(authFile, 'utf8'), broker.body);
    } finally {
      child.kill('SIGTERM');
      await closed;
    }
  });
});
