-- Each EVENTS stream the recorder has read, told apart by the stream's own created time. A stream
-- deleted and created again numbers its messages from 1 again, so an event's position is its
-- stream sequence plus its stream's sequence_offset: 0 for the first stream; for a later one, what
-- the recorder had recorded when it found it, so its first message comes right after. The row
-- with the highest since_position (the checkpoint when it was found) is the stream read now.
CREATE TABLE recorder_streams (
    since_position   bigint      PRIMARY KEY,
    created          timestamptz NOT NULL,
    sequence_offset  bigint      NOT NULL,
    found_at         timestamptz NOT NULL DEFAULT now()
);
