-- Users, and refresh-token sessions with their tokens (stored hashed).
-- Timestamps of users are UTC text '%Y-%m-%dT%H:%M:%S.%fZ'; those of sessions epoch seconds.

CREATE TABLE users (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    phone_number TEXT    NOT NULL UNIQUE,
    name         TEXT    NOT NULL DEFAULT '',
    role         TEXT    NOT NULL CHECK (role IN ('user', 'admin')),
    is_active    INTEGER NOT NULL DEFAULT 1,
    created_at   TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL
);

CREATE TABLE sessions (
    id         TEXT    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at REAL    NOT NULL,
    expires_at REAL    NOT NULL,
    revoked    INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX sessions_user_id ON sessions (user_id);
-- For the occasional sweep of sessions that expired long ago.
CREATE INDEX sessions_expires_at ON sessions (expires_at);

CREATE TABLE refresh_tokens (
    token_hash BLOB    PRIMARY KEY,
    session_id TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    current    INTEGER NOT NULL
);

CREATE INDEX refresh_tokens_session_id ON refresh_tokens (session_id);
