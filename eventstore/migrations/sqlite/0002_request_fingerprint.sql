-- An idempotency key remembers which request took it (an HMAC of the request, computed
-- by the API), so a key reused for a different request is refused rather than answered
-- with the first request's outcome. The fingerprint travels in the appended event's
-- metadata only as far as these triggers: it is kept in command_keys and stripped from
-- the event, so the immutable log never holds it. `Store::expire_idempotency_keys`
-- deletes keys (and so their fingerprints) after a while: a key reused after that is a
-- new command, as with any payment API's keys. (0002 has not been released; it is
-- edited rather than followed by a 0003.)
ALTER TABLE command_keys ADD COLUMN fingerprint text;
CREATE INDEX command_keys_recorded ON command_keys (recorded_at);

DROP TRIGGER events_command_key;

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
                                        first_sequence, last_sequence, fingerprint)
    VALUES (json_extract(NEW.metadata, '$.idempotency_key'), json_extract(NEW.metadata, '$.command_id'),
            NEW.aggregate_type, NEW.aggregate_id, NEW.sequence, NEW.sequence,
            json_extract(NEW.metadata, '$.request_fingerprint'));
    UPDATE command_keys
    SET last_sequence = NEW.sequence
    WHERE idempotency_key = json_extract(NEW.metadata, '$.idempotency_key');
END;

-- SQLite cannot change NEW before the insert: the stored row is cleaned right after.
CREATE TRIGGER events_strip_fingerprint
    AFTER INSERT
    ON events
    WHEN json_extract(NEW.metadata, '$.request_fingerprint') IS NOT NULL
BEGIN
    UPDATE events
    SET metadata = json_remove(metadata, '$.request_fingerprint')
    WHERE rowid = NEW.rowid;
END;
