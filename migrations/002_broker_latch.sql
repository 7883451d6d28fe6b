-- A permanent upstream refusal burns a refresh token for good. The latch is shared by
-- every replica so that none of them POSTs that token again; it names the token only by
-- the SHA-256 of its value.
CREATE TABLE IF NOT EXISTS broker_latch (
  secret_key text PRIMARY KEY,
  refresh_token_sha256 text NOT NULL,
  upstream_status int,
  upstream_code text,
  latched_by text NOT NULL,
  latched_at timestamptz NOT NULL DEFAULT now()
);
