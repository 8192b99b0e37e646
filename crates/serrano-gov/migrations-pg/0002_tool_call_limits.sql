-- Per-tenant (key_id 0) or per-key limits on MCP tool calls: per minute (the sliding window
-- `rpm` uses, over a count of its own in rate_windows) and per UTC day (the sum of the day's
-- minutes: rate_windows keeps every minute, and must keep at least a day of them).
ALTER TABLE limits ADD COLUMN tool_calls_per_minute BIGINT CHECK (tool_calls_per_minute >= 0);
ALTER TABLE limits ADD COLUMN tool_calls_per_day BIGINT CHECK (tool_calls_per_day >= 0);
ALTER TABLE rate_windows ADD COLUMN tool_calls BIGINT NOT NULL DEFAULT 0;
