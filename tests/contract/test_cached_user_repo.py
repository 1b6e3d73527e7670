"""CachedUserRepo beyond the UserRepo contract: what it serves from where, and how stale.

Two CachedUserRepo on one Redis keyspace stand for two server processes; each has a database
repo of its own on one SQLite file, wrapped to count (and, when asked, hold) its reads, and an
invalidation subscription of its own. Another process may serve its L1 entry until the
invalidation message reaches it: the tests wait for that (within ``DELIVERY_BOUND``) and measure
it, and never accept a stale read after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from otpcore.adapters.cache import CachedUserRepo
from otpcore.adapters.memory import MemoryCounters
from otpcore.adapters.redis import RedisKeyspace
from otpcore.adapters.sqlite import SqliteDatabase, SqliteUserRepo
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.model import Role, User
from tests.backends.redis import RedisServer, delete_prefixed, free_port, new_prefix
from tests.fakes import FakeClock
from tests.faults import CuttableProxy

PHONE = "+14155550123"
# Generous: an invalidation takes well under a millisecond on one host.
DELIVERY_BOUND = 2.0


class CountingRepo(SqliteUserRepo):
    """A real SQLite repo that counts its reads; ``hold`` parks a read after it has read.

    ``before_update`` and ``after_update``, when set, park an update on either side of its write.
    """

    def __init__(self, db: SqliteDatabase) -> None:
        super().__init__(db)
        self.reads = 0
        self.hold: asyncio.Event | None = None
        self.before_update: asyncio.Event | None = None
        self.after_update: asyncio.Event | None = None
        self.updating = asyncio.Event()

    async def update(self, user_id: int, **changes: Any) -> User | None:
        self.updating.set()
        if self.before_update is not None:
            await self.before_update.wait()
        user = await super().update(user_id, **changes)
        if self.after_update is not None:
            await self.after_update.wait()
        return user

    async def get(self, user_id: int) -> User | None:
        self.reads += 1
        user = await super().get(user_id)
        if self.hold is not None:
            await self.hold.wait()
        return user

    async def get_by_phone(self, phone: str) -> User | None:
        self.reads += 1
        return await super().get_by_phone(phone)


class Process:
    """One simulated server process: its database repo, its cache, its counters."""

    def __init__(
        self, db: SqliteDatabase, keyspace: RedisKeyspace | None, clock: FakeClock, **options: float
    ) -> None:
        self.db = CountingRepo(db)
        self.counters = MemoryCounters()
        self.cache = CachedUserRepo(
            self.db, keyspace=keyspace, counters=self.counters, clock=clock, **options
        )

    def count(self, layer: str, result: str) -> int:
        return self.counters.total("user_cache", layer=layer, result=result)


@pytest.fixture
def cache_clock() -> FakeClock:
    return FakeClock(now=1000.0)


@pytest.fixture
async def processes(sqlite_db, redis_keyspace, cache_clock) -> AsyncIterator[tuple[Process, Process]]:
    a, b = (Process(sqlite_db, redis_keyspace, cache_clock) for _ in range(2))
    await until_live(a.cache, b.cache)
    yield a, b
    await a.cache.aclose()
    await b.cache.aclose()


async def until_live(*caches: CachedUserRepo) -> None:
    """Until each cache's invalidation subscription is confirmed (L1 is trusted from then on)."""
    for cache in caches:
        assert cache.invalidations is not None
        cache.invalidations.start()
    await wait_for(lambda: all(c.invalidations is not None and c.invalidations.live for c in caches))


class Arrivals:
    """When each invalidation reached a process's listener (perf_counter seconds, payload)."""

    def __init__(self, cache: CachedUserRepo) -> None:
        assert cache.invalidations is not None
        self.seen: list[tuple[float, bytes]] = []
        cache.invalidations.watch(
            cache.channel, lambda data: self.seen.append((time.perf_counter(), data)), lambda: None
        )


async def new_user(process: Process, phone: str = PHONE) -> User:
    user, _ = await process.cache.get_or_create(phone, name="Ada", role=Role.USER)
    return user


async def test_a_second_read_is_an_l1_hit_that_leaves_the_database_alone(processes) -> None:
    a, _ = processes
    user = await new_user(a)

    assert await a.cache.get(user.id) == user
    assert (a.count("l1", "miss"), a.count("l2", "miss"), a.db.reads) == (1, 1, 1)
    for _ in range(5):
        assert await a.cache.get(user.id) == user
    assert (a.count("l1", "hit"), a.db.reads) == (5, 1)


