-- Every admin change (API or CLI): who, what, before and after. Budgets, limits, prices and
-- policies set this way are versions: a rollback applies a stored version's value again, an
-- undo its predecessor's. A row is written before its change is applied and marked with its
-- audit chain record once that is durable, so a change interrupted by a crash is applied again
-- (every versioned value is set, not added) and audited at the next start.
CREATE TABLE admin_changes (
    id         INTEGER PRIMARY KEY,
    time_ms    INTEGER NOT NULL,
    -- The admin key's prefix, or 'cli:user@host'.
    actor      TEXT NOT NULL,
    -- 'set', 'rollback of 12', 'undo of 12', 'create', 'revoke', 'apply', ...
    action     TEXT NOT NULL,
    -- policy, budget, limits, price (versioned); tenant, key, retention, erase, config.
    kind       TEXT NOT NULL,
    -- What it applies to, as JSON (the kind's fields: tenant, key_id, unit, ...).
    target     TEXT NOT NULL,
    -- JSON values; 'null' where there was none.
    before_value TEXT NOT NULL,
    after_value  TEXT NOT NULL,
    audit_seq  INTEGER
);
CREATE INDEX admin_changes_target ON admin_changes (kind, target, id);
CREATE INDEX admin_changes_pending ON admin_changes (id) WHERE audit_seq IS NULL;
