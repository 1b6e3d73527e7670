"""The session cache: token checks without the database or Redis, revocations seen everywhere.

Two CachedSessionStore on one Redis keyspace stand for two server processes, each with an
invalidation subscription of its own. The other process may honour a revoked session until the
revocation message reaches it: the tests wait for that (within ``DELIVERY_BOUND``), measure it,
and never accept the session after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
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
# Generous: a revocation message takes well under a millisecond on one host.
DELIVERY_BOUND = 2.0


class CountingStore(SqliteSessionStore):
    """A real SQLite store that counts the lookups reaching it; ``hold`` parks a revocation."""

    gets = 0
    hold: asyncio.Event | None = None

    async def get(self, session_id: str):  # type: ignore[override]
        self.gets += 1
        return await super().get(session_id)

    async def revoke(self, session_id: str) -> bool:
        if self.hold is not None:
            await self.hold.wait()
        return await super().revoke(session_id)


@pytest.fixture
async def user(sqlite_db) -> int:
    user, _ = await SqliteUserRepo(sqlite_db).get_or_create("+14155550123", name="", role=Role.USER)
    return user.id


@pytest.fixture
async def processes(
    sqlite_db, redis_keyspace
) -> AsyncIterator[tuple[CachedSessionStore, CachedSessionStore]]:
    """Two stores whose invalidation subscriptions are live (their L1 is trusted)."""
    a, b = (
        CachedSessionStore(CountingStore(sqlite_db), keyspace=redis_keyspace, revoked_ttl=60) for _ in "ab"
    )
    for store in (a, b):
        assert store.invalidations is not None
        store.invalidations.start()
    deadline = time.monotonic() + 5
    while not all(store.invalidations.live for store in (a, b)):  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no subscription"
        await asyncio.sleep(0.01)
    yield a, b
    await a.aclose()
    await b.aclose()


async def revoked_in(store: CachedSessionStore, session_id: str, since: float) -> float:
    """Seconds after ``since`` until ``store`` refuses the session (0 if at once), then never again."""
    stale = 0
    while not (await store.get(session_id)).revoked:  # type: ignore[union-attr]
        stale += 1
        assert time.perf_counter() - since < DELIVERY_BOUND, "the revocation never arrived"
        await asyncio.sleep(0.0002)
    delay = time.perf_counter() - since if stale else 0.0
    for _ in range(3):
        assert (await store.get(session_id)).revoked  # type: ignore[union-attr]
    return delay


async def test_cached_reads_do_not_reach_the_database(processes, user) -> None:
    a, _ = processes
    await a.create("s1", user, b"h" * 32, now=NOW, expires_at=LATER)
    for _ in range(10):
        session = await a.get("s1")
        assert session is not None and not session.revoked
    assert a.inner.gets == 1  # type: ignore[attr-defined]


async def test_a_revocation_through_one_process_holds_at_once_in_the_other(
    processes, user, record_property
) -> None:
    """ "At once": as soon as the revocation message arrives, which the test measures."""
    a, b = processes
    assert a.invalidations is not None
    arrivals: list[float] = []
    a.invalidations.watch(a.channel, lambda _: arrivals.append(time.perf_counter()), lambda: None)
    delays, messages = [], []
    for i in range(20):
        sid = f"s{i}"
        await a.create(sid, user, bytes([i]) * 32, now=NOW, expires_at=LATER)
        assert not (await a.get(sid)).revoked  # type: ignore[union-attr]
        assert not (await b.get(sid)).revoked  # type: ignore[union-attr]
        assert a.holds(sid) and b.holds(sid)

        arrivals.clear()
        called = time.perf_counter()
        assert await b.revoke(sid)
        returned = time.perf_counter()

        delays.append(await revoked_in(a, sid, returned))
        messages.append(arrivals[0] - called)
        assert (await b.get(sid)).revoked  # type: ignore[union-attr]  # the revoker, at once
    report = (
        f"session revocation: message at the other process {_ms(messages)} after the revocation"
        f" began; other process refuses the session {_ms(delays)} after its response"
    )
    print(report)
    record_property("session_revocation_delay", report)


async def test_reuse_detected_in_one_process_revokes_everywhere(processes, user) -> None:
    a, b = processes
    await a.create("s1", user, b"1" * 32, now=NOW, expires_at=LATER)
    assert not (await a.get("s1")).revoked  # type: ignore[union-attr]
    rotated = await b.rotate(b"1" * 32, b"2" * 32, now=NOW, expires_at=LATER)
    assert rotated.outcome is RotationOutcome.ROTATED
    reused = await b.rotate(b"1" * 32, b"3" * 32, now=NOW, expires_at=LATER)
    assert reused.outcome is RotationOutcome.REUSED
    await revoked_in(a, "s1", time.perf_counter())
    assert (await b.get("s1")).revoked  # type: ignore[union-attr]


async def test_a_read_while_a_revocation_is_under_way_is_not_cached(processes, user) -> None:
    # The marker is set and published before the database changes: a process that reads the
    # session from the database in between must not keep the unrevoked row in L1.
    a, b = processes
    await a.create("s1", user, b"h" * 32, now=NOW, expires_at=LATER)
    b.inner.hold = asyncio.Event()  # type: ignore[attr-defined]
    revoking = asyncio.create_task(b.revoke("s1"))
    deadline = time.monotonic() + DELIVERY_BOUND
    while not (await a.get("s1")).revoked:  # type: ignore[union-attr]  # the marker says so
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)
    assert not (await a.inner.get("s1")).revoked  # type: ignore[union-attr]  # database not yet
    assert not a.holds("s1")
    b.inner.hold.set()  # type: ignore[attr-defined]
    assert await revoking
    assert (await a.get("s1")).revoked  # type: ignore[union-attr]


async def test_redis_down_reads_fall_back_and_revocations_are_refused(sqlite_db, user) -> None:
    dead = RedisKeyspace.from_url("redis://127.0.0.1:1/0", cluster=False, prefix="otptest-dead", timeout=0.5)
    store = CachedSessionStore(CountingStore(sqlite_db), keyspace=dead, revoked_ttl=60)
    try:
        await store.create("s1", user, b"h" * 32, now=NOW, expires_at=LATER)
        assert await store.get("s1") is not None
        assert await store.get("s1") is not None  # nothing vouched for it: not cached
        assert store.inner.gets == 2  # type: ignore[attr-defined]
        assert not store.holds("s1")
        with pytest.raises(ServiceUnavailable):
            await store.revoke("s1")
        assert not (await store.inner.get("s1")).revoked  # type: ignore[union-attr]
    finally:
        await store.aclose()
        await dead.aclose()


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    return f"median {ordered[len(ordered) // 2] * 1e3:.3f} ms, max {ordered[-1] * 1e3:.3f} ms"