async def test_another_process_fills_its_l1_from_l2(processes) -> None:
    a, b = processes
    user = await new_user(a)
    await a.cache.get(user.id)

    assert await b.cache.get(user.id) == user
    assert await b.cache.get(user.id) == user
    assert (b.count("l1", "miss"), b.count("l2", "hit"), b.count("l1", "hit")) == (1, 1, 1)
    assert b.db.reads == 0


async def test_by_phone_reads_are_cached_too(processes) -> None:
    a, b = processes
    user = await new_user(a)
    assert await a.cache.get_by_phone(PHONE) == user
    assert await a.cache.get_by_phone(PHONE) == user
    assert await b.cache.get_by_phone(PHONE) == user  # mapping and user both from L2
    assert await b.cache.get_by_phone(PHONE) == user
    assert (a.db.reads, b.db.reads) == (2, 0)  # the phone once, then the user by id once
    assert await a.cache.get_by_phone("+14155550999") is None  # misses are not cached


async def test_an_update_through_one_process_is_read_through_the_other_once_its_message_arrives(
    processes, record_property
) -> None:
    a, b = processes
    user = await new_user(a)
    arrivals = Arrivals(b.cache)
    first_message, fresh_after_response = [], []
    for i in range(20):
        before = await a.cache.get(user.id)
        assert await b.cache.get(user.id) == before
        assert a.cache.holds(user.id) and b.cache.holds(user.id)
        arrivals.seen.clear()

        called = time.perf_counter()
        # Renames, and deactivates every other round: both must reach the other process.
        updated = await a.cache.update(user.id, name=f"name {i}", is_active=i % 2 == 1)
        returned = time.perf_counter()

        assert updated is not None and (updated.name, updated.is_active) == (f"name {i}", i % 2 == 1)
        assert not a.cache.holds(user.id)  # dropped before update returned
        # B serves its old entry at most until the invalidation reaches it, then never again.
        stale = 0
        while (got := await b.cache.get(user.id)) != updated:
            assert got == before, got
            stale += 1
            assert time.perf_counter() - returned < DELIVERY_BOUND, f"round {i}: no invalidation"
            await asyncio.sleep(0.0002)
        fresh_after_response.append(time.perf_counter() - returned if stale else 0.0)
        assert await a.cache.get(user.id) == updated  # the writer reads its write at once
        assert arrivals.seen, "the read was fresh, so the message had arrived"
        first_message.append(arrivals.seen[0][0] - called)
        for _ in range(3):
            assert await b.cache.get(user.id) == updated
            assert await b.cache.get_by_phone(PHONE) == updated
            assert await a.cache.get(user.id) == updated

    report = (
        f"user invalidation: first message at the other process {_ms(first_message)} after the"
        f" update began; other process fresh {_ms(fresh_after_response)} after its response"
    )
    print(report)
    record_property("user_invalidation_delay", report)


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    return f"median {ordered[len(ordered) // 2] * 1e3:.3f} ms, max {ordered[-1] * 1e3:.3f} ms"


async def test_the_published_invalidation_empties_the_other_l1(processes) -> None:
    a, b = processes
    user = await new_user(a)
    await b.cache.get(user.id)
    await b.cache.get(user.id)
    assert b.cache.holds(user.id)

    await a.cache.update(user.id, name="Grace")

    await wait_for(lambda: not b.cache.holds(user.id))


async def test_a_read_racing_a_write_does_not_cache_what_it_read_before_the_write(processes) -> None:
    a, b = processes
    user = await new_user(a)
    b.db.hold = asyncio.Event()
    racing = asyncio.create_task(b.cache.get(user.id))
    while b.db.reads == 0:
        await asyncio.sleep(0.001)

    updated = await a.cache.update(user.id, name="Grace")  # while B holds the old row
    b.db.hold.set()
    b.db.hold = None

    assert (await racing) == user  # overlapped the write: either answer was allowed
    assert (await b.cache.get(user.id)) == updated
    assert (await a.cache.get(user.id)) == updated


