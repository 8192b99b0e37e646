-- A tenant's safety-filter policy (serrano-safety's Policy as JSON); NULL means no filters.
ALTER TABLE tenants ADD COLUMN policy TEXT;
