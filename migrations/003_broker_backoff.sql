-- A transient failure's backoff step, shared by every replica: without it a replica
-- that did not see the 429 (or the timeout) would POST at once, ignoring Retry-After,
-- and after a timeout that may have rotated upstream, spend the family on a reuse.
CREATE TABLE IF NOT EXISTS broker_backoff (
  secret_key text PRIMARY KEY,
  refresh_token_sha256 text NOT NULL,
  not_before timestamptz NOT NULL,
  consecutive_failures int NOT NULL,
  updated_by text NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);
