-- Tools (services/tools): per-agent HTTP tool definitions, per-org secrets for their auth headers,
-- the journal of tool calls (idempotency, approvals, outcomes) with its own outbox, and the
-- callback requests the schedule_callback built-in stores.

-- One HTTP tool of one agent; ``definition`` is a parley.tools HttpTool (schema, URL, retries…).
CREATE TABLE tools (
    org_id       text        NOT NULL REFERENCES orgs,
    agent_id     text        NOT NULL REFERENCES agents,
    name         text        NOT NULL,
    definition   jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, name)
);
CREATE INDEX tools_by_org ON tools (org_id);

-- Values for ``{secret:<name>}`` in tool header templates. Never logged, never put in events.
CREATE TABLE tool_secrets (
    org_id       text        NOT NULL REFERENCES orgs,
    name         text        NOT NULL,
    value        text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, name)
);

-- One row per tool call. Model-generated tool_call_ids are only unique within a call, hence the
-- key. state: awaiting_approval → approved → running → completed | failed, or → denied.
-- A row in ``running`` whose lease has passed was interrupted (crash) and is failed by a sweep,
-- never re-run: the customer's API may already have acted on it.
CREATE TABLE tool_calls (
    call_id           text        NOT NULL,
    tool_call_id      text        NOT NULL,
    org_id            text        NOT NULL,
    agent_id          text        NOT NULL DEFAULT '',
    turn_id           text        NOT NULL DEFAULT '',
    name              text        NOT NULL,
    arguments         jsonb       NOT NULL,
    request_event_id  uuid        NOT NULL,
    state             text        NOT NULL,
    decided_by        text        NOT NULL DEFAULT '',
    expires_at        timestamptz,
    lease_until       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (call_id, tool_call_id)
);
CREATE INDEX tool_calls_by_id ON tool_calls (tool_call_id, org_id);
CREATE INDEX tool_calls_awaiting ON tool_calls (expires_at) WHERE state = 'awaiting_approval';
CREATE INDEX tool_calls_running ON tool_calls (lease_until) WHERE state = 'running';

-- The tools service's outbox: every event it emits is written here in the transaction that
-- changes tool_calls, published right after commit, and re-published by a sweep if that failed.
CREATE TABLE tool_call_events (
    event_id      uuid        PRIMARY KEY,
    call_id       text        NOT NULL,
    tool_call_id  text        NOT NULL,
    type          text        NOT NULL,
    payload       bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz,
    FOREIGN KEY (call_id, tool_call_id) REFERENCES tool_calls
);
CREATE INDEX tool_call_events_of_call ON tool_call_events (call_id, tool_call_id);
CREATE INDEX tool_call_events_pending ON tool_call_events (created_at)
    WHERE published_at IS NULL;

-- Callback requests made by the schedule_callback built-in (one per tool call).
CREATE TABLE tool_callbacks (
    id            bigserial   PRIMARY KEY,
    org_id        text        NOT NULL,
    call_id       text        NOT NULL,
    tool_call_id  text        NOT NULL,
    agent_id      text        NOT NULL DEFAULT '',
    number        text        NOT NULL,
    callback_at   timestamptz NOT NULL,
    note          text        NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (call_id, tool_call_id)
);
CREATE INDEX tool_callbacks_due ON tool_callbacks (org_id, callback_at);
