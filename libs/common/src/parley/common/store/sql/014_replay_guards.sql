-- What makes a carrier's signed request good once only (parley.gateway.replays).
--
-- Plivo's V3 signature binds URL, parameters and a random nonce, but no time: a nonce seen
-- is kept (its sha256, never the nonce) until expires_at (plivo_nonce_window_s), and a request
-- carrying it again is refused. A nonce past expires_at may be claimed anew.
CREATE TABLE carrier_nonces (
    carrier       text        NOT NULL,
    nonce_sha256  text        NOT NULL,
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (carrier, nonce_sha256)
);
CREATE INDEX carrier_nonces_expires ON carrier_nonces (expires_at);

-- One row per <Connect><Stream> (or ConversationRelay) a Twilio call was answered with,
-- numbered per call from 0 (the voice webhook's). The TwiML carries a one-time token (its
-- sha256 here) as a <Parameter>; a stream's start is accepted only with a token of its call,
-- unused and not past expires_at, and uses it up (used_at, stream_id). The <Connect action>
-- URL names its connect: only the call's latest connect may reconnect.
CREATE TABLE carrier_stream_tokens (
    call_id       text        NOT NULL,
    connect       integer     NOT NULL,
    token_sha256  text        NOT NULL,
    issued_at     timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    used_at       timestamptz,
    stream_id     text        NOT NULL DEFAULT '',
    PRIMARY KEY (call_id, connect)
);
CREATE INDEX carrier_stream_tokens_expires ON carrier_stream_tokens (expires_at);
