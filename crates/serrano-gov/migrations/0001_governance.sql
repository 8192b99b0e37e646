-- Tenants, API keys, prices, budgets (a ledger of reservations and settlements), usage, and the
-- hash-chained audit log. Money is stored in integer nano-dollars (1e-9 USD) so sums are exact.

CREATE TABLE tenants (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    retention   TEXT NOT NULL DEFAULT 'none' CHECK (retention IN ('none', 'hash', 'full')),
    created_ms  INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id          INTEGER PRIMARY KEY,
    tenant_id   INTEGER NOT NULL REFERENCES tenants(id),
    name        TEXT NOT NULL DEFAULT '',
    prefix      TEXT NOT NULL,            -- the key's first characters, shown in listings and audit
    hash        BLOB NOT NULL,            -- sha256 of the whole key; the key itself is never stored
    role        TEXT NOT NULL CHECK (role IN ('admin', 'inference')),
    models      TEXT,                     -- JSON array of allowed model names; NULL allows all
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER,
    revoked_ms  INTEGER
);
CREATE INDEX api_keys_prefix ON api_keys(prefix);

CREATE TABLE prices (
    model        TEXT NOT NULL,
    backend      TEXT NOT NULL DEFAULT 'local',
    input_nusd   INTEGER NOT NULL CHECK (input_nusd >= 0),   -- per token
    output_nusd  INTEGER NOT NULL CHECK (output_nusd >= 0),  -- per token
    PRIMARY KEY (model, backend)
);

CREATE TABLE budgets (
    id            INTEGER PRIMARY KEY,
    tenant_id     INTEGER NOT NULL REFERENCES tenants(id),
    key_id        INTEGER NOT NULL DEFAULT 0,   -- 0: the whole tenant
    unit          TEXT NOT NULL CHECK (unit IN ('tokens', 'usd')),
    period        TEXT NOT NULL CHECK (period IN ('day', 'month', 'total')),
    limit_amount  INTEGER NOT NULL CHECK (limit_amount >= 0),
    UNIQUE (tenant_id, key_id, unit, period)
);

-- One row per budget and period window ('2026-11-28', '2026-11' or 'total').
CREATE TABLE budget_usage (
    budget_id   INTEGER NOT NULL REFERENCES budgets(id) ON DELETE CASCADE,
    period_key  TEXT NOT NULL,
    spent       INTEGER NOT NULL DEFAULT 0,
    reserved    INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    PRIMARY KEY (budget_id, period_key)
);

-- Every request that reserved; the primary key makes a replayed request id a conflict.
CREATE TABLE requests (
    request_id  TEXT PRIMARY KEY,
    tenant_id   INTEGER NOT NULL,
    key_id      INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('reserved', 'settled', 'expired')),
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL
);
CREATE INDEX requests_open ON requests(state, expires_ms);

CREATE TABLE reservations (
    request_id  TEXT NOT NULL,
    budget_id   INTEGER NOT NULL,
    period_key  TEXT NOT NULL,
    amount      INTEGER NOT NULL,
    PRIMARY KEY (request_id, budget_id)
);

CREATE TABLE usage (
    request_id         TEXT PRIMARY KEY,
    time_ms            INTEGER NOT NULL,
    day                TEXT NOT NULL,
    tenant             TEXT NOT NULL,
    key_prefix         TEXT NOT NULL,
    model              TEXT NOT NULL,
    backend            TEXT NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    cost_nusd          INTEGER NOT NULL
);

-- hash = sha256(prev_hash || '\n' || seq || '\n' || record); record is the exact JSON text hashed.
CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY,
    record     TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);

-- The chain's tip, written in the same transaction as each record: truncation shows as a mismatch.
CREATE TABLE audit_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   INTEGER NOT NULL,
    hash  TEXT NOT NULL
);

-- Prompt and completion content, kept per the tenant's retention; outside the chain so that
-- erasure leaves the chain verifiable.
CREATE TABLE audit_content (
    seq         INTEGER PRIMARY KEY,
    tenant_id   INTEGER NOT NULL,
    retention   TEXT NOT NULL,
    prompt      TEXT,
    completion  TEXT
);
CREATE INDEX audit_content_tenant ON audit_content(tenant_id);
