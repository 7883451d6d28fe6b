-- The platform's table, in its exact shape. Created only when missing: the platform
-- owns it, so nothing here may drop, rename or retype what already exists.
CREATE TABLE IF NOT EXISTS global_secrets (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  key text NOT NULL UNIQUE,
  encrypted_value bytea NOT NULL,
  encryption_version int NOT NULL DEFAULT 0,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
