-- A session's user_id no longer references users: the foreign key's check locked the user's row
-- (FOR KEY SHARE) at every sign-in, a write to that row and a WAL record each time, about a fifth
-- of the statement's cost. Users are never deleted, so the key's cascade never ran; and a token
-- whose user is gone is refused anyway (AuthService.authenticate reads the user). The index on
-- user_id served only that cascade: no query reads sessions by user.
ALTER TABLE sessions DROP CONSTRAINT IF EXISTS sessions_user_id_fkey;
DROP INDEX IF EXISTS sessions_user_id;

-- Without the key, TRUNCATE users no longer insists on taking sessions along; sessions of users
-- that are gone must go too, or ids restarted by RESTART IDENTITY would give them new owners.
-- DELETE, not TRUNCATE: a TRUNCATE naming sessions as well still holds them here. Their tokens
-- go with them (ON DELETE CASCADE).
CREATE FUNCTION users_truncated_sessions_go() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM sessions;
    RETURN NULL;
END $$;

CREATE TRIGGER users_truncate_sessions AFTER TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION users_truncated_sessions_go();
