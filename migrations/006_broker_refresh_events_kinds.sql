-- The audit now also records seeds and revocations, and remembers every refresh token the
-- broker POSTed upstream by its full SHA-256, so a seed of an already spent token (an old
-- laptop copy of auth.json) can be refused before it logs the fleet out.
-- kind: 'refresh' (an upstream refresh POST: the only rows the crash check reads),
-- 'seed' (a seed, stored or refused: always written with its outcome), 'revoke' (an
-- operator's upstream revocation). Rows written before this migration are refreshes, and
-- stay matchable by their 8-hex prefix.
ALTER TABLE broker_refresh_events ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'refresh';
ALTER TABLE broker_refresh_events ADD COLUMN IF NOT EXISTS source text;
ALTER TABLE broker_refresh_events ADD COLUMN IF NOT EXISTS refresh_token_sha256 text;
CREATE INDEX IF NOT EXISTS broker_refresh_events_sha256 ON broker_refresh_events (refresh_token_sha256) WHERE refresh_token_sha256 IS NOT NULL;
CREATE INDEX IF NOT EXISTS broker_refresh_events_sha8 ON broker_refresh_events (refresh_token_sha8);
