-- Users, and refresh-token sessions with their tokens (stored hashed, never in plain text).

-- Trigram indexes keep the admin search (a substring of the name or the phone) fast at 10^6 users.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE users (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    phone_number text        NOT NULL UNIQUE,
    name         text        NOT NULL DEFAULT '',
    -- Python's str.casefold() of name, written by the adapter with every name: the search is
    -- a case-insensitive substring match with full Unicode case folding ('STRASSE' finds
    -- 'Straße'), which neither ILIKE nor lower() gives. No default, so a writer that forgets
    -- it fails loudly instead of making users unfindable.
    name_folded  text        NOT NULL,
    role         text        NOT NULL CHECK (role IN ('user', 'admin')),
    is_active    boolean     NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);

CREATE INDEX users_name_folded_trgm ON users USING gin (name_folded gin_trgm_ops);
CREATE INDEX users_phone_number_trgm ON users USING gin (phone_number gin_trgm_ops);

CREATE TABLE sessions (
    id         text        PRIMARY KEY,
    user_id    bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    revoked    boolean     NOT NULL DEFAULT false
);

CREATE INDEX sessions_user_id ON sessions (user_id);
-- For the occasional sweep of sessions that expired long ago.
CREATE INDEX sessions_expires_at ON sessions (expires_at);

CREATE TABLE refresh_tokens (
    token_hash bytea   PRIMARY KEY,
    session_id text    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    current    boolean NOT NULL
);

CREATE INDEX refresh_tokens_session_id ON refresh_tokens (session_id);
