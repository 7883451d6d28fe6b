-- Each credential's usage limits, as last fetched from the backend's /wham/usage, shared by
-- every replica. The row is also the poll schedule: a replica claims a poll by moving
-- next_poll_at forward only where it is due (one atomic statement), so exactly one replica
-- polls a credential per interval however many run. `snapshot` holds only the parsed
-- figures (plan, per window used percent, window length, reset time), never a body or token.
-- ok/last_error describe the last attempt; a failed attempt keeps the last good snapshot.
CREATE TABLE IF NOT EXISTS broker_usage (
  secret_key text PRIMARY KEY,
  snapshot jsonb,
  fetched_at timestamptz,
  ok boolean NOT NULL DEFAULT true,
  last_error text,
  last_attempt_at timestamptz,
  polled_by text,
  next_poll_at timestamptz NOT NULL DEFAULT now(),
  created_at timestamptz NOT NULL DEFAULT now()
);
