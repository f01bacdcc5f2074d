-- The calls the recorder still has "requested": outbound calls whose request ended before the
-- carrier was asked (its process died after call.requested). The gateway's orphan check looks
-- for old ones every round to fail them (parley.gateway.orphans.settle_never_dialled); a
-- partial index keeps that a lookup of the few such calls, not a scan of every call.
CREATE INDEX calls_requested ON calls (requested_at, call_id) WHERE state = 'requested';
