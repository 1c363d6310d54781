-- The events table is sqlite-es's own (same columns and primary key, so sqlite-es
-- appends unchanged) plus the columns of the global log, all filled by defaults and a
-- trigger. SQLite has a single writer, so positions are assigned in commit order.
CREATE TABLE events
(
    aggregate_type text                          NOT NULL,
    aggregate_id   text                          NOT NULL,
    sequence       integer CHECK (sequence >= 0) NOT NULL,
    event_type     text                          NOT NULL,
    event_version  text                          NOT NULL,
    payload        text                          NOT NULL,
    metadata       text                          NOT NULL,
    position       integer,
    event_id       text                          NOT NULL DEFAULT (
        lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4' ||
        substr(lower(hex(randomblob(2))), 2) || '-' ||
        substr('89ab', 1 + (abs(random()) % 4), 1) || substr(lower(hex(randomblob(2))), 2) || '-' ||
        lower(hex(randomblob(6)))),
    recorded_at    text                          NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
) STRICT;
CREATE UNIQUE INDEX events_position ON events (position);

CREATE TRIGGER events_assign_position
    AFTER INSERT
    ON events
BEGIN
    UPDATE events
    SET position = (SELECT coalesce(max(position), 0) + 1 FROM events)
    WHERE rowid = NEW.rowid;
END;

CREATE TABLE snapshots
(
    aggregate_type   text                                  NOT NULL,
    aggregate_id     text                                  NOT NULL,
    last_sequence    integer CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot integer CHECK (current_snapshot >= 0) NOT NULL,
    payload          text                                  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
) STRICT;

CREATE TABLE command_keys
(
    idempotency_key text PRIMARY KEY,
    command_id      text    NOT NULL,
    aggregate_type  text    NOT NULL,
    aggregate_id    text    NOT NULL,
    first_sequence  integer NOT NULL,
    last_sequence   integer NOT NULL,
    recorded_at     text    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE TRIGGER events_command_key
    BEFORE INSERT
    ON events
    WHEN json_extract(NEW.metadata, '$.idempotency_key') IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'idempotency key already used')
    WHERE EXISTS (SELECT 1
                  FROM command_keys
                  WHERE idempotency_key = json_extract(NEW.metadata, '$.idempotency_key')
                    AND command_id <> json_extract(NEW.metadata, '$.command_id'));
    INSERT OR IGNORE INTO command_keys (idempotency_key, command_id, aggregate_type, aggregate_id,
                                        first_sequence, last_sequence)
    VALUES (json_extract(NEW.metadata, '$.idempotency_key'), json_extract(NEW.metadata, '$.command_id'),
            NEW.aggregate_type, NEW.aggregate_id, NEW.sequence, NEW.sequence);
    UPDATE command_keys
    SET last_sequence = NEW.sequence
    WHERE idempotency_key = json_extract(NEW.metadata, '$.idempotency_key');
END;

CREATE TABLE consumer_checkpoints
(
    name       text PRIMARY KEY,
    tx         integer NOT NULL,
    position   integer NOT NULL,
    updated_at text    NOT NULL
) STRICT;

CREATE TABLE subject_keys
(
    subject_id  text PRIMARY KEY,
    wrapped_key text NOT NULL,
    created_at  text NOT NULL
) STRICT;
