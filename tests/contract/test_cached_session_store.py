"""The session cache: token checks without the database, revocations seen at once everywhere."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from otpcore.adapters.redis import RedisKeyspace
from otpcore.adapters.session_cache import CachedSessionStore
from otpcore.adapters.sqlite import SqliteSessionStore, SqliteUserRepo
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.model import Role
from otpcore.domain.ports import RotationOutcome

NOW = datetime(2030, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(days=30)


class CountingStore(SqliteSessionStore):
    """A real SQLite store that counts the lookups reaching it."""

    gets = 0

    async def get(self, session_id: str):  # type: ignore[override]
        self.gets += 1
        return await super().get(session_id)


@pytest.fixture
async def user(sqlite_db) -> int:
    user, _ = await SqliteUserRepo(sqlite_db).get_or_create("+14155550123", name="", role=Role.USER)
    return user.id


def two_processes(sqlite_db, keyspace: RedisKeyspace) -> tuple[CachedSessionStore, CachedSessionStore]:
    return (
        CachedSessionStore(CountingStore(sqlite_db), keyspace=keyspace, revoked_ttl=60),
        CachedSessionStore(CountingStore(sqlite_db), keyspace=keyspace, revoked_ttl=60),
    )


async def test_cached_reads_do_not_reach_the_database(sqlite_db, redis_keyspace, user) -> None:
    a, _ = two_processes(sqlite_db, redis_keyspace)
    await a.create("s1", user, b"h" * 32, now=NOW, expires_at=LATER)
    for _ in range(10):
        session = await a.get("s1")
        assert session is not None and not session.revoked
    assert a.inner.gets == 1  # type: ignore[attr-defined]


async def test_a_revocation_through_one_process_holds_at_once_in_the_other(
    sqlite_db, redis_keyspace, user
) -> None:
    a, b = two_processes(sqlite_db, redis_keyspace)
    await a.create("s1", user, b"h" * 32, now=NOW, expires_at=LATER)
    assert not (await a.get("s1")).revoked  # type: ignore[union-attr]
    assert await b.revoke("s1")
    assert (await a.get("s1")).revoked  # type: ignore[union-attr]


async def test_reuse_detected_in_one_process_revokes_everywhere(sqlite_db, redis_keyspace, user) -> None:
    a, b = two_processes(sqlite_db, redis_keyspace)
    await a.create("s1", user, b"1" * 32, now=NOW, expires_at=LATER)
    assert not (await a.get("s1")).revoked  # type: ignore[union-attr]
    rotated = await b.rotate(b"1" * 32, b"2" * 32, now=NOW, expires_at=LATER)
    assert rotated.outcome is RotationOutcome.ROTATED
    reused = await b.rotate(b"1" * 32, b"3" * 32, now=NOW, expires_at=LATER)
    assert reused.outcome is RotationOutcome.REUSED
    assert (await a.get("s1")).revoked  # type: ignore[union-attr]


async def test_redis_down_reads_fall_back_and_revocations_are_refused(sqlite_db, user) -> None:
    dead = RedisKeyspace.from_url("redis://127.0.0.1:1/0", cluster=False, prefix="otptest-dead", timeout=0.5)
    store = CachedSessionStore(CountingStore(sqlite_db), keyspace=dead, revoked_ttl=60)
    await store.create("s1", user, b"h" * 32, now=NOW, expires_at=LATER)
    assert await store.get("s1") is not None
    assert await store.get("s1") is not None  # cached, but unverifiable: answered by the database
    assert store.inner.gets == 2  # type: ignore[attr-defined]
    with pytest.raises(ServiceUnavailable):
        await store.revoke("s1")
    assert not (await store.inner.get("s1")).revoked  # type: ignore[union-attr]
    await dead.aclose()
