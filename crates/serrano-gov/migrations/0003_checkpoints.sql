-- Signed checkpoints of the audit chain: (seq, hash) at a time, signed with an Ed25519 key kept
-- outside the database. Exported to a SIEM, they pin the chain so that even an attacker who
-- rewrites every record and the head cannot go unnoticed without the signing key.
CREATE TABLE audit_checkpoints (
    seq         INTEGER PRIMARY KEY,
    hash        TEXT NOT NULL,
    time_ms     INTEGER NOT NULL,
    public_key  TEXT NOT NULL,
    signature   TEXT NOT NULL
);
