-- The admin search's total counts users by name without visiting them: how many users have each
-- folded name, kept exact by triggers in the transaction of every write to users. A query then
-- sums the counts of the distinct names that match (a trigram search over far fewer rows than
-- users) instead of rechecking every matching user row. Counts are split into 8 shards by user
-- id, so that concurrent first logins under one name (most often the empty one) do not all wait
-- on one row.

LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE user_names (
    name_folded text     NOT NULL,
    shard       smallint NOT NULL,
    users       bigint   NOT NULL,
    PRIMARY KEY (name_folded, shard)
);

INSERT INTO user_names (name_folded, shard, users)
SELECT name_folded, id % 8, count(*) FROM users GROUP BY 1, 2;

-- Without a pending list: new names are rare next to searches, and a search would read a long
-- pending list row by row until the next vacuum.
CREATE INDEX user_names_name_folded_trgm ON user_names USING gin (name_folded gin_trgm_ops)
    WITH (fastupdate = off);

CREATE FUNCTION user_names_add(name text, user_id bigint) RETURNS void LANGUAGE sql AS $$
    INSERT INTO user_names AS u VALUES (name, user_id % 8, 1)
        ON CONFLICT (name_folded, shard) DO UPDATE SET users = u.users + 1;
$$;

-- A name no user has any more goes, so that renames leave no rows for searches to scan. A first
-- login taking the name meanwhile waits on the row, then finds it gone and inserts it anew.
CREATE FUNCTION user_names_remove(name text, user_id bigint) RETURNS void LANGUAGE sql AS $$
    UPDATE user_names SET users = users - 1 WHERE name_folded = name AND shard = user_id % 8;
    DELETE FROM user_names WHERE name_folded = name AND shard = user_id % 8 AND users = 0;
$$;

CREATE FUNCTION user_names_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A rename takes its two rows in name order, so that renames A->B and B->A at once cannot
    -- deadlock.
    IF TG_OP = 'UPDATE' AND OLD.name_folded > NEW.name_folded THEN
        PERFORM user_names_add(NEW.name_folded, NEW.id);
        PERFORM user_names_remove(OLD.name_folded, OLD.id);
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM user_names_remove(OLD.name_folded, OLD.id);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM user_names_add(NEW.name_folded, NEW.id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER user_names_insert AFTER INSERT ON users
    FOR EACH ROW EXECUTE FUNCTION user_names_track();
CREATE TRIGGER user_names_update AFTER UPDATE OF name_folded ON users
    FOR EACH ROW WHEN (OLD.name_folded IS DISTINCT FROM NEW.name_folded) EXECUTE FUNCTION user_names_track();
CREATE TRIGGER user_names_delete AFTER DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION user_names_track();

CREATE FUNCTION user_names_clear() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE user_names;
    RETURN NULL;
END $$;

CREATE TRIGGER user_names_truncate AFTER TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION user_names_clear();
