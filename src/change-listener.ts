import { pg, type Client } from './lib/pg.js';
import type { Logger } from './logger.js';

export interface ChangeListenerOptions {
  connectionString: string;
  logger: Logger;
  channels: string[];
  /** Called with the channel and payload, or with an undefined payload for every channel after a reconnect (changes may have been missed). */
  onNotify: (channel: string, payload: string | undefined) => void;
  retryMs?: number;
}

/**
 * LISTEN (codex_auth_changed, codex_auth_clients_changed) on a dedicated connection so every replica reloads the
 * moment the credential changes, instead of serving a burned token until its next check.
 * Reconnects on its own; after a reconnect it reports a change, since notifications sent
 * while it was away are lost.
 */
export class ChangeListener {
  readonly #o: ChangeListenerOptions;
  #client: Client | undefined;
  #closed = false;
  #retry: NodeJS.Timeout | undefined;
  #connected = false;

  constructor(opts: ChangeListenerOptions) {
    this.#o = opts;
  }

  get connected(): boolean {
    return this.#connected;
  }

  async start(): Promise<void> {
    await this.#connect(false);
  }

  async #connect(isReconnect: boolean): Promise<void> {
    if (this.#closed) return;
    const client = new pg.Client({ connectionString: this.#o.connectionString, connectionTimeoutMillis: 5_000 });
    const lost = (err?: Error) => {
      if (this.#client !== client) return;
      this.#client = undefined;
      this.#connected = false;
      client.removeAllListeners('notification');
      void client.end().catch(() => undefined);
      if (this.#closed) return;
      this.#o.logger.warn({ event: 'listener_lost', err: err ? { message: err.message } : undefined }, 'lost the change listener connection; reconnecting');
      this.#scheduleReconnect();
    };
    client.on('error', lost);
    client.on('end', () => lost());
    client.on('notification', (msg) => {
      if (this.#o.channels.includes(msg.channel)) this.#o.onNotify(msg.channel, msg.payload);
    });
    this.#client = client;
    try {
      await client.connect();
      for (const ch of this.#o.channels) await client.query(`LISTEN ${client.escapeIdentifier(ch)}`);
      this.#connected = true;
      if (isReconnect) {
        this.#o.logger.info({ event: 'listener_restored' }, 'change listener reconnected');
        for (const ch of this.#o.channels) this.#o.onNotify(ch, undefined);
      }
    } catch (err) {
      if (!isReconnect && !this.#closed) {
        this.#client = undefined;
        await client.end().catch(() => undefined);
        throw err;
      }
      lost(err as Error);
    }
  }

  #scheduleReconnect(): void {
    if (this.#retry || this.#closed) return;
    this.#retry = setTimeout(() => {
      this.#retry = undefined;
      void this.#connect(true);
    }, this.#o.retryMs ?? 1_000);
    this.#retry.unref();
  }

  async close(): Promise<void> {
    this.#closed = true;
    if (this.#retry) clearTimeout(this.#retry);
    const c = this.#client;
    this.#client = undefined;
    this.#connected = false;
    if (c) await c.end().catch(() => undefined);
  }
}
