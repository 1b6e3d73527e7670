"""One fixture per port, parametrized by adapter: each contract test runs against all of them.

A new adapter joins by adding its name to the fixture's params and a branch that builds it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from otpcore.adapters.cache import CachedUserRepo
from otpcore.adapters.memory import (
    MemoryCodeStore,
    MemoryEventBus,
    MemoryRateLimiter,
    MemorySessionStore,
    MemoryUserRepo,
)
from otpcore.adapters.postgres import PostgresSessionStore, PostgresUserRepo
from otpcore.adapters.redis import RedisCodeStore, RedisEventBus, RedisRateLimiter
from otpcore.adapters.session_cache import CachedSessionStore
from otpcore.adapters.sqlite import SqliteDatabase, SqliteSessionStore, SqliteUserRepo
from otpcore.domain.events import Event
from otpcore.domain.model import Role
from tests.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sqlite_db(tmp_path) -> AsyncIterator[SqliteDatabase]:
    db = SqliteDatabase(str(tmp_path / "otp.sqlite3"))
    yield db
    await db.close()


@pytest.fixture(params=["memory", "sqlite", "postgres", "cached"])
def user_repo(request, clock):
    if request.param == "memory":
        return MemoryUserRepo(clock=clock)
    if request.param == "postgres":
        return PostgresUserRepo(request.getfixturevalue("pg_database"), clock=clock)
    if request.param == "cached":
        return request.getfixturevalue("cached_user_repo")
    return SqliteUserRepo(request.getfixturevalue("sqlite_db"), clock=clock)


@pytest.fixture
async def cached_user_repo(sqlite_db, redis_keyspace, clock) -> AsyncIterator[CachedUserRepo]:
    """SQLite behind both cache layers, L2 on a Redis key prefix of the test's own."""
    cached = CachedUserRepo(SqliteUserRepo(sqlite_db, clock=clock), keyspace=redis_keyspace)
    yield cached
    await cached.aclose()


@pytest.fixture(params=["memory", "sqlite", "postgres", "cached"])
def session_store(request):
    if request.param == "memory":
        return MemorySessionStore()
    if request.param == "postgres":
        return PostgresSessionStore(request.getfixturevalue("pg_database"))
    if request.param == "cached":
        return request.getfixturevalue("cached_session_store")
    return SqliteSessionStore(request.getfixturevalue("sqlite_db"))


@pytest.fixture
async def cached_session_store(sqlite_db, redis_keyspace) -> AsyncIterator[CachedSessionStore]:
    """SQLite behind the per-process cache, revocations marked on the test's Redis prefix."""
    cached = CachedSessionStore(SqliteSessionStore(sqlite_db), keyspace=redis_keyspace, revoked_ttl=60)
    yield cached
    await cached.aclose()


@pytest.fixture
async def user_id(session_store) -> int:
    """A user sessions may belong to: stores with foreign keys need a real one."""
    if isinstance(session_store, CachedSessionStore):
        session_store = session_store.inner
    if isinstance(session_store, SqliteSessionStore):
        repo: SqliteUserRepo | PostgresUserRepo = SqliteUserRepo(session_store.db)
    elif isinstance(session_store, PostgresSessionStore):
        repo = PostgresUserRepo(session_store.db)
    else:
        return 1
    user, _ = await repo.get_or_create("+15555550100", name="", role=Role.USER)
    return user.id


# Redis-backed fixtures get a client on a key prefix of their own ("redis": one server;
# "redis-cluster": a three-master cluster started for the test session).
REDIS_PARAMS = ["memory", "redis", "redis-cluster"]


@pytest.fixture(params=REDIS_PARAMS)
def limiter_and_code_store(request, clock):
    """A rate limiter and a code store deciding admission limits on the limiter's logs."""
    if request.param == "memory":
        limiter = MemoryRateLimiter(clock=clock)
        return limiter, MemoryCodeStore(clock=clock, limiter=limiter)
    keyspace = request.getfixturevalue(_redis_fixture(request.param))
    return RedisRateLimiter(keyspace, clock=clock), RedisCodeStore(keyspace, clock=clock)


@pytest.fixture
def code_store(limiter_and_code_store):
    return limiter_and_code_store[1]


@pytest.fixture
def rate_limiter(limiter_and_code_store):
    return limiter_and_code_store[0]


def _redis_fixture(param: str) -> str:
    return "redis_keyspace" if param == "redis" else "redis_cluster_keyspace"


@pytest.fixture(params=REDIS_PARAMS)
def event_bus_and_reader(request):
    """An EventBus and a way to read back what it holds, oldest first."""
    if request.param != "memory":
        keyspace = request.getfixturevalue(_redis_fixture(request.param))
        redis_bus = RedisEventBus(keyspace, stream="events", max_len=50)
        return redis_bus, redis_bus.read_all
    bus = MemoryEventBus(max_events=50)

    async def read() -> list[Event]:
        return list(bus.events)

    return bus, read
