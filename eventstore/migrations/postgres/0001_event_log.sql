-- The events table is postgres-es's own (same columns, same primary key, so postgres-es
-- appends to it unchanged) plus the columns of the global log. Every added column has a
-- default, so an append sends nothing more than postgres-es already sends.
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    -- global position: unique, increasing in allocation order (not in commit order)
    position       bigserial                    NOT NULL,
    event_id       uuid                         NOT NULL DEFAULT gen_random_uuid(),
    recorded_at    timestamptz                  NOT NULL DEFAULT clock_timestamp(),
    -- the writing transaction: consumers read only below the oldest running
    -- transaction (pg_snapshot_xmin), in (tx_id, position) order, so an event that
    -- commits late with a lower position can never be skipped
    tx_id          xid8                         NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE INDEX events_log_order ON events (tx_id, position);
CREATE UNIQUE INDEX events_position ON events (position);

-- cqrs-es snapshots (unused for now, kept so postgres-es works unchanged)
CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- Idempotency keys: written by a trigger inside the appending transaction, so a key is
-- taken if and only if its events are committed. A second command with the same key
-- fails with unique_violation and the caller answers with the first command's result.
CREATE TABLE command_keys
(
    idempotency_key text        PRIMARY KEY,
    command_id      text        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    first_sequence  bigint      NOT NULL,
    last_sequence   bigint      NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION events_take_command_key() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    INSERT INTO command_keys AS c (idempotency_key, command_id, aggregate_type, aggregate_id,
                                   first_sequence, last_sequence)
    VALUES (NEW.metadata ->> 'idempotency_key', NEW.metadata ->> 'command_id',
            NEW.aggregate_type, NEW.aggregate_id, NEW.sequence, NEW.sequence)
    ON CONFLICT (idempotency_key) DO UPDATE SET last_sequence = EXCLUDED.last_sequence
    WHERE c.command_id = EXCLUDED.command_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency key already used' USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER events_command_key
    BEFORE INSERT
    ON events
    FOR EACH ROW
    WHEN ((NEW.metadata ->> 'idempotency_key') IS NOT NULL)
EXECUTE FUNCTION events_take_command_key();

-- Consumer checkpoints, written in the same transaction as the consumer's read models.
CREATE TABLE consumer_checkpoints
(
    name       text   PRIMARY KEY,
    tx         bigint NOT NULL,
    position   bigint NOT NULL,
    updated_at text   NOT NULL
);

-- Per-subject data keys (wrapped by the master key); deleting one crypto-shreds the
-- subject's personal fields everywhere they were sealed.
CREATE TABLE subject_keys
(
    subject_id  text PRIMARY KEY,
    wrapped_key text NOT NULL,
    created_at  text NOT NULL
);
