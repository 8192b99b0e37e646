-- Only open requests in the indexes that look requests up by state. A settled or expired
-- request is never looked up that way again; kept in these indexes, every settlement moved its
-- entries (page writes in both) and they grew with every request ever served.
DROP INDEX requests_open;
DROP INDEX requests_tenant_open;
CREATE INDEX requests_open ON requests(expires_ms) WHERE state = 'reserved';
CREATE INDEX requests_tenant_open ON requests(tenant_id, key_id) WHERE state = 'reserved';
