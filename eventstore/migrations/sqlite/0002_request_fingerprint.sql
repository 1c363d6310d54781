-- An idempotency key remembers which request took it (an HMAC of the request, computed
-- by the API), so a key reused for a different request is refused rather than answered
-- with the first request's outcome.
ALTER TABLE command_keys ADD COLUMN fingerprint text;

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
