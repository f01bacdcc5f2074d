-- A tool call event that can never be published (e.g. larger than NATS accepts) is set aside
-- with the reason instead of blocking every tool call event after it.
ALTER TABLE tool_call_events ADD COLUMN failed_at timestamptz, ADD COLUMN failure text;
DROP INDEX tool_call_events_pending;
CREATE INDEX tool_call_events_pending ON tool_call_events (created_at)
    WHERE published_at IS NULL AND failed_at IS NULL;
