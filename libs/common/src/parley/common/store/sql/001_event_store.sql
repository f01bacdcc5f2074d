-- The permanent event store. position = JetStream EVENTS stream sequence: one total order.
CREATE TABLE events (
    position      bigint      PRIMARY KEY,
    event_id      uuid        NOT NULL UNIQUE,
    org_id        text        NOT NULL,
    aggregate     text        NOT NULL,
    aggregate_id  text        NOT NULL,
    type          text        NOT NULL,
    v             integer     NOT NULL,
    at            timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    causation_id  uuid,
    data          jsonb       NOT NULL,
    trace         text
);
CREATE INDEX events_by_aggregate ON events (aggregate_id, position);
CREATE INDEX events_by_org_type ON events (org_id, type, position);

-- Append-only, whoever connects: the store is the audit trail.
CREATE FUNCTION events_are_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only (% refused)', TG_OP;
END $$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_append_only();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_are_append_only();

-- Where each reader has got to; written in the same transaction as what it covers.
CREATE TABLE checkpoints (
    name        text        PRIMARY KEY,
    position    bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Stream positions the recorder could not store as events (undecodable payloads, and gaps when
-- JetStream expired messages before they were recorded), so every position is accounted for.
CREATE TABLE dead_letters (
    position     bigint      PRIMARY KEY,
    subject      text        NOT NULL,
    reason       text        NOT NULL,
    payload      bytea,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
