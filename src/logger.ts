import { pino, destination as pinoDestination, stdTimeFunctions, transport as pinoTransport, type Logger as PinoLogger, type DestinationStream } from 'pino';

export type Logger = PinoLogger;

// Belt and braces: domain code never passes tokens to the logger, but a future line that
// logs a request, a header or a document must still not leak one.
export const REDACT_PATHS = [
  'access_token',
  'refresh_token',
  'id_token',
  'tokens',
  'token',
  'authorization',
  '*.access_token',
  '*.refresh_token',
  '*.id_token',
  '*.tokens',
  '*.token',
  '*.authorization',
  'req.headers.authorization',
  'req.headers.cookie',
  'req.headers["x-admin-token"]',
  'headers.authorization',
];

/**
 * JSON lines by default (what log collectors want); pretty lines when a person watches a
 * terminal and pino-pretty is installed (a dev dependency: absent from the image).
 */
export function createLogger(level: string, destination?: DestinationStream, opts: { pretty?: boolean } = {}): Logger {
  if (!destination && opts.pretty) {
    try {
      const transport = pinoTransport({ target: 'pino-pretty', options: { colorize: true, translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname,service' } });
      return pino({ level, base: { service: 'codex-auth-broker' }, redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, transport as DestinationStream);
    } catch {
      // pino-pretty not installed: fall through to JSON.
    }
  }
  return pino(
    {
      level,
      base: { service: 'codex-auth-broker' },
      timestamp: stdTimeFunctions.isoTime,
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
    },
    destination ?? pinoDestination({ dest: 1, sync: false }),
  );
}
