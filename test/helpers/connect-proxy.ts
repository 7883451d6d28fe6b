/**
 * A forward proxy on 127.0.0.1 that speaks HTTP CONNECT (what undici's ProxyAgent uses for
 * http and https targets alike), tunnels to the named host:port and records every target.
 * Only loopback targets are tunnelled; anything else is refused with 403.
 */
import { createServer, type Server } from 'node:http';
import * as net from 'node:net';
import type { AddressInfo } from 'node:net';

export class ConnectProxy {
  readonly #server: Server;
  readonly url: string;
  /** `host:port` of every CONNECT, in arrival order. */
  readonly targets: string[] = [];
  readonly #sockets = new Set<net.Socket>();

  private constructor(server: Server) {
    this.#server = server;
    this.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  }

  static async start(): Promise<ConnectProxy> {
    const server = createServer((_req, res) => res.writeHead(405).end());
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const proxy = new ConnectProxy(server);
    server.on('connect', (req, client: net.Socket, head: Buffer) => proxy.#tunnel(req.url ?? '', client, head));
    return proxy;
  }

  #tunnel(target: string, client: net.Socket, head: Buffer): void {
    this.targets.push(target);
    this.#sockets.add(client);
    client.on('close', () => this.#sockets.delete(client));
    client.on('error', () => undefined);
    const m = /^(127\.0\.0\.1|localhost|\[::1\]):(\d+)$/.exec(target);
    if (!m) {
      client.end('HTTP/1.1 403 Forbidden\r\n\r\n');
      return;
    }
    const upstream = net.connect(Number(m[2]), m[1] === '[::1]' ? '::1' : m[1]!, () => {
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      if (head.length > 0) upstream.write(head);
      upstream.pipe(client);
      client.pipe(upstream);
    });
    this.#sockets.add(upstream);
    upstream.on('close', () => this.#sockets.delete(upstream));
    upstream.on('error', () => client.destroy());
  }

  close(): Promise<void> {
    for (const s of this.#sockets) s.destroy();
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }
}
