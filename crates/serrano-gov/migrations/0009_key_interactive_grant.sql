-- A key may be granted the interactive latency class (`x-serrano-slo-class: interactive`)
-- though its tenant's class is batch; 0 (no grant) for every existing key.
ALTER TABLE api_keys ADD COLUMN grant_interactive INTEGER NOT NULL DEFAULT 0
    CHECK (grant_interactive IN (0, 1));
