"""One fixture per port, parametrized by adapter: each contract test runs against all of them.

A new adapter joins by adding its name to the fixture's params and a branch that builds it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from otpcore.adapters.memory import (
    MemoryCodeStore,
    MemoryEventBus,
    MemoryRateLimiter,
    MemorySessionStore,
    MemoryUserRepo,
)
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


@pytest.fixture(params=["memory", "sqlite"])
def user_repo(request, clock):
    if request.param == "memory":
        return MemoryUserRepo(clock=clock)
    return SqliteUserRepo(request.getfixturevalue("sqlite_db"), clock=clock)


@pytest.fixture(params=["memory", "sqlite"])
def session_store(request):
    if request.param == "memory":
        return MemorySessionStore()
    return SqliteSessionStore(request.getfixturevalue("sqlite_db"))


@pytest.fixture
async def user_id(session_store) -> int:
    """A user sessions may belong to: stores with foreign keys need a real one."""
    if isinstance(session_store, SqliteSessionStore):
        user, _ = await SqliteUserRepo(session_store.db).get_or_create(
            "+15555550100", name="", role=Role.USER
        )
        return user.id
    return 1


@pytest.fixture(params=["memory"])
def code_store(request, clock):
    return MemoryCodeStore(clock=clock)


@pytest.fixture(params=["memory"])
def rate_limiter(request, clock):
    return MemoryRateLimiter(clock=clock)


@pytest.fixture(params=["memory"])
def event_bus_and_reader(request):
    """An EventBus and a way to read back what it holds, oldest first."""
    bus = MemoryEventBus(max_events=50)

    async def read() -> list[Event]:
        return list(bus.events)

    return bus, read
