-- An outbox row that can never be published (its payload is not an event, or its ids cannot
-- stand in a subject) is set aside with the reason instead of blocking every row after it.
ALTER TABLE outbox ADD COLUMN failed_at timestamptz, ADD COLUMN failure text;
DROP INDEX outbox_pending;
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL AND failed_at IS NULL;
