"""PostgreSQL adapters for ``UserRepo`` and ``SessionStore`` (psycopg 3 on a psycopg_pool pool).

``PostgresDatabase`` owns an ``AsyncConnectionPool`` that is opened on first use (building it does
no I/O). Connections are in autocommit mode, so a single statement is its own transaction; the
operations that need several statements open one explicitly. Every call is bounded: getting a
connection waits at most ``timeout`` seconds, connecting and each statement too, and a failure of
any kind surfaces as ``ServiceUnavailable``. Connections are checked as they leave the pool, so
after a restart of Postgres the dead ones are replaced and the next call works again: without a
round trip when nothing arrived on an idle connection's socket (a server that ends a connection
says so, or closes it, first), with the pool's query check otherwise or after a long idle time.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import select
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
from opentelemetry import trace
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from otpcore.adapters.group_commit import GroupCommit
from otpcore.adapters.migrations import migration_files
from otpcore.adapters.pg_prepared import PreparedStatement
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.model import Role, User
from otpcore.domain.ports import NewSession, Rotation, RotationOutcome, Session, SignIn
from otpcore.domain.services import StepwiseSignIn

Clock = Callable[[], float]
log = logging.getLogger("otpcore.postgres")
Connection = AsyncConnection[DictRow]

# A pooled connection idle longer than this is checked with a query as it leaves the pool.
CHECK_AFTER_IDLE = 10.0
# Key of the advisory lock that serialises migrations across instances: "otp_migr" in ASCII.
_MIGRATION_LOCK = 0x6F74705F6D696772


async def apply_postgres(conn: Connection, files: Sequence[tuple[str, str]] | None = None) -> list[str]:
    """Apply the pending Postgres migrations in one transaction; returns the versions applied.
    ``files``: (version, sql) to apply instead of all of ``migration_files("postgres")``.

    The advisory lock comes first, before even creating the bookkeeping table, so instances
    migrating at once run one after the other and the later one finds nothing left to do.
    """
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        # Schema changes on a large table may legitimately outlast the per-statement bound.
        await conn.execute("SET LOCAL statement_timeout = 0")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cursor = await conn.execute("SELECT version FROM schema_migrations")
        done = {row["version"] for row in await cursor.fetchall()}
        for version, sql in migration_files("postgres") if files is None else files:
            if version in done:
                continue
            # Without parameters psycopg sends the whole file as one simple query.
            await conn.execute(sql, prepare=False)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            applied.append(version)
    return applied


class PostgresDatabase:
    """Owns the connection pool the Postgres adapters share."""

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        max_lifetime: float = 3600,
        timeout: float = 5.0,
        migrate: bool = True,
    ) -> None:
        self._migrate = migrate
        self._pool = AsyncConnectionPool(
            dsn,
            connection_class=Connection,
            kwargs=_connection_settings(dsn, timeout),
            min_size=min(min_size, max_size),
            max_size=max_size,
            max_lifetime=max_lifetime,
            timeout=timeout,
            check=self._check,
            name="otp-postgres",
            open=False,
        )
        # When each connection last went back to the pool (for the checkout check).
        self._returned: weakref.WeakKeyDictionary[Connection, float] = weakref.WeakKeyDictionary()
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False
        # Failed start attempts so far, and the last one's error: callers that queued behind a
        # failing attempt share its error instead of each waiting out a timeout of its own.
        self._failures = 0
        self._start_error: BaseException | None = None

    async def _start(self) -> None:
        """Open the pool and, if asked, migrate; once, and again after a failed attempt."""
        if self._started:
            return
        failures = self._failures
        async with self._start_lock:
            if self._closed:
                raise ServiceUnavailable("the database is closed")
            if self._started:
                return
            if self._failures != failures:
                raise ServiceUnavailable() from self._start_error
            try:
                await self._pool.open()
                if self._migrate:
                    async with self._pool.connection() as conn:
                        await apply_postgres(conn)
            except psycopg.Error as exc:
                self._failures += 1
                self._start_error = exc
                raise ServiceUnavailable() from exc
            self._started = True

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection; driver and pool errors become ServiceUnavailable."""
        if self._closed:
            raise ServiceUnavailable("the database is closed")
        await self._start()
        # getconn/putconn rather than the pool's context manager, whose exit also commits: a
        # no-op on these autocommit connections (conn.transaction() blocks end their own) that
        # cost about 25 us of CPU per checkout here, a fifth of a statement's client side.
        try:
            conn = await self._pool.getconn()
        except psycopg.Error as exc:  # psycopg_pool's errors are psycopg errors too
            raise ServiceUnavailable() from exc
        try:
            yield conn
        except psycopg.Error as exc:
            raise ServiceUnavailable() from exc
        finally:
            self._returned[conn] = time.monotonic()
            await self._pool.putconn(conn)

    async def _check(self, conn: Connection) -> None:
        """The checkout check: a round trip only when the connection may have gone bad.

        An idle connection's socket has nothing to read unless the server sent something
        unasked: the error it sends as it terminates the session (a restart, an administrator),
        end of file when the connection was closed, or, rarely, a notice. Any of those, an idle
        time past ``CHECK_AFTER_IDLE``, or a connection not in a clean idle state gets the pool's
        query check; every other checkout costs no statement.
        """
        returned = self._returned.get(conn)
        pgconn = conn.pgconn  # not conn.info: that is a new object at every read, ~1 µs each
        if (
            returned is not None
            and time.monotonic() - returned < CHECK_AFTER_IDLE
            and pgconn.status == psycopg.pq.ConnStatus.OK
            and pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
            and not _readable(pgconn.socket)
        ):
            return
        await AsyncConnectionPool.check_connection(conn)

    async def migrate(self) -> list[str]:
        """Apply pending migrations now; the versions applied."""
        async with self.connection() as conn:
            return await apply_postgres(conn)

    async def ping(self) -> None:
        async with self.connection() as conn:
            await conn.execute("SELECT 1")

    async def close(self) -> None:
        self._closed = True
        await self._pool.close()


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def _connection_settings(dsn: str, timeout: float) -> dict[str, Any]:
    """Connection arguments bounding every wait by ``timeout``, added to those of ``dsn``."""
    millis = max(1, int(timeout * 1000))
    options = conninfo_to_dict(dsn).get("options") or ""
    return {
        "autocommit": True,
        "row_factory": dict_row,
        # libpq counts whole seconds and treats 1 as 2.
        "connect_timeout": max(2, math.ceil(timeout)),
        # Unacknowledged data (a vanished server, a network partition) breaks the connection
        # instead of waiting on the socket for the kernel's own, much longer, timeout.
        "tcp_user_timeout": millis,
        # Appended to the DSN's own options, which the kwargs would otherwise replace.
        "options": f"{options} -c statement_timeout={millis} -c TimeZone=UTC".strip(),
    }


