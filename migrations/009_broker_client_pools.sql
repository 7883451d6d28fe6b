-- Pools: a client is bound to a pool of credentials and assigned one of them, sticky (a
-- running agent's conversation stays on one account). The assignment is stored so every
-- replica serves the same credential to the same client, and changes by compare-and-set.
-- Existing clients land in pool `default` with no assignment yet: the first replica to
-- start assigns them (to `default`, the only credential a database from before has).
ALTER TABLE broker_clients ADD COLUMN IF NOT EXISTS pool text NOT NULL DEFAULT 'default';
ALTER TABLE broker_clients ADD COLUMN IF NOT EXISTS assigned_credential text;
CREATE INDEX IF NOT EXISTS broker_clients_assigned ON broker_clients (assigned_credential) WHERE revoked_at IS NULL;
