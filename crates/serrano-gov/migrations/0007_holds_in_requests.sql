-- A request's reservations move into its own row (`holds`: a JSON array of
-- [budget_id, period_key, amount], NULL once the request settles or expires), and `requests`
-- and `usage` become WITHOUT ROWID tables keyed by the request id. Per request that is two
-- B-trees fewer to write in the reservation (the `reservations` table, and the hidden index
-- every TEXT primary key of a rowid table has) and two fewer in the settlement, and no row
-- inserted only to be deleted a few milliseconds later.
CREATE TABLE requests_0007 (
    request_id   TEXT PRIMARY KEY,
    tenant_id    INTEGER NOT NULL,
    key_id       INTEGER NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('reserved', 'settled', 'expired')),
    created_ms   INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL,
    rate_minute  INTEGER,
    rate_tokens  INTEGER NOT NULL DEFAULT 0,
    holds        TEXT
) WITHOUT ROWID;
INSERT INTO requests_0007
SELECT q.request_id, q.tenant_id, q.key_id, q.state, q.created_ms, q.expires_ms, q.rate_minute,
       q.rate_tokens,
       CASE WHEN q.state = 'reserved' THEN (
           SELECT json_group_array(json_array(r.budget_id, r.period_key, r.amount))
           FROM reservations r WHERE r.request_id = q.request_id) END
FROM requests q;
DROP TABLE reservations;
DROP TABLE requests;
ALTER TABLE requests_0007 RENAME TO requests;
CREATE INDEX requests_open ON requests(expires_ms) WHERE state = 'reserved';
CREATE INDEX requests_tenant_open ON requests(tenant_id, key_id) WHERE state = 'reserved';

CREATE TABLE usage_0007 (
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
) WITHOUT ROWID;
INSERT INTO usage_0007
SELECT request_id, time_ms, day, tenant, key_prefix, model, backend, prompt_tokens,
       completion_tokens, cost_nusd
FROM usage;
DROP TABLE usage;
ALTER TABLE usage_0007 RENAME TO usage;
