import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import type { Client } from '../src/clients/registry.js';
import { buildSnapshot, type Snapshot } from '../src/credential.js';
import { requestIdGenerator } from '../src/http/request-logger.js';
import type { Refresher } from '../src/refresher.js';
import { DocumentRenderer } from '../src/serving.js';
import { makeChatgptLogin } from './helpers/codex.js';

function client(n: number): Client {
  return {
    id: `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`,
    name: `ws-${n}`,
    kind: 'broker',
    workspaceId: null,
    pool: 'default',
    assigned: 'default',
    tokenKey: `key-${n}`,
    refreshCredential: `cabrt_credential${n}`,
    refreshCredentialSha: `sha-${n}`,
    etagTag: `tag${n}tag${n}tag${n}`,
    etagFor: '',
    etag: '',
    platformEtagFor: '',
    platformEtag: '',
    lastSeenAt: 0,
    lastGeneration: undefined,
    queuedIn: 0,
    readIn: 0,
  };
}

function snapshot(): Snapshot {
  const text = JSON.stringify(makeChatgptLogin().doc);
  return buildSnapshot(Buffer.from(text), text);
}

/** A renderer over a credential whose current snapshot the test sets. */
function renderer(): { r: DocumentRenderer; set: (s: Snapshot) => void } {
  let snap = snapshot();
  const refresher = { current: () => snap } as unknown as Refresher;
  return { r: new DocumentRenderer(refresher, 'proxy'), set: (s) => (snap = s) };
}

const ETAG = /^"[A-Za-z0-9_-]{22}-(tag\d+){3}(-v)?"$/;

test("a client's ETag is built once per served document and kept on its record; a new document (a refresh, another credential) builds a new one", () => {
  const { r, set } = renderer();
  const a = client(1);
  const b = client(2);
  const e1 = r.render(a).etag;
  assert.match(e1, ETAG);
  assert.ok(!e1.endsWith('-v"'));
  // Kept on the record, with the template prefix it was built for.
  assert.equal(a.etag, e1);
  assert.ok(e1.startsWith(a.etagFor) && a.etagFor.length > 0);
  // The next request reads the kept string: what the record holds is what is served.
  a.etag = `${e1.slice(0, -1)}-kept"`;
  assert.equal(r.render(a).etag, a.etag);
  a.etag = e1;
  // Another client of the same document: its own tag, its own ETag.
  const eb = r.render(b).etag;
  assert.notEqual(eb, e1);
  assert.equal(eb.slice(0, 24), e1.slice(0, 24), 'one template prefix');
  // The drop-in shape's ETag is kept beside it, and neither disturbs the other.
  const p1 = r.render(a).platformEtag;
  assert.equal(p1, `${e1.slice(0, -1)}-v"`);
  assert.equal(a.platformEtag, p1);
  assert.equal(r.render(a).etag, e1);
  assert.equal(r.render(a).platformEtag, p1);

  // A refresh: a new document, so a new ETag, built again and kept again.
  set(snapshot());
  const e2 = r.render(a).etag;
  assert.match(e2, ETAG);
  assert.notEqual(e2, e1);
  assert.equal(a.etag, e2);
  assert.equal(r.render(a).platformEtag, `${e2.slice(0, -1)}-v"`);
  // The same as a record that never held one would be served.
  assert.equal(r.render(client(1)).etag, e2);

  // The client served by another credential's renderer: that document's ETag, not the kept one.
  const other = renderer().r;
  const e3 = other.render(a).etag;
  assert.notEqual(e3, e2);
  assert.equal(e3, other.render(client(1)).etag);
  assert.equal(r.render(a).etag, e2, 'and back again');
});

test('request ids keep their form: a random prefix per generator, a dash, then the count in base 36', () => {
  const next = requestIdGenerator();
  const ids = Array.from({ length: 40 }, () => next());
  const prefix = ids[0]?.slice(0, 9) ?? '';
  assert.match(prefix, /^[0-9a-z]{8}-$/);
  assert.deepEqual(
    ids,
    ids.map((_, i) => prefix + (i + 1).toString(36)),
  );
  assert.notEqual(requestIdGenerator()().slice(0, 8), prefix.slice(0, 8), 'another generator (process) draws another prefix');
});
