"""SQL session stores delete sessions that expired more than a day ago, every so many creates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from otpcore.adapters.postgres import PostgresSessionStore, PostgresUserRepo
from otpcore.adapters.sqlite import SqliteSessionStore, SqliteUserRepo
from otpcore.domain.model import Role


@pytest.fixture(params=["sqlite", "postgres"])
def sql_stores(request):
    if request.param == "sqlite":
        db = request.getfixturevalue("sqlite_db")
        return SqliteUserRepo(db), SqliteSessionStore(db)
    db = request.getfixturevalue("pg_database")
    return PostgresUserRepo(db), PostgresSessionStore(db)


async def test_sessions_long_expired_are_swept(sql_stores) -> None:
    users, store = sql_stores
    user, _ = await users.get_or_create("+1415", name="", role=Role.USER)
    store.SWEEP_EVERY = 3
    start = datetime(2026, 5, 1, tzinfo=UTC)
    hour = timedelta(hours=1)
    await store.create("old", user.id, b"a", now=start, expires_at=start + hour)
    await store.create("recent", user.id, b"b", now=start, expires_at=start + 20 * hour)
    later = start + 26 * hour  # "old" expired 25 h ago, "recent" 6 h ago
    await store.create("new", user.id, b"c", now=later, expires_at=later + hour)

    assert await store.get("old") is None
    assert await store.find(b"a") is None  # its tokens went with it
    assert await store.get("recent") is not None
    assert await store.get("new") is not None
