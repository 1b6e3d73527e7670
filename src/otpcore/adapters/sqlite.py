"""SQLite adapters for ``UserRepo`` and ``SessionStore`` (stdlib sqlite3).

One connection per ``SqliteDatabase``, used only on its own single worker thread: every call is
off the event loop and calls are serialised. The connection is in autocommit mode; operations of
several statements take ``BEGIN IMMEDIATE`` so that they are atomic across processes too.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from otpcore.adapters.migrations import migration_files
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.model import Role, User
from otpcore.domain.ports import Rotation, RotationOutcome, Session

Clock = Callable[[], float]
T = TypeVar("T")

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


BUSY_TIMEOUT = 5.0


def connect(path: str) -> sqlite3.Connection:
    """A connection configured the way every adapter here expects it."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        _use_wal(conn)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.create_function("casefold", 1, _casefold, deterministic=True)
    except BaseException:
        conn.close()
        raise
    return conn


def _use_wal(conn: sqlite3.Connection) -> None:
    # Switching a fresh file to WAL needs an exclusive lock, and SQLite answers "database is
    # locked" at once (no busy handler) while another process holds one: retry for a while.
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _casefold(text: str | None) -> str | None:
    return None if text is None else text.casefold()


@contextmanager
def transaction(conn: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
    """BEGIN … COMMIT, or ROLLBACK when the block raises."""
    conn.execute(f"BEGIN {mode}")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _statements(sql: str) -> Iterator[str]:
    """Split a script into statements (``executescript`` would commit on its own)."""
    pending = ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        yield pending


def apply_sqlite(conn: sqlite3.Connection) -> list[str]:
    """Apply the pending SQLite migrations in one transaction; returns the versions applied.

    The write lock is taken before reading what is applied, so instances migrating one file at
    once run one after the other and the later one finds nothing left to do.
    """
    applied: list[str] = []
    with transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, sql in migration_files("sqlite"):
            if version in done:
                continue
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, _format_time(datetime.now(UTC))),
            )
            applied.append(version)
    return applied


