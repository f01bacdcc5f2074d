-- Configuration: ordinary tables, each change written with an outbox row in the same
-- transaction; the outbox relay publishes those rows as config events (no dual write).
CREATE TABLE orgs (
    org_id       text        PRIMARY KEY,
    name         text        NOT NULL,
    allow_private_tool_targets boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE agents (
    agent_id     text        PRIMARY KEY,
    org_id       text        NOT NULL REFERENCES orgs,
    name         text        NOT NULL,
    settings     jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz
);
CREATE INDEX agents_by_org ON agents (org_id);

CREATE TABLE numbers (
    number       text        PRIMARY KEY,  -- E.164
    org_id       text        NOT NULL REFERENCES orgs,
    agent_id     text        NOT NULL REFERENCES agents,
    carrier      text        NOT NULL DEFAULT 'twilio',
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX numbers_by_org ON numbers (org_id);

CREATE TABLE api_keys (
    key_id       text        PRIMARY KEY,
    org_id       text        NOT NULL REFERENCES orgs,
    name         text        NOT NULL DEFAULT '',
    secret_hash  bytea       NOT NULL,  -- sha256 of a 256-bit random secret
    scopes       text[]      NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX api_keys_by_org ON api_keys (org_id);

CREATE TABLE outbox (
    id            bigserial   PRIMARY KEY,
    event_id      uuid        NOT NULL UNIQUE,
    payload       bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;
