-- Idempotency-Key of POST /v1/calls (parley.gateway.api.idempotency): one row per org and key.
-- The first request claims the row (state in_flight, its call id chosen, a lease until
-- locked_until) before anything is dialled; its outcome (status code and response body: a call
-- id or a problem, never the request) replaces the lease (state done) and is replayed to a
-- retry whose body hashes the same (request_hash: sha256 of the canonical body). A lease that
-- ran out (the process died mid-way) is decided by what carrier_calls records of call_id,
-- never by dialling again. Rows are deleted 24 h after created_at.
CREATE TABLE api_idempotency_keys (
    org_id           text        NOT NULL,
    idempotency_key  text        NOT NULL,
    request_hash     text        NOT NULL,
    call_id          text        NOT NULL,
    state            text        NOT NULL DEFAULT 'in_flight',
    locked_until     timestamptz NOT NULL,
    response_status  integer,
    response_body    bytea,
    created_at       timestamptz NOT NULL,
    PRIMARY KEY (org_id, idempotency_key)
);
CREATE INDEX api_idempotency_keys_created ON api_idempotency_keys (created_at);
