-- An idempotency key remembers which request took it (an HMAC of the request, computed
-- by the API), so a key reused for a different request is refused rather than answered
-- with the first request's outcome. The fingerprint travels in the appended event's
-- metadata only as far as this trigger: it is kept in command_keys and stripped from
-- the event, so the immutable log never holds it. `Store::expire_idempotency_keys`
-- deletes keys (and so their fingerprints) after a while: a key reused after that is a
-- new command, as with any payment API's keys. (0002 has not been released; it is
-- edited rather than followed by a 0003.)
ALTER TABLE command_keys ADD COLUMN fingerprint text;
CREATE INDEX command_keys_recorded ON command_keys (recorded_at);

CREATE OR REPLACE FUNCTION events_take_command_key() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    INSERT INTO command_keys AS c (idempotency_key, command_id, aggregate_type, aggregate_id,
                                   first_sequence, last_sequence, fingerprint)
    VALUES (NEW.metadata ->> 'idempotency_key', NEW.metadata ->> 'command_id',
            NEW.aggregate_type, NEW.aggregate_id, NEW.sequence, NEW.sequence,
            NEW.metadata ->> 'request_fingerprint')
    ON CONFLICT (idempotency_key) DO UPDATE SET last_sequence = EXCLUDED.last_sequence
    WHERE c.command_id = EXCLUDED.command_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency key already used' USING ERRCODE = 'unique_violation';
    END IF;
    NEW.metadata := (NEW.metadata::jsonb - 'request_fingerprint')::json;
    RETURN NEW;
END
$$;
