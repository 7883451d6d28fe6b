/**
 * src/lib/http-client.ts: undici's request(url, opts), loaded without undici's index. The
 * broker's upstream, usage, token-check and login calls all go through it.
 */
import { strict as assert } from 'node:assert';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { Agent } from 'undici';
import { EnvHttpProxyAgent, request } from '../src/lib/http-client.js';

let server: http.Server;
let base = '';
const seen: Array<{ method: string | undefined; url: string | undefined; host: string | undefined; body: string }> = [];

before(async () => {
  server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d: Buffer) => (body += d.toString()));
    req.on('end', () => {
      seen.push({ method: req.method, url: req.url, host: req.headers.host, body });
      res.writeHead(201, { 'content-type': 'text/plain', 'x-answer': 'yes' }).end(`got ${req.method} ${req.url}`);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
after(() => new Promise<void>((resolve) => server.close(() => resolve())));

describe('http-client request()', () => {
  test("sends the URL's path and query to its origin, with the method, headers and body given, through the dispatcher given", async () => {
    const dispatcher = new Agent();
    try {
      const res = await request(`${base}/a/b?x=1&y=two`, { method: 'POST', dispatcher, headers: { 'content-type': 'application/json' }, body: '{"k":1}' });
      assert.equal(res.statusCode, 201);
      assert.equal(res.headers['x-answer'], 'yes');
      assert.equal(await res.body.text(), 'got POST /a/b?x=1&y=two');
      assert.deepEqual(seen.at(-1), { method: 'POST', url: '/a/b?x=1&y=two', host: base.slice('http://'.length), body: '{"k":1}' });
    } finally {
      await dispatcher.close();
    }
  });

  test("without a dispatcher it uses undici's global one, as undici's own request() does; the EnvHttpProxyAgent it exports serves too", async () => {
    const res = await request(`${base}/plain`, { method: 'GET' });
    assert.equal(await res.body.text(), 'got GET /plain');
    const agent = new EnvHttpProxyAgent();
    try {
      const viaAgent = await request(`${base}/agent`, { method: 'GET', dispatcher: agent });
      assert.equal(await viaAgent.body.text(), 'got GET /agent');
    } finally {
      await agent.close();
    }
  });

  test('a URL that does not parse is refused before anything is sent', async () => {
    const before = seen.length;
    await assert.rejects(async () => request('not a url', { method: 'GET' }), TypeError);
    assert.equal(seen.length, before);
  });
});
