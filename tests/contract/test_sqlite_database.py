"""SqliteDatabase: the one-connection, one-thread owner the SQLite adapters share."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from otpcore.adapters.sqlite import SqliteDatabase, SqliteUserRepo
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.model import Role


async def test_runs_on_one_thread_off_the_loop(tmp_path):
    db = SqliteDatabase(str(tmp_path / "db.sqlite3"))
    try:
        threads = {await db.run(lambda conn: threading.get_ident()) for _ in range(3)}
        assert len(threads) == 1
        assert threads != {threading.get_ident()}
    finally:
        await db.close()


async def test_connection_settings(tmp_path):
    db = SqliteDatabase(str(tmp_path / "db.sqlite3"))
    try:

        def settings(conn: sqlite3.Connection):
            return (
                conn.execute("PRAGMA journal_mode").fetchone()[0],
                conn.execute("PRAGMA foreign_keys").fetchone()[0],
                conn.execute("PRAGMA busy_timeout").fetchone()[0],
                conn.execute("SELECT casefold('ÉLODIE Straße')").fetchone()[0],
                conn.in_transaction,
            )

        assert await db.run(settings) == ("wal", 1, 5000, "élodie strasse", False)
    finally:
        await db.close()


async def test_migrates_on_first_use_unless_told_not_to(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    bare = SqliteDatabase(path, migrate=False)
    try:
        with pytest.raises(ServiceUnavailable) as info:
            await SqliteUserRepo(bare).get(1)  # no users table yet
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert await bare.migrate() != []
        assert await SqliteUserRepo(bare).get(1) is None
    finally:
        await bare.close()

    db = SqliteDatabase(path)
    try:
        assert await db.migrate() == []  # the first call already found nothing pending
    finally:
        await db.close()


async def test_data_survives_reopening(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    db = SqliteDatabase(path)
    user, _ = await SqliteUserRepo(db).get_or_create("+14155550123", name="Ada", role=Role.USER)
    await db.close()
    db = SqliteDatabase(path)
    try:
        assert await SqliteUserRepo(db).get(user.id) == user
    finally:
        await db.close()


async def test_unopenable_database_is_unavailable(tmp_path):
    db = SqliteDatabase(str(tmp_path / "missing-dir" / "db.sqlite3"))
    try:
        with pytest.raises(ServiceUnavailable):
            await db.ping()
    finally:
        await db.close()


async def test_closed_database_is_unavailable(tmp_path):
    db = SqliteDatabase(str(tmp_path / "db.sqlite3"))
    await db.ping()
    await db.close()
    await db.close()  # idempotent
    with pytest.raises(ServiceUnavailable):
        await db.ping()
