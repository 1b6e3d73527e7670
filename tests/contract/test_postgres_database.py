"""PostgresDatabase: the pool the Postgres adapters share, its failures, migrations and indexes."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from otpcore.adapters.migrations import migration_files
from otpcore.adapters.postgres import (
    _MIGRATION_LOCK,
    _SEARCH,
    PostgresDatabase,
    PostgresSessionStore,
    PostgresUserRepo,
    _search_params,
    apply_postgres,
)
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.model import Role
from otpcore.domain.ports import RotationOutcome
from tests.backends.postgres import create_test_database, drop_test_database

VERSIONS = [version for version, _ in migration_files("postgres")]
# A bound that only a hang would break, not a claim about speed.
HANG_GUARD = 10.0


@pytest.fixture
def fresh_dsn() -> Iterator[str]:
    """A database of its own with nothing in it, not even the schema."""
    dsn = create_test_database()
    try:
        yield dsn
    finally:
        drop_test_database(dsn)


def _closed_port_dsn() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens there once the socket is closed: connections are refused.
    return f"postgresql://postgres@127.0.0.1:{port}/otp"


def _terminate_others(dsn: str) -> int:
    """Disconnect every session of the test database ``dsn`` (waiting until they are gone)."""
    name = urlsplit(dsn).path.lstrip("/")
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return len(rows)


def test_building_does_no_io() -> None:
    # Outside any event loop, towards a server that is not there: nothing may fail yet.
    PostgresDatabase(_closed_port_dsn())


async def test_connection_settings(pg_dsn) -> None:
    db = PostgresDatabase(f"{pg_dsn}?options=-c%20work_mem%3D8MB", timeout=2.5)
    try:
        async with db.connection() as conn:
            cursor = await conn.execute(
                "SELECT current_setting('statement_timeout') AS statement_timeout,"
                " current_setting('TimeZone') AS timezone, current_setting('work_mem') AS work_mem"
            )
            settings = await cursor.fetchone()
            assert conn.autocommit
        # Bounded statements, UTC timestamps, and the DSN's own options kept.
        assert settings == {"statement_timeout": "2500ms", "timezone": "UTC", "work_mem": "8MB"}
    finally:
        await db.close()


async def test_migrates_on_first_use_unless_told_not_to(fresh_dsn) -> None:
    bare = PostgresDatabase(fresh_dsn, migrate=False)
    try:
        with pytest.raises(ServiceUnavailable) as info:
            await PostgresUserRepo(bare).get(1)  # no users table yet
        assert isinstance(info.value.__cause__, psycopg.errors.UndefinedTable)
        assert await bare.migrate() == VERSIONS
        assert await bare.migrate() == []
        assert await PostgresUserRepo(bare).get(1) is None
    finally:
        await bare.close()

    db = PostgresDatabase(fresh_dsn)
    try:
        assert await db.migrate() == []  # nothing was pending
    finally:
        await db.close()


async def test_slow_statement_is_cut_off_by_the_server(pg_dsn) -> None:
    db = PostgresDatabase(pg_dsn, timeout=1.0)
    try:
        with pytest.raises(ServiceUnavailable) as info:
            async with db.connection() as conn:
                await conn.execute("SELECT pg_sleep(30)")
        assert isinstance(info.value.__cause__, psycopg.errors.QueryCanceled)
        await db.ping()  # the connection is still good
    finally:
        await db.close()


async def test_recovers_after_its_connections_are_terminated(pg_database, pg_dsn) -> None:
    repo = PostgresUserRepo(pg_database)
    user, _ = await repo.get_or_create("+14155550123", name="Ada", role=Role.USER)

    # Idle pooled connections killed (as by a restart of Postgres): the pool's check replaces
    # them and the next call simply works.
    assert _terminate_others(pg_dsn) >= 1
    assert await repo.get(user.id) == user

    # A connection killed while in use: that call fails cleanly, the next one works.
    with pytest.raises(ServiceUnavailable) as info:
        async with pg_database.connection() as conn:
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    assert await repo.get_by_phone("+14155550123") == user


async def test_a_checkout_sends_no_check_query_unless_the_connection_may_be_bad(
    pg_database, pg_dsn, monkeypatch
) -> None:
    from psycopg_pool import AsyncConnectionPool

    checked: list[object] = []
    real_check = AsyncConnectionPool.check_connection

    async def counting_check(conn: object) -> None:
        checked.append(conn)
        await real_check(conn)  # type: ignore[arg-type]

    monkeypatch.setattr(AsyncConnectionPool, "check_connection", staticmethod(counting_check))
    await pg_database.ping()
    checked.clear()
    for _ in range(5):
        await pg_database.ping()  # the same connection, just returned, nothing on its socket
    assert checked == []

    # Something waiting on the socket (here: the server ending the session) means a real check.
    assert _terminate_others(pg_dsn) >= 1
    await pg_database.ping()
    assert len(checked) >= 1


async def test_refused_connections_are_unavailable_in_bounded_time() -> None:
    db = PostgresDatabase(_closed_port_dsn())
    try:
        started = time.monotonic()
        # Callers queued behind a failing first use share its failure, rather than each
        # waiting out a timeout of its own one after the other.
        results = await asyncio.gather(*(db.ping() for _ in range(5)), return_exceptions=True)
        assert time.monotonic() - started < HANG_GUARD
        assert all(isinstance(r, ServiceUnavailable) for r in results), results
        assert all(isinstance(r.__cause__, psycopg.OperationalError) for r in results)
    finally:
        await db.close()


async def test_comes_back_by_itself_when_the_database_appears(pg_dsn) -> None:
    # A database that does not exist yet stands for a server that is down.
    name = f"otp_test_late_{time.time_ns()}"
    dsn = urlsplit(pg_dsn)._replace(path=f"/{name}").geturl()
    db = PostgresDatabase(dsn, timeout=2.0)
    try:
        with pytest.raises(ServiceUnavailable):
            await db.ping()
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        # The failed first use is tried again: the pool reconnects and the schema is applied.
        assert await PostgresUserRepo(db).get(1) is None
    finally:
        await db.close()
        drop_test_database(dsn)


async def test_closed_database_is_unavailable(pg_dsn) -> None:
    db = PostgresDatabase(pg_dsn)
    await db.ping()
    await db.close()
    await db.close()  # idempotent
    with pytest.raises(ServiceUnavailable):
        await db.ping()


def test_two_processes_migrating_at_once_apply_each_file_once(fresh_dsn) -> None:
    script = (
        "import asyncio, sys; from otpcore.adapters.postgres import PostgresDatabase\n"
        "async def main():\n"
        "    db = PostgresDatabase(sys.argv[1], migrate=False)\n"
        "    try:\n"
        "        print(len(await db.migrate()))\n"
        "    finally:\n"
        "        await db.close()\n"
        "asyncio.run(main())\n"
    )
    with psycopg.connect(fresh_dsn, autocommit=True) as holder:
        # Hold the migration lock until both processes are queued on it, so they truly race.
        holder.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, fresh_dsn],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            waiting = holder.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchone()
            if waiting == (2,) or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.05)
        holder.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
        results = [proc.communicate(timeout=60) for proc in procs]
        assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in results]
        assert waiting == (2,)
        assert sorted(int(out) for out, _ in results) == [0, len(VERSIONS)]
        recorded = holder.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert [version for (version,) in recorded] == VERSIONS


async def test_first_login_racing_an_uncommitted_one_returns_that_user(pg_database, pg_dsn) -> None:
    repo = PostgresUserRepo(pg_database)
    with psycopg.connect(pg_dsn) as other:  # a transaction left open
        other.execute(
            "INSERT INTO users (phone_number, name, name_folded, role, created_at, updated_at)"
            " VALUES ('+14155550123', 'First', 'first', 'user', now(), now())"
        )
        racing = asyncio.create_task(repo.get_or_create("+14155550123", name="Second", role=Role.USER))
        await asyncio.sleep(0.3)  # the insert now waits on the uncommitted row
        assert not racing.done()
        other.commit()
        user, created = await racing
    assert (user.name, created) == ("First", False)


async def test_search_indexes_are_trigram_indexes(pg_database) -> None:
    async with pg_database.connection() as conn:
        cursor = await conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'users'")
        indexes = {row["indexname"]: row["indexdef"] for row in await cursor.fetchall()}
    for name, column in [
        ("users_name_folded_trgm", "name_folded"),
        ("users_phone_number_trgm", "phone_number"),
    ]:
        assert f"USING gin ({column} gin_trgm_ops)" in indexes[name]


async def test_search_uses_the_trigram_indexes(pg_database) -> None:
    repo = PostgresUserRepo(pg_database)
    async with pg_database.connection() as conn:
        await conn.execute(
            "INSERT INTO users (phone_number, name, name_folded, role, created_at, updated_at)"
            " SELECT '+1555' || lpad(i::text, 7, '0'), 'user ' || i, 'user ' || i, 'user', now(), now()"
            " FROM generate_series(1, 20000) AS i"
        )
    ada, _ = await repo.get_or_create("+14155550123", name="Ada Lovelace", role=Role.USER)
    async with pg_database.connection() as conn:
        await conn.execute("ANALYZE users")
        # 20k rows are enough for the planner to prefer the indexes: no enable_seqscan=off.
        cursor = await conn.execute(f"EXPLAIN {_SEARCH}", _search_params("lovelace", 0, 10, None))
        plan = "\n".join(row["QUERY PLAN"] for row in await cursor.fetchall())
    assert "Bitmap Index Scan on users_name_folded_trgm" in plan, plan
    assert "Bitmap Index Scan on users_phone_number_trgm" in plan, plan
    assert await repo.search("LOVELACE", offset=0, limit=10, after_id=None) == ([ada], 1)
    assert (await repo.search("5550000123", offset=0, limit=10, after_id=None))[1] == 1


async def test_names_no_user_has_leave_the_search_counts(pg_database) -> None:
    repo = PostgresUserRepo(pg_database)
    ada, _ = await repo.get_or_create("+14155550123", name="Ada", role=Role.USER)
    await repo.update(ada.id, name="Grace")
    async with pg_database.connection() as conn:
        cursor = await conn.execute("SELECT name_folded, sum(users) FROM user_names GROUP BY 1")
        assert [tuple(row.values()) for row in await cursor.fetchall()] == [("grace", 1)]


async def test_sessions_keep_their_tokens_across_migration_0005(fresh_dsn) -> None:
    """Sessions opened before 0005 (the current token in refresh_tokens) still rotate, and a
    token they rotated away from is still recognised as reused. A session without a current
    token (none should exist) keeps living, with a stored value no token's hash can equal."""
    before = migration_files("postgres")[: VERSIONS.index("0005_current_token_in_sessions")]
    db = PostgresDatabase(fresh_dsn, migrate=False)
    try:
        async with db.connection() as conn:
            await apply_postgres(conn, before)
            await conn.execute(
                "INSERT INTO users (phone_number, name, name_folded, role, created_at, updated_at)"
                " VALUES ('+14155550123', '', '', 'user', now(), now())"
            )
            for session, current, rotated in [("s1", b"t1", b"t0"), ("s2", b"u1", b"u0")]:
                await conn.execute(
                    "INSERT INTO sessions (id, user_id, created_at, expires_at)"
                    " VALUES (%s, 1, now(), now() + interval '1 day')",
                    (session,),
                )
                await conn.execute(
                    "INSERT INTO refresh_tokens (token_hash, session_id, current)"
                    " VALUES (%s, %s, true), (%s, %s, false)",
                    (current, session, rotated, session),
                )
            await conn.execute(
                "INSERT INTO sessions (id, user_id, created_at, expires_at)"
                " VALUES ('s3', 1, now(), now() + interval '1 day')"
            )
        assert await db.migrate() == VERSIONS[len(before) :]
        sessions = PostgresSessionStore(db)
        now = datetime.now(UTC)
        for token in (b"t0", b"t1"):
            found = await sessions.find(token)
            assert found is not None and found.id == "s1"
        rotated = await sessions.rotate(b"t1", b"t2", now=now, expires_at=now + timedelta(days=1))
        assert rotated.outcome is RotationOutcome.ROTATED
        reused = await sessions.rotate(b"u0", b"u2", now=now, expires_at=now + timedelta(days=1))
        assert reused.outcome is RotationOutcome.REUSED
        assert reused.session is not None and reused.session.id == "s2"
        tokenless = await sessions.get("s3")
        assert tokenless is not None and not tokenless.revoked
        async with db.connection() as conn:
            cursor = await conn.execute("SELECT length(token_hash) AS n FROM sessions WHERE id = 's3'")
            assert await cursor.fetchone() != {"n": 32}  # the length of every token's hash
    finally:
        await db.close()
