-- Workspace clients. Secrets are stored only as SHA-256: the bearer token, and the
-- client's broker refresh credential (what proxy mode serves as tokens.refresh_token).
CREATE TABLE IF NOT EXISTS broker_clients (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  name text NOT NULL UNIQUE,
  workspace_id uuid,
  token_sha256 bytea NOT NULL UNIQUE,
  token_prefix text NOT NULL,
  refresh_credential_sha256 bytea NOT NULL UNIQUE,
  created_at timestamptz NOT NULL DEFAULT now(),
  last_used_at timestamptz,
  last_served_generation text,
  revoked_at timestamptz
);

-- A per-deployment secret for deriving refresh credentials when no
-- SECRETS_ENCRYPTION_KEY is set (with a key, the secret is derived from it instead).
CREATE TABLE IF NOT EXISTS broker_settings (
  name text PRIMARY KEY,
  value bytea NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