_USER_COLUMNS = "id, phone_number, name, role, is_active, created_at, updated_at"
_USER_MATCH = (
    r"(name_folded LIKE %(name_pattern)s ESCAPE '\' OR phone_number LIKE %(phone_pattern)s ESCAPE '\')"
)

# Looks the user up first, so that a login of an existing user (the common case) is one
# statement and burns no identity value; inserts only when absent. When a concurrent first
# login inserts the row after this statement's snapshot, the conflict clause makes this insert
# do nothing and no row comes back: the caller then reads the row the other one committed.
_FIND_OR_CREATE = f"""
found AS (
    SELECT {_USER_COLUMNS} FROM users WHERE phone_number = %(phone)s
), created AS (
    INSERT INTO users (phone_number, name, name_folded, role, created_at, updated_at)
    SELECT %(phone)s, %(name)s, %(name_folded)s, %(role)s, %(now)s, %(now)s
    WHERE NOT EXISTS (SELECT FROM found)
    ON CONFLICT (phone_number) DO NOTHING
    RETURNING {_USER_COLUMNS}
), signed AS (
    SELECT *, false AS created FROM found
    UNION ALL
    SELECT *, true AS created FROM created
)"""  # noqa: S608 - only constants are interpolated
_GET_OR_CREATE = f"WITH {_FIND_OR_CREATE} SELECT * FROM signed"  # noqa: S608

_UPDATE_USER = f"""
UPDATE users SET
    name = coalesce(%(name)s, name),
    name_folded = coalesce(%(name_folded)s, name_folded),
    role = coalesce(%(role)s, role),
    is_active = coalesce(%(is_active)s, is_active),
    updated_at = %(now)s
WHERE id = %(id)s
RETURNING {_USER_COLUMNS}
"""  # noqa: S608 - only constants are interpolated

