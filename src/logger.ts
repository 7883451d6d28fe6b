import { pino, destination as pinoDestination, stdTimeFunctions, type Logger as PinoLogger, type DestinationStream } from 'pino';

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

export function createLogger(level: string, destination?: DestinationStream): Logger {
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
