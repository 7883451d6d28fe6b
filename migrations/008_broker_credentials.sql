-- Named credentials (several logins side by side). `default` needs no row: it is the
-- platform's CODEX_AUTH_JSON and works as before; a row gives it a pool. Every other
-- login is stored in global_secrets under `secret_key` and listed here, so replicas
-- know which keys are logins (NOTIFY broker_credentials_changed when this changes).
CREATE TABLE IF NOT EXISTS broker_credentials (
  name text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9-]{0,39}$'),
  secret_key text NOT NULL UNIQUE,
  pool text NOT NULL DEFAULT 'default' CHECK (pool ~ '^[a-z0-9][a-z0-9-]{0,39}$'),
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