# The page and the number of all matches in one statement, so one snapshot: the left join keeps
# the total when the page is empty (an offset past the end). The total ignores ``after``, which
# only says where the page starts. It adds up the users of every matching name (user_names, see
# migration 0003: far fewer rows to check than users) and the users whose phone matches but not
# their name; the second part is skipped when the query cannot be in a phone number at all.
_SEARCH = rf"""
WITH total AS (
    SELECT ((
        SELECT coalesce(sum(users), 0) FROM user_names
        WHERE name_folded LIKE %(name_pattern)s ESCAPE '\'
    ) + (
        SELECT count(*) FROM users
        WHERE %(phone_possible)s AND phone_number LIKE %(phone_pattern)s ESCAPE '\'
        AND NOT name_folded LIKE %(name_pattern)s ESCAPE '\'
    ))::bigint AS total
), page AS (
    SELECT {_USER_COLUMNS} FROM users
    WHERE {_USER_MATCH} AND id > %(after)s
    ORDER BY id LIMIT %(limit)s OFFSET %(offset)s
)
SELECT total.total, page.* FROM total LEFT JOIN page ON true ORDER BY page.id
"""  # noqa: S608 - only constants are interpolated


_PHONE_CHARACTERS = frozenset("+0123456789")


def _like_literal(text: str) -> str:
    """A LIKE pattern (escape character ``\\``) matching ``text`` anywhere, wildcards literal."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _search_params(query: str, offset: int, limit: int, after_id: int | None) -> dict[str, object]:
    return {
        # Names are matched on their case folding, stored beside them (see the migration).
        "name_pattern": _like_literal(query.casefold()),
        "phone_pattern": _like_literal(query),
        # Stored numbers are E.164: "+" and digits only.
        "phone_possible": bool(query) and not set(query) - _PHONE_CHARACTERS,
        # Identity ids start at 1, so 0 means "from the start".
        "after": 0 if after_id is None else after_id,
        "limit": limit,
        "offset": offset,
    }


def _user(row: DictRow) -> User:
    return User(
        id=row["id"],
        phone_number=row["phone_number"],
        name=row["name"],
        role=Role(row["role"]),
        is_active=row["is_active"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class PostgresUserRepo:
    def __init__(self, db: PostgresDatabase, clock: Clock = time.time) -> None:
        self.db = db
        self.clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def new_user(self, phone: str, name: str, role: Role) -> dict[str, object]:
        """The parameters of _FIND_OR_CREATE."""
        return {
            "phone": phone,
            "name": name,
            "name_folded": name.casefold(),
            "role": role.value,
            "now": self._now(),
        }

    async def get(self, user_id: int) -> User | None:
        return await self._one(f"SELECT {_USER_COLUMNS} FROM users WHERE id = %s", user_id)  # noqa: S608

    async def get_by_phone(self, phone: str) -> User | None:
        return await self._one(
            f"SELECT {_USER_COLUMNS} FROM users WHERE phone_number = %s",  # noqa: S608
            phone,
        )

    async def _one(self, sql: str, value: object) -> User | None:
        async with self.db.connection() as conn:
            row = await (await conn.execute(sql, (value,))).fetchone()
        return None if row is None else _user(row)

    async def get_or_create(self, phone: str, *, name: str, role: Role) -> tuple[User, bool]:
        async with self.db.connection() as conn:
            row = await (await conn.execute(_GET_OR_CREATE, self.new_user(phone, name, role))).fetchone()
            if row is not None:
                return _user(row), row["created"]
            # Lost the race to a concurrent first login: its row is committed by now.
            sql = f"SELECT {_USER_COLUMNS} FROM users WHERE phone_number = %s"  # noqa: S608
            row = await (await conn.execute(sql, (phone,))).fetchone()
        assert row is not None  # users are never deleted
        return _user(row), False

    async def update(
        self,
        user_id: int,
        *,
        name: str | None = None,
        role: Role | None = None,
        is_active: bool | None = None,
    ) -> User | None:
        params = {
            "id": user_id,
            "name": name,
            "name_folded": None if name is None else name.casefold(),
            "role": None if role is None else role.value,
            "is_active": is_active,
            "now": self._now(),
        }
        async with self.db.connection() as conn:
            row = await (await conn.execute(_UPDATE_USER, params)).fetchone()
        return None if row is None else _user(row)

    async def search(
        self, query: str, *, offset: int, limit: int, after_id: int | None
    ) -> tuple[list[User], int]:
        params = _search_params(query, offset, limit, after_id)
        async with self.db.connection() as conn:
            # Planned for each pattern, never from a cached generic plan: the trigram indexes
            # pay off for a long pattern and not for an empty one.
            rows = await (await conn.execute(_SEARCH, params, prepare=False)).fetchall()
        total = rows[0]["total"]
        return [_user(row) for row in rows if row["id"] is not None], total

    async def ping(self) -> None:
        await self.db.ping()


_SESSION_COLUMNS = "id, user_id, created_at, expires_at, revoked"

# A session row holds its current token's hash (migration 0005); refresh_tokens holds the
# hashes it rotated away from.
_CREATE_SESSION = f"""
INSERT INTO sessions (id, user_id, token_hash, created_at, expires_at)
VALUES (%(id)s, %(user_id)s, %(token_hash)s, %(now)s, %(expires_at)s)
RETURNING {_SESSION_COLUMNS}
"""  # noqa: S608 - only constants are interpolated

# Locks the session whose current token this is, so rotations of one session run one after
# another; one that waited finds the token no longer current and looks among the rotated ones.
_LOCK_CURRENT = f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE token_hash = %s FOR UPDATE"  # noqa: S608

# A token the session rotated away from was presented again: the session is revoked. (Of the
# session columns only token_hash is in both tables.)
_REVOKE_REUSED = f"""
UPDATE sessions s SET revoked = true
FROM refresh_tokens t
WHERE t.token_hash = %(token_hash)s AND s.id = t.session_id AND NOT s.revoked AND s.expires_at > %(now)s
RETURNING {_SESSION_COLUMNS}
"""  # noqa: S608 - only constants are interpolated

_ROTATE = f"""
WITH retired AS (
    INSERT INTO refresh_tokens (token_hash, session_id) VALUES (%(token_hash)s, %(id)s)
)
UPDATE sessions SET token_hash = %(new_hash)s, expires_at = %(expires_at)s WHERE id = %(id)s
RETURNING {_SESSION_COLUMNS}
"""  # noqa: S608 - only constants are interpolated

_FIND = f"""
SELECT {_SESSION_COLUMNS} FROM sessions WHERE token_hash = %(token_hash)s
UNION ALL
SELECT {_SESSION_COLUMNS}
FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id WHERE t.token_hash = %(token_hash)s
LIMIT 1
"""  # noqa: S608 - only constants are interpolated


def _session(row: DictRow) -> Session:
    return Session(
        id=row["id"],
        user_id=row["user_id"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked=row["revoked"],
    )


class PostgresSessionStore:
    # Every this many creates (per process), sessions that expired more than a day ago go.
    SWEEP_EVERY = 1000
    SWEEP_GRACE = 86_400.0

    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db
        self._creates = 0
        self._sweeping: asyncio.Task[None] | None = None

    async def create(
        self,
        session_id: str,
        user_id: int,
        token_hash: bytes,
        *,
        now: datetime,
        expires_at: datetime,
    ) -> Session:
        params = {
            "id": session_id,
            "user_id": user_id,
            "token_hash": token_hash,
            "now": now,
            "expires_at": expires_at,
        }
        async with self.db.connection() as conn:
            await self.sweep_when_due(conn, now)
            row = await (await conn.execute(_CREATE_SESSION, params)).fetchone()
        assert row is not None
        return _session(row)

    async def sweep_when_due(self, conn: Connection, now: datetime) -> None:
        """Called with every session opened: once in ``SWEEP_EVERY``, deletes the long expired."""
        if self._due(1):
            await self._sweep(conn, now)

    def sweep_apart_when_due(self, now: datetime, opened: int) -> None:
        """``sweep_when_due`` for ``opened`` sessions opened together, sweeping on a connection
        and in a task of its own: a slow or failing sweep holds up and fails no sign-in."""
        if self._due(opened) and (self._sweeping is None or self._sweeping.done()):
            self._sweeping = asyncio.create_task(self._sweep_apart(now), context=contextvars.Context())

    async def drain(self) -> None:
        """Wait for a sweep in flight (on shutdown)."""
        if self._sweeping is not None and not self._sweeping.done():
            await asyncio.wait([self._sweeping])

    def _due(self, opened: int) -> bool:
        before, self._creates = self._creates, self._creates + opened
        return before // self.SWEEP_EVERY != self._creates // self.SWEEP_EVERY

    async def _sweep(self, conn: Connection, now: datetime) -> None:
        cutoff = datetime.fromtimestamp(now.timestamp() - self.SWEEP_GRACE, UTC)
        await conn.execute("DELETE FROM sessions WHERE expires_at < %s", (cutoff,))

    async def _sweep_apart(self, now: datetime) -> None:
        try:
            async with self.db.connection() as conn:
                await self._sweep(conn, now)
        except ServiceUnavailable as exc:
            cause = exc.__cause__ or exc
            log.warning("sweeping expired sessions failed, again after %d more: %s", self.SWEEP_EVERY, cause)

    async def rotate(
        self, token_hash: bytes, new_hash: bytes, *, now: datetime, expires_at: datetime
    ) -> Rotation:
        async with self.db.connection() as conn, conn.transaction():
            row = await (await conn.execute(_LOCK_CURRENT, (token_hash,))).fetchone()
            if row is None:
                # Not a current token. A statement of its own, so it sees a rotation of this
                # token that committed while the lock above waited: that is a reuse too.
                reuse = {"token_hash": token_hash, "now": now}
                revoked = await (await conn.execute(_REVOKE_REUSED, reuse)).fetchone()
                if revoked is None:
                    return Rotation(outcome=RotationOutcome.INVALID)
                return Rotation(outcome=RotationOutcome.REUSED, session=_session(revoked))
            if row["revoked"] or row["expires_at"] <= now:
                return Rotation(outcome=RotationOutcome.INVALID)
            params = {
                "token_hash": token_hash,
                "new_hash": new_hash,
                "id": row["id"],
                "expires_at": expires_at,
            }
            rotated = await conn.execute(_ROTATE, params)
            return Rotation(outcome=RotationOutcome.ROTATED, session=_session(await _fetch(rotated)))

    async def find(self, token_hash: bytes) -> Session | None:
        async with self.db.connection() as conn:
            row = await (await conn.execute(_FIND, {"token_hash": token_hash})).fetchone()
        return None if row is None else _session(row)

    async def get(self, session_id: str) -> Session | None:
        async with self.db.connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = %s",  # noqa: S608
                (session_id,),
            )
            row = await cursor.fetchone()
        return None if row is None else _session(row)

    async def revoke(self, session_id: str) -> bool:
        async with self.db.connection() as conn:
            cursor = await conn.execute(
                "UPDATE sessions SET revoked = true WHERE id = %s AND NOT revoked", (session_id,)
            )
        return cursor.rowcount == 1

    async def ping(self) -> None:
        await self.db.ping()


# The user of a number (created if absent, as _GET_OR_CREATE) and, if active, a new session with
# its first token: a sign-in in one statement. No row back: a concurrent first login won the
# insert, and the caller takes the two-step path.
_SIGN_IN = f"""
WITH {_FIND_OR_CREATE}, session AS (
    INSERT INTO sessions (id, user_id, token_hash, created_at, expires_at)
    SELECT %(session_id)s, id, %(token_hash)s, %(session_created_at)s, %(expires_at)s
    FROM signed WHERE is_active
    RETURNING id
)
SELECT signed.*, session.id IS NOT NULL AS opened FROM signed LEFT JOIN session ON true
"""  # noqa: S608 - only constants are interpolated

# Sign-ins of users who exist, many in one statement (no number twice): each input row (the
# number, the new session) gets its user back and, if the user is active, its session. A number
# with no user yet gets no row: its caller creates the user with _SIGN_IN. Only existing users,
# so that batches never insert users: two batches inserting the same new numbers (and their
# name counts) in different orders could deadlock, failing every sign-in of both.
_SIGN_IN_KNOWN = f"""
WITH input AS (
    SELECT * FROM json_to_recordset(%(sign_ins)s::json) AS s(
        phone text, session_id text, token_hash text, opened_at timestamptz, expires_at timestamptz
    )
), signed AS (
    SELECT s.*, u.* FROM input s JOIN users u ON u.phone_number = s.phone
), session AS (
    INSERT INTO sessions (id, user_id, token_hash, created_at, expires_at)
    SELECT session_id, id, decode(token_hash, 'hex'), opened_at, expires_at FROM signed WHERE is_active
)
SELECT {_USER_COLUMNS}, false AS created, is_active AS opened FROM signed
"""  # noqa: S608 - only constants are interpolated

_SIGN_IN_STATEMENT = PreparedStatement("otp_sign_in", _SIGN_IN)
_SIGN_IN_KNOWN_STATEMENT = PreparedStatement("otp_sign_in_known", _SIGN_IN_KNOWN)


class _Opening(msgspec.Struct, frozen=True):
    """A row of _SIGN_IN_KNOWN's input."""

    phone: str
    session_id: str
    token_hash: str
    opened_at: datetime
    expires_at: datetime