class SqliteDatabase:
    """Owns one connection and the single thread that uses it."""

    def __init__(self, path: str, *, migrate: bool = True) -> None:
        self.path = path
        self._migrate = migrate
        self._conn: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="otp-sqlite")
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` on the database thread; driver errors become ServiceUnavailable."""
        if self._closed:
            raise ServiceUnavailable("the database is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._call, fn, args)
        except sqlite3.DatabaseError as exc:
            raise ServiceUnavailable() from exc

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._conn is None:
            conn = connect(self.path)
            try:
                if self._migrate:
                    apply_sqlite(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return fn(self._conn, *args)

    async def migrate(self) -> list[str]:
        """Apply pending migrations now; the versions applied."""
        return await self.run(apply_sqlite)

    async def ping(self) -> None:
        await self.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._disconnect)
        self._executor.shutdown(wait=False)

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=UTC)


_USER_COLUMNS = "id, phone_number, name, role, is_active, created_at, updated_at"
# Literal substrings: instr() has no wildcards, so % _ and \ in a query match only themselves.
_USER_MATCH = "(instr(casefold(name), casefold(:query)) > 0 OR instr(phone_number, :query) > 0)"


def _user(row: sqlite3.Row) -> User:
    return User(
        id=row["id"],
        phone_number=row["phone_number"],
        name=row["name"],
        role=Role(row["role"]),
        is_active=bool(row["is_active"]),
        created_at=_parse_time(row["created_at"]),
        updated_at=_parse_time(row["updated_at"]),
    )


class SqliteUserRepo:
    def __init__(self, db: SqliteDatabase, clock: Clock = time.time) -> None:
        self.db = db
        self.clock = clock

    def _now(self) -> str:
        return _format_time(datetime.fromtimestamp(self.clock(), UTC))

    async def get(self, user_id: int) -> User | None:
        return await self.db.run(_get_user, "id", user_id)

    async def get_by_phone(self, phone: str) -> User | None:
        return await self.db.run(_get_user, "phone_number", phone)

    async def get_or_create(self, phone: str, *, name: str, role: Role) -> tuple[User, bool]:
        return await self.db.run(_get_or_create, phone, name, role.value, self._now())

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
            "role": None if role is None else role.value,
            "is_active": None if is_active is None else int(is_active),
            "now": self._now(),
        }
        return await self.db.run(_update_user, params)

    async def search(
        self, query: str, *, offset: int, limit: int, after_id: int | None
    ) -> tuple[list[User], int]:
        return await self.db.run(_search_users, query, offset, limit, after_id)

    async def ping(self) -> None:
        await self.db.ping()


def _get_user(conn: sqlite3.Connection, column: str, value: object) -> User | None:
    # ``column`` is one of two literals chosen above, never input.
    row = conn.execute(
        f"SELECT {_USER_COLUMNS} FROM users WHERE {column} = ?",  # noqa: S608
        (value,),
    ).fetchone()
    return None if row is None else _user(row)


def _get_or_create(conn: sqlite3.Connection, phone: str, name: str, role: str, now: str) -> tuple[User, bool]:
    # The conflict clause makes concurrent first logins, in any process, create one row.
    inserted = conn.execute(
        "INSERT INTO users (phone_number, name, role, is_active, created_at, updated_at)"
        " VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (phone_number) DO NOTHING",
        (phone, name, role, now, now),
    ).rowcount
    user = _get_user(conn, "phone_number", phone)
    assert user is not None  # users are never deleted
    return user, inserted == 1


def _update_user(conn: sqlite3.Connection, params: dict[str, object]) -> User | None:
    row = conn.execute(
        "UPDATE users SET name = coalesce(:name, name), role = coalesce(:role, role),"  # noqa: S608
        " is_active = coalesce(:is_active, is_active), updated_at = :now"
        f" WHERE id = :id RETURNING {_USER_COLUMNS}",
        params,
    ).fetchone()
    return None if row is None else _user(row)


def _search_users(
    conn: sqlite3.Connection, query: str, offset: int, limit: int, after_id: int | None
) -> tuple[list[User], int]:
    params = {"query": query, "after": after_id, "limit": limit, "offset": offset}
    with transaction(conn, "DEFERRED"):  # one snapshot for the page and the total
        rows = conn.execute(
            f"SELECT {_USER_COLUMNS} FROM users WHERE {_USER_MATCH}"  # noqa: S608
            " AND (:after IS NULL OR id > :after) ORDER BY id LIMIT :limit OFFSET :offset",
            params,
        ).fetchall()
        total = conn.execute(
            f"SELECT count(*) FROM users WHERE {_USER_MATCH}",  # noqa: S608
            params,
        ).fetchone()[0]
    return [_user(row) for row in rows], total


_SESSION_COLUMNS = "s.id, s.user_id, s.created_at, s.expires_at, s.revoked"


def _session(row: sqlite3.Row) -> Session:
    return Session(
        id=row["id"],
        user_id=row["user_id"],
        created_at=datetime.fromtimestamp(row["created_at"], UTC),
        expires_at=datetime.fromtimestamp(row["expires_at"], UTC),
        revoked=bool(row["revoked"]),
    )


class SqliteSessionStore:
    # Every this many creates, sessions that expired more than a day ago are deleted.
    SWEEP_EVERY = 1000
    SWEEP_GRACE = 86_400.0

    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db
        self._creates = 0

    async def create(
        self,
        session_id: str,
        user_id: int,
        token_hash: bytes,
        *,
        now: datetime,
        expires_at: datetime,
    ) -> Session:
        self._creates += 1
        sweep_before = now.timestamp() - self.SWEEP_GRACE if self._creates % self.SWEEP_EVERY == 0 else None
        return await self.db.run(
            _create_session,
            session_id,
            user_id,
            token_hash,
            now.timestamp(),
            expires_at.timestamp(),
            sweep_before,
        )

    async def rotate(
        self, token_hash: bytes, new_hash: bytes, *, now: datetime, expires_at: datetime
    ) -> Rotation:
        return await self.db.run(_rotate, token_hash, new_hash, now.timestamp(), expires_at.timestamp())

    async def find(self, token_hash: bytes) -> Session | None:
        return await self.db.run(_find_session, token_hash)

    async def get(self, session_id: str) -> Session | None:
        return await self.db.run(_get_session, session_id)

    async def revoke(self, session_id: str) -> bool:
        return await self.db.run(_revoke_session, session_id)

    async def ping(self) -> None:
        await self.db.ping()


def _create_session(
    conn: sqlite3.Connection,
    session_id: str,
    user_id: int,
    token_hash: bytes,
    now: float,
    expires_at: float,
    sweep_before: float | None,
) -> Session:
    with transaction(conn):
        if sweep_before is not None:
            conn.execute("DELETE FROM sessions WHERE expires_at < ?", (sweep_before,))
        conn.execute(
            "INSERT INTO sessions (id, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
            (session_id, user_id, now, expires_at),
        )
        conn.execute(
            "INSERT INTO refresh_tokens (token_hash, session_id, current) VALUES (?, ?, 1)",
            (token_hash, session_id),
        )
    session = _get_session(conn, session_id)
    assert session is not None
    return session


def _rotate(
    conn: sqlite3.Connection, token_hash: bytes, new_hash: bytes, now: float, expires_at: float
) -> Rotation:
    with transaction(conn):
        row = conn.execute(
            f"SELECT {_SESSION_COLUMNS}, t.current FROM refresh_tokens t"  # noqa: S608
            " JOIN sessions s ON s.id = t.session_id WHERE t.token_hash = ?",
            (token_hash,),
        ).fetchone()
        if row is None or row["revoked"] or row["expires_at"] <= now:
            return Rotation(outcome=RotationOutcome.INVALID)
        session_id = row["id"]
        if not row["current"]:
            conn.execute("UPDATE sessions SET revoked = 1 WHERE id = ?", (session_id,))
            return Rotation(outcome=RotationOutcome.REUSED, session=_get_session(conn, session_id))
        conn.execute("UPDATE refresh_tokens SET current = 0 WHERE token_hash = ?", (token_hash,))
        conn.execute(
            "INSERT INTO refresh_tokens (token_hash, session_id, current) VALUES (?, ?, 1)",
            (new_hash, session_id),
        )
        conn.execute("UPDATE sessions SET expires_at = ? WHERE id = ?", (expires_at, session_id))
        return Rotation(outcome=RotationOutcome.ROTATED, session=_get_session(conn, session_id))


def _find_session(conn: sqlite3.Connection, token_hash: bytes) -> Session | None:
    row = conn.execute(
        f"SELECT {_SESSION_COLUMNS} FROM refresh_tokens t"  # noqa: S608
        " JOIN sessions s ON s.id = t.session_id WHERE t.token_hash = ?",
        (token_hash,),
    ).fetchone()
    return None if row is None else _session(row)


def _get_session(conn: sqlite3.Connection, session_id: str) -> Session | None:
    row = conn.execute(
        f"SELECT {_SESSION_COLUMNS} FROM sessions s WHERE s.id = ?",  # noqa: S608
        (session_id,),
    ).fetchone()
    return None if row is None else _session(row)


def _revoke_session(conn: sqlite3.Connection, session_id: str) -> bool:
    cursor = conn.execute("UPDATE sessions SET revoked = 1 WHERE id = ? AND revoked = 0", (session_id,))
    return cursor.rowcount == 1
