-- Domain events, written in the same transaction as the change they describe (the outbox
-- pattern), read by EventService.WatchEvents. `tx` is the writing transaction's id: readers
-- only return events of transactions older than the oldest still running, so a reader never
-- passes over an event that commits later (see src/events.rs).
CREATE TABLE outbox (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    event_id   uuid        NOT NULL,
    type       text        NOT NULL,
    subject    uuid        NOT NULL,
    -- The protobuf-encoded refsys.referral.v1.Event (its `data`); never a phone number.
    payload    bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT outbox_event_id_key UNIQUE (event_id)
);
CREATE INDEX outbox_order_idx ON outbox (tx, id);
CREATE INDEX outbox_created_idx ON outbox (created_at);

-- The position of the newest event pruned (EVENTS_RETENTION_DAYS): a cursor before it has lost
-- events and is refused with OUT_OF_RANGE instead of silently skipping them.
CREATE TABLE outbox_pruned (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    tx        xid8    NOT NULL,
    id        bigint  NOT NULL
);