async def test_a_write_whose_invalidation_failed_leaves_nothing_stale(
    sqlite_db, redis_keyspace, cache_clock
) -> None:
    proxy = CuttableProxy("127.0.0.1", redis_keyspace.client.connection_pool.connection_kwargs["port"])
    cut_keyspace = RedisKeyspace.from_url(
        f"redis://127.0.0.1:{proxy.port}/0", cluster=False, prefix=redis_keyspace.prefix, timeout=0.5
    )
    a, b = Process(sqlite_db, cut_keyspace, cache_clock), Process(sqlite_db, redis_keyspace, cache_clock)
    try:
        user = await new_user(b)
        a.db.before_update, a.db.after_update = asyncio.Event(), asyncio.Event()
        await until_live(b.cache)
        await b.cache.get(user.id)
        assert b.cache.holds(user.id)
        writing = asyncio.create_task(a.cache.update(user.id, name="Grace"))
        await a.db.updating.wait()

        # The write has begun (and published), the database is not written yet: B drops its
        # entry when the message arrives, then reads the old row and must not cache it, or it
        # would outlive the write.
        await wait_for(lambda: not b.cache.holds(user.id), timeout=DELIVERY_BOUND)
        assert await b.cache.get(user.id) == user
        assert not b.cache.holds(user.id)
        a.db.before_update.set()
        proxy.cut()  # the last step (new version, publish) cannot reach Redis
        a.db.after_update.set()
        updated = await writing

        assert updated is not None and updated.name == "Grace"
        assert await b.cache.get(user.id) == updated
        assert await b.cache.get(user.id) == updated
    finally:
        await a.cache.aclose()
        await b.cache.aclose()
        await cut_keyspace.aclose()
        proxy.close()


async def test_l1_entries_expire_after_l1_ttl(sqlite_db, cache_clock) -> None:
    local = Process(sqlite_db, None, cache_clock, l1_ttl=5.0)
    user = await new_user(local)
    await local.cache.get(user.id)
    cache_clock.advance(4.9)
    await local.cache.get(user.id)
    assert local.db.reads == 1
    cache_clock.advance(0.2)
    await local.cache.get(user.id)
    assert local.db.reads == 2
    assert (local.count("l1", "hit"), local.count("l1", "miss")) == (1, 2)


async def test_an_expired_l1_entry_is_refilled_from_l2(processes, cache_clock) -> None:
    a, _ = processes
    user = await new_user(a)
    await a.cache.get(user.id)
    cache_clock.advance(5.1)
    assert await a.cache.get(user.id) == user
    assert (a.count("l2", "hit"), a.db.reads) == (1, 1)


async def test_l1_keeps_the_most_recently_used_entries(sqlite_db, cache_clock) -> None:
    local = Process(sqlite_db, None, cache_clock, l1_size=2)
    users = [await new_user(local, f"+1415555000{i}") for i in range(3)]
    await local.cache.get(users[0].id)
    await local.cache.get(users[1].id)
    await local.cache.get(users[0].id)  # now the most recent
    await local.cache.get(users[2].id)
    assert [local.cache.holds(u.id) for u in users] == [True, False, True]


async def test_without_redis_a_write_drops_the_local_entry(sqlite_db, cache_clock) -> None:
    local = Process(sqlite_db, None, cache_clock)
    user = await new_user(local)
    await local.cache.get(user.id)
    updated = await local.cache.update(user.id, name="Grace")
    assert await local.cache.get(user.id) == updated


async def test_redis_down_reads_come_from_the_database_and_writes_are_refused(sqlite_db, cache_clock) -> None:
    dead = RedisKeyspace.from_url(f"redis://127.0.0.1:{free_port()}/0", cluster=False, timeout=0.5)
    process = Process(sqlite_db, dead, cache_clock)
    try:
        user = await new_user(process)
        assert await process.cache.get(user.id) == user
        assert await process.cache.get_by_phone(PHONE) == user
        assert process.count("l2", "error") >= 1
        assert process.db.reads >= 2

        with pytest.raises(ServiceUnavailable):
            await process.cache.update(user.id, name="Grace")
        assert await process.db.get(user.id) == user  # refused before the database changed
    finally:
        await process.cache.aclose()
        await dead.aclose()


async def test_the_listener_resubscribes_after_a_redis_restart(sqlite_db, cache_clock, tmp_path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    keyspace = RedisKeyspace.from_url(server.url, cluster=False, prefix=new_prefix(), timeout=0.5)
    process = Process(sqlite_db, keyspace, cache_clock)
    try:
        user = await new_user(process)
        await process.cache.get(user.id)
        server.stop()
        server.start()

        async def invalidated_by_message() -> bool:
            # Warm L1, then publish a bare invalidation (no version change): only the listener
            # can drop the entry.
            if await process.cache.get(user.id) is None or not process.cache.holds(user.id):
                return False
            await keyspace.client.publish(process.cache.channel, str(user.id))
            await asyncio.sleep(0.05)
            return not process.cache.holds(user.id)

        await wait_for_async(invalidated_by_message, timeout=10)
    finally:
        await process.cache.aclose()
        await delete_prefixed(keyspace)
        await keyspace.aclose()
        server.stop()


async def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def wait_for_async(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await condition():
                return
        except ServiceUnavailable:
            pass
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)
