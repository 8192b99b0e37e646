-- Rate limits per tenant (key_id 0) or key: requests and tokens per minute, concurrent requests.
-- Counted in the store, not in process memory, so replicas sharing it share the limits.

CREATE TABLE limits (
    id              INTEGER PRIMARY KEY,
    tenant_id       INTEGER NOT NULL REFERENCES tenants(id),
    key_id          INTEGER NOT NULL DEFAULT 0,
    rpm             INTEGER CHECK (rpm >= 0),
    tpm             INTEGER CHECK (tpm >= 0),
    max_concurrent  INTEGER CHECK (max_concurrent >= 0),
    UNIQUE (tenant_id, key_id)
);

-- Counts per limit and UTC minute (unix seconds / 60); a sliding window weighs the previous one.
CREATE TABLE rate_windows (
    limit_id  INTEGER NOT NULL REFERENCES limits(id) ON DELETE CASCADE,
    minute    INTEGER NOT NULL,
    requests  INTEGER NOT NULL DEFAULT 0,
    tokens    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (limit_id, minute)
);

-- Where a request's tokens were counted, so settlement can refund the unused worst case.
ALTER TABLE requests ADD COLUMN rate_minute INTEGER;
ALTER TABLE requests ADD COLUMN rate_tokens INTEGER NOT NULL DEFAULT 0;
CREATE INDEX requests_tenant_open ON requests(tenant_id, state);
