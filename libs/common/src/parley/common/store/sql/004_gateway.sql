-- The gateway's map from a carrier's call id to ours. Status callbacks carry only the carrier's
-- id (CallSid), so it must resolve synchronously, and ended_at makes "call.ended exactly once"
-- hold across Twilio's retries, the stream's stop message and our own hang-ups.
CREATE TABLE carrier_calls (
    carrier          text        NOT NULL,
    carrier_call_id  text        NOT NULL,
    call_id          text        NOT NULL UNIQUE,
    org_id           text        NOT NULL,
    agent_id         text        NOT NULL,
    direction        text        NOT NULL,
    from_number      text        NOT NULL DEFAULT '',
    to_number        text        NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    answered_at      timestamptz,
    ended_at         timestamptz,
    end_reason       text        NOT NULL DEFAULT '',
    PRIMARY KEY (carrier, carrier_call_id)
);

-- One row per once-only milestone of a call (ringing, answered, amd, recording:<sid>, …):
-- a webhook emits its event only when it inserted the row, in the same transaction.
CREATE TABLE carrier_call_milestones (
    call_id    text        NOT NULL,
    milestone  text        NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (call_id, milestone)
);
