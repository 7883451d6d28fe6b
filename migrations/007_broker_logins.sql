-- Logins the broker performs (device code, browser with a pasted callback). Any replica
-- may answer a step, so the state lives here. `secrets` (the device_auth_id and user code,
-- or the PKCE verifier and state) is sealed like global_secrets and emptied once the
-- login ends. A device login is polled by the replica holding its lease; a replica that
-- finds the lease lapsed takes the polling over.
CREATE TABLE IF NOT EXISTS broker_logins (
  id text PRIMARY KEY,
  credential text NOT NULL,
  method text NOT NULL CHECK (method IN ('device', 'browser')),
  state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'succeeded', 'failed', 'expired')),
  error text,
  secrets bytea NOT NULL,
  secrets_version int NOT NULL,
  poll_interval_ms int,
  lease_owner text,
  lease_until timestamptz,
  account_id text,
  plan_type text,
  created_by text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz NOT NULL,
  finished_at timestamptz
);
-- At most one login in progress per credential.
CREATE UNIQUE INDEX IF NOT EXISTS broker_logins_one_pending ON broker_logins (credential) WHERE state = 'pending';
