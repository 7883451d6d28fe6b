-- One row per upstream POST: the intent is written before the POST and completed after,
-- so an intent with no outcome marks a crash between the two (the upstream may have
-- rotated a token nobody kept). Tokens appear only as 8-hex-char SHA-256 prefixes.
CREATE TABLE IF NOT EXISTS broker_refresh_events (
  id bigserial PRIMARY KEY,
  secret_key text NOT NULL,
  replica_id text NOT NULL,
  reason text NOT NULL,
  refresh_token_sha8 text NOT NULL,
  started_at timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz,
  outcome text,
  upstream_status int,
  upstream_code text,
  duration_ms int,
  new_refresh_token_sha8 text,
  acknowledged_at timestamptz
);
CREATE INDEX IF NOT EXISTS broker_refresh_events_recent ON broker_refresh_events (secret_key, id DESC);