class PostgresSignIn:
    """``SignInStore`` in as few statements as the load allows.

    A sign-in's commit waits for Postgres's log flush, and a statement costs both sides far more
    than a row (measured: ~190 µs of Postgres CPU and ~180 µs of the caller's for one sign-in a
    statement, ~57 and ~43 per sign-in at four a statement). So sign-ins of users who exist are
    group commits (``group_commit``): those arriving while one statement is in flight go
    together in the next, at most ``MAX_BATCH`` and no number twice. A first sign-in then
    creates its user in a statement of its own (_SIGN_IN).
    """

    MAX_BATCH = 64

    def __init__(self, users: PostgresUserRepo, sessions: PostgresSessionStore) -> None:
        self.users = users
        self.sessions = sessions
        self._two_steps = StepwiseSignIn(users=users, sessions=sessions)
        self._known = GroupCommit(
            self._sign_in_known,
            max_weight=self.MAX_BATCH,
            key=lambda submitted: submitted[0].phone,
            stopped="the database closed before the sign-in was confirmed",
        )

    async def sign_in(self, phone: str, *, name: str, role: Role, session: NewSession) -> SignIn:
        opening = _Opening(
            phone=phone,
            session_id=session.id,
            token_hash=session.token_hash.hex(),
            opened_at=session.created_at,
            expires_at=session.expires_at,
        )
        # The request's span goes along: the batch's statement runs outside any one trace.
        submitted = (opening, trace.get_current_span().get_span_context())
        row = await self._known.submit(submitted) or await self._sign_in_new(
            phone, name=name, role=role, session=session
        )
        if row is None:  # lost the race to a concurrent first login: its row is committed
            return await self._two_steps.sign_in(phone, name=name, role=role, session=session)
        opened = None
        if row["opened"]:
            opened = Session(
                id=session.id,
                user_id=row["id"],
                created_at=session.created_at,
                expires_at=session.expires_at,
            )
        return SignIn(user=_user(row), created=row["created"], session=opened)

    async def _sign_in_known(self, batch: list[tuple[_Opening, trace.SpanContext]]) -> list[DictRow | None]:
        openings = [opening for opening, _ in batch]
        spans = [span for _, span in batch]
        params = {"sign_ins": msgspec.json.encode(openings).decode()}
        self.sessions.sweep_apart_when_due(openings[0].opened_at, len(openings))
        async with self.users.db.connection() as conn:
            rows = await _SIGN_IN_KNOWN_STATEMENT.fetchall(conn, params, for_spans=spans)
        found = {row["phone_number"]: row for row in rows}
        return [found.get(opening.phone) for opening in openings]

    async def drain(self) -> None:
        """Wait for the batch in flight, and a sweep it started (on shutdown)."""
        await self._known.drain()
        await self.sessions.drain()

    async def _sign_in_new(self, phone: str, *, name: str, role: Role, session: NewSession) -> DictRow | None:
        params = {
            **self.users.new_user(phone, name, role),
            "session_id": session.id,
            "session_created_at": session.created_at,
            "expires_at": session.expires_at,
            "token_hash": session.token_hash,
        }
        async with self.users.db.connection() as conn:  # the sweep counted it with its batch
            return await _SIGN_IN_STATEMENT.fetchone(conn, params)


async def _fetch(cursor: psycopg.AsyncCursor[DictRow]) -> DictRow:
    row = await cursor.fetchone()
    assert row is not None  # the row was locked by this transaction
    return row
