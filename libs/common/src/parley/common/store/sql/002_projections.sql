-- Read models owned by the recorder. Rebuildable from events at any time.
CREATE TABLE calls (
    call_id          text        PRIMARY KEY,
    org_id           text        NOT NULL,
    agent_id         text        NOT NULL DEFAULT '',
    direction        text        NOT NULL DEFAULT '',
    from_number      text        NOT NULL DEFAULT '',
    to_number        text        NOT NULL DEFAULT '',
    carrier          text        NOT NULL DEFAULT '',
    carrier_call_id  text        NOT NULL DEFAULT '',
    state            text        NOT NULL,
    answered_by      text        NOT NULL DEFAULT '',
    end_reason       text        NOT NULL DEFAULT '',
    failure_reason   text        NOT NULL DEFAULT '',
    requested_at     timestamptz,
    answered_at      timestamptz,
    ended_at         timestamptz,
    duration_s       double precision,
    turns            integer     NOT NULL DEFAULT 0,
    event_count      integer     NOT NULL DEFAULT 0,
    last_position    bigint      NOT NULL
);
CREATE INDEX calls_by_org ON calls (org_id, requested_at DESC);

CREATE TABLE audit_log (
    position      bigint      PRIMARY KEY,
    org_id        text        NOT NULL,
    at            timestamptz NOT NULL,
    type          text        NOT NULL,
    aggregate     text        NOT NULL,
    aggregate_id  text        NOT NULL,
    actor         text        NOT NULL DEFAULT '',
    detail        jsonb       NOT NULL
);
CREATE INDEX audit_log_by_org ON audit_log (org_id, position DESC);
