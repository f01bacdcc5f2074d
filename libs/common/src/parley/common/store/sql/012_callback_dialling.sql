-- The gateway dials the callbacks schedule_callback books (parley.gateway.due_callbacks).
-- status: pending → dialing → placed | failed; a transient carrier failure puts it back to
-- pending with retry_at later, until its last attempt. A row is claimed (dialing) in a committed
-- transaction before it is dialled, so no two gateway instances dial it; one left dialing by an
-- instance that died mid-dial is never dialled again (the carrier may have placed it).
-- placed_call_id: our id of the call dialled last (placed: the callback call).
ALTER TABLE tool_callbacks
    ADD COLUMN status          text        NOT NULL DEFAULT 'pending',
    ADD COLUMN attempts        integer     NOT NULL DEFAULT 0,
    ADD COLUMN retry_at        timestamptz,
    ADD COLUMN placed_call_id  text        NOT NULL DEFAULT '',
    ADD COLUMN last_error      text        NOT NULL DEFAULT '',
    ADD COLUMN updated_at      timestamptz NOT NULL DEFAULT now();
CREATE INDEX tool_callbacks_pending ON tool_callbacks ((coalesce(retry_at, callback_at)))
    WHERE status = 'pending';
CREATE INDEX tool_callbacks_dialing ON tool_callbacks (updated_at) WHERE status = 'dialing';
-- Rows booked before this migration were never going to be dialled, and schedule_callback
-- booked them unguarded (any number the model named, any time): only those schedule_callback
-- would book now stay pending — still ahead, at most 30 days after booking, to the caller's own
-- number (no agent had callback_number_prefixes yet). The rest (a time long past: the caller
-- was never called back; a number a caller may have talked the model into) are failed.
UPDATE tool_callbacks c
   SET status = 'failed',
       last_error = 'booked before callbacks were dialled (migration 012), and not one '
                    'schedule_callback would book now: due already, over 30 days ahead, or '
                    'not to the caller''s own number'
 WHERE callback_at <= now()
    OR callback_at > created_at + interval '30 days'
    OR NOT EXISTS (SELECT 1 FROM carrier_calls o WHERE o.call_id = c.call_id
                   AND c.number = CASE WHEN o.direction = 'inbound' THEN o.from_number
                                       ELSE o.to_number END);
-- One outstanding (pending or dialing) callback per call and number: schedule_callback refuses a
-- second, and the index makes that hold when two tool calls of one round book at once. Of the
-- rows booked before, the first stands.
UPDATE tool_callbacks c
   SET status = 'failed',
       last_error = 'booked before callbacks were dialled (migration 012), after another '
                    'callback to the same number on the same call, which stands'
 WHERE status = 'pending'
   AND EXISTS (SELECT 1 FROM tool_callbacks o WHERE o.call_id = c.call_id
               AND o.number = c.number AND o.status = 'pending' AND o.id < c.id);
CREATE UNIQUE INDEX tool_callbacks_outstanding ON tool_callbacks (call_id, number)
    WHERE status IN ('pending', 'dialing');
