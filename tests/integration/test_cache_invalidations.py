"""The user and session caches of one process on one invalidation subscription, on a Redis of
their own, so that every command reaching that server is theirs and can be counted
(``INFO commandstats``): a cached read with the subscription live costs no Redis command; a cut
subscription empties L1 and sends reads down the strict path until it is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from otpcore import Settings, build_core
from otpcore.adapters.cache import CachedUserRepo, DropLog, Invalidations
from otpcore.adapters.memory import MemoryCodeSender
from otpcore.adapters.redis import RedisKeyspace
from otpcore.adapters.session_cache import CachedSessionStore
from otpcore.adapters.sqlite import SqliteDatabase, SqliteSessionStore, SqliteUserRepo
from otpcore.domain.model import Role, User
from otpcore.domain.ports import Session
from tests.backends.redis import RedisServer, new_prefix

NOW = datetime.now(UTC)
LATER = NOW + timedelta(days=1)
# Commands that are not reads: the listener's (re)subscription and heartbeat, the test's own.
NOT_READS = {"info", "ping", "subscribe", "client", "hello", "config"}


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def reads_reaching(server: RedisServer) -> Callable[[], dict[str, int]]:
    """A counter of the commands (other than NOT_READS) the server ran since it was made."""
    with server.client() as client:
        client.config_resetstat()

    def since() -> dict[str, int]:
        with server.client() as client:
            stats = client.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in stats.items()}
        # Redis 7 names subcommands "config|resetstat", "client|setinfo", ...
        return {name: n for name, n in calls.items() if name.split("|")[0] not in NOT_READS}

    return since


@dataclass
class Stack:
    """What one server process holds: a keyspace, one subscription, both caches on it."""

    keyspace: RedisKeyspace
    invalidations: Invalidations
    users: CachedUserRepo
    sessions: CachedSessionStore
    user: User
    session: Session

    async def read(self) -> None:
        """What an authenticated request reads: its session, then its user."""
        session = await self.sessions.get(self.session.id)
        assert session is not None and not session.revoked
        assert await self.users.get(self.user.id) == self.user


async def build_stack(server: RedisServer, tmp_path: Path, **options: float) -> Stack:
    keyspace = RedisKeyspace.from_url(server.url, cluster=False, prefix=new_prefix(), timeout=0.5)
    invalidations = Invalidations(keyspace, **options)  # type: ignore[arg-type]
    db = SqliteDatabase(str(tmp_path / "otp.sqlite3"))
    users = CachedUserRepo(SqliteUserRepo(db), keyspace=keyspace, invalidations=invalidations)
    sessions = CachedSessionStore(
        SqliteSessionStore(db), keyspace=keyspace, invalidations=invalidations, revoked_ttl=60
    )
    user, _ = await users.get_or_create("+14155550123", name="Ada", role=Role.USER)
    session = await sessions.create("s1", user.id, b"h" * 32, now=NOW, expires_at=LATER)
    return Stack(keyspace, invalidations, users, sessions, user, session)


@pytest.fixture
async def stack(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Stack]:
    built = await build_stack(redis_server, tmp_path, backoff=(0.5, 0.5))
    yield built
    await built.invalidations.aclose()
    await built.keyspace.aclose()


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


async def test_cached_reads_with_the_subscription_live_make_no_redis_command(stack, redis_server) -> None:
    stack.invalidations.start()
    await wait_for(lambda: stack.invalidations.live)
    await stack.read()  # fills both L1s (misses do reach Redis)
    assert stack.users.holds(stack.user.id) and stack.sessions.holds("s1")

    reads = reads_reaching(redis_server)
    for _ in range(200):
        await stack.read()
    assert reads() == {}


async def test_a_cut_subscription_empties_l1_and_reads_are_checked_until_it_is_back(
    stack, redis_server
) -> None:
    stack.invalidations.start()
    await wait_for(lambda: stack.invalidations.live)
    await stack.read()
    assert stack.users.holds(stack.user.id) and stack.sessions.holds("s1")

    with redis_server.client() as admin:
        assert admin.client_kill_filter(_type="pubsub") == 1
    await wait_for(lambda: not stack.invalidations.live)
    # Emptied at once: messages may be missed from now on.
    assert not stack.users.holds(stack.user.id) and not stack.sessions.holds("s1")

    # Not live (it resubscribes after 0.5 s): every read is checked against Redis. The first
    # refills L1 (user from L2, session from the database with its marker checked); each
    # later one is an L1 entry validated by one command: the user's version script, the
    # session's EXISTS on its revocation marker. (commandstats also counts the commands the
    # scripts run: GET token, EXISTS writing marker and GET L2 entry on the refill, then GET
    # token alone.)
    reads = reads_reaching(redis_server)
    for _ in range(3):
        await stack.read()
    assert not stack.invalidations.live
    assert reads() == {"evalsha": 3, "exists": 3 + 1, "get": 3 + 1}

    # Resubscribed: L1 was emptied once more, then trusted again.
    await wait_for(lambda: stack.invalidations.live)
    assert not stack.users.holds(stack.user.id) and not stack.sessions.holds("s1")
    await stack.read()
    reads = reads_reaching(redis_server)
    for _ in range(100):
        await stack.read()
    assert reads() == {}


async def test_a_subscription_that_stops_answering_is_not_trusted(redis_server, tmp_path) -> None:
    # Paused, Redis keeps the connection open but answers nothing (no error to notice): the
    # heartbeat PING goes unanswered and the subscription is dropped after three heartbeats.
    stack = await build_stack(redis_server, tmp_path, heartbeat=0.2, backoff=(0.1, 0.1))
    try:
        stack.invalidations.start()
        await wait_for(lambda: stack.invalidations.live)
        await stack.read()
        with redis_server.client() as admin:
            admin.execute_command("CLIENT", "PAUSE", 2000, "ALL")
        paused = time.monotonic()
        await wait_for(lambda: not stack.invalidations.live, timeout=1.9)
        silence = time.monotonic() - paused
        assert not stack.users.holds(stack.user.id) and not stack.sessions.holds("s1")
        print(f"a silent subscription was given up {silence * 1e3:.0f} ms into the pause")
        await wait_for(lambda: stack.invalidations.live, timeout=10)
        await stack.read()
    finally:
        await stack.invalidations.aclose()
        await stack.keyspace.aclose()


async def test_a_served_process_shares_one_subscription_and_authenticates_without_redis(
    redis_server, tmp_path
) -> None:
    settings = Settings(
        db_provider="sqlite",
        sqlite_path=str(tmp_path / "otp.db"),
        redis_url=redis_server.url,
        otp_redis_key_prefix=new_prefix(),
        otp_sender="memory",
        jwt_secret="t" * 40,
    )
    core = build_core(settings)
    try:
        await core.migrate()
        await core.auth.send_code("+14155550123")
        await asyncio.sleep(0.05)
        sender = core.container.code_sender()
        assert isinstance(sender, MemoryCodeSender)
        result = await core.auth.verify_code("+14155550123", sender.last_code("+14155550123"))
        await core.auth.authenticate(result.access_token)
        invalidations = core.container.invalidations()
        assert invalidations is not None
        assert core.container.user_repo().invalidations is invalidations
        assert core.container.session_store().invalidations is invalidations
        await wait_for(lambda: invalidations.live)
        await core.auth.authenticate(result.access_token)  # refills after going live

        reads = reads_reaching(redis_server)
        for _ in range(100):
            principal = await core.auth.authenticate(result.access_token)
            assert principal.user.id == result.user.id
        assert reads() == {}
        with redis_server.client() as admin:
            assert len(admin.client_list(_type="pubsub")) == 1  # one listener for both caches

        await core.auth.logout(principal)
        with pytest.raises(Exception, match="revoked"):
            await core.auth.authenticate(result.access_token)
    finally:
        await core.aclose()


async def test_invalidations_reach_another_process_on_a_redis_cluster(
    redis_cluster_keyspace, tmp_path
) -> None:
    # PUBLISH from a script on one node reaches a subscriber on any node of the cluster.
    db = SqliteDatabase(str(tmp_path / "otp.sqlite3"))
    processes = []
    for _ in range(2):
        invalidations = Invalidations(redis_cluster_keyspace)
        users = CachedUserRepo(
            SqliteUserRepo(db), keyspace=redis_cluster_keyspace, invalidations=invalidations
        )
        sessions = CachedSessionStore(
            SqliteSessionStore(db),
            keyspace=redis_cluster_keyspace,
            invalidations=invalidations,
            revoked_ttl=60,
        )
        invalidations.start()
        processes.append((invalidations, users, sessions))
    (a_inv, a_users, a_sessions), (b_inv, b_users, b_sessions) = processes
    try:
        await wait_for(lambda: a_inv.live and b_inv.live)
        user, _ = await a_users.get_or_create("+14155550123", name="Ada", role=Role.USER)
        await a_sessions.create("s1", user.id, b"h" * 32, now=NOW, expires_at=LATER)
        await b_users.get(user.id)
        await b_sessions.get("s1")
        assert b_users.holds(user.id) and b_sessions.holds("s1")

        await a_users.update(user.id, name="Grace")
        await a_sessions.revoke("s1")
        await wait_for(lambda: not b_users.holds(user.id) and not b_sessions.holds("s1"), timeout=2)
        assert (await b_users.get(user.id)).name == "Grace"  # type: ignore[union-attr]
        assert (await b_sessions.get("s1")).revoked  # type: ignore[union-attr]
    finally:
        for invalidations, _, _ in processes:
            await invalidations.aclose()
        await db.close()


def test_a_read_refills_l1_unless_its_entry_was_dropped_while_it_read() -> None:
    drops: DropLog[int] = DropLog(size=2)
    since = drops.now()
    drops.drop(2)
    assert drops.untouched(1, since) and not drops.untouched(2, since)
    later = drops.now()
    assert drops.untouched(2, later)
    drops.drop(3)
    drops.drop(4)  # 2 is forgotten: a read that overlapped its drop is refused all the same
    assert not drops.untouched(1, since) and drops.untouched(1, later + 2)
    drops.reset()
    assert not drops.untouched(1, later + 2)
