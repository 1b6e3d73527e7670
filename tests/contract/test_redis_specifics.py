"""What only the Redis adapters have: what they store, where, how many round trips, and outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio
import redis.exceptions

from otpcore.adapters.redis import RedisCodeStore, RedisEventBus, RedisKeyspace, RedisRateLimiter
from otpcore.domain.codes import CodePolicy
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.events import Event
from otpcore.domain.ports import CodeOutcome, Limit
from tests.backends.redis import RedisServer, free_port, new_prefix

PHONE = "+14155550123"
IP = "192.0.2.1"
# Not a substring of anything else the tests store (the fake clock's times are 1700000…).
CODE = "987654"
POLICY = CodePolicy(secret=b"k" * 32, send_window=600, failures_per_window=10)


@pytest.fixture(params=["redis", "redis-cluster"])
def keyspace(request) -> RedisKeyspace:
    return request.getfixturevalue("redis_keyspace" if request.param == "redis" else "redis_cluster_keyspace")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this module's own, so nothing else's commands show in its MONITOR."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


async def _sign_in_traffic(keyspace: RedisKeyspace, clock) -> None:
    """Sends, a wrong guess, a right guess and a live code left behind, as a real sign-in makes."""
    store = RedisCodeStore(keyspace, clock=clock)
    right, wrong = POLICY.digest(PHONE, CODE), POLICY.digest(PHONE, "000000")
    budget = POLICY.failure_budget(PHONE)
    await store.issue(PHONE, right, ttl=120, max_attempts=5, send_limit=POLICY.send_limit(PHONE))
    assert (await store.check(PHONE, wrong, failure_budget=budget)).outcome is CodeOutcome.WRONG
    assert (await store.check(PHONE, right, failure_budget=budget)).outcome is CodeOutcome.ACCEPTED
    await store.issue(PHONE, right, ttl=120, max_attempts=5, send_limit=POLICY.send_limit(PHONE))
    limiter = RedisRateLimiter(keyspace, clock=clock)
    await limiter.hit([Limit(name="auth", subject=PHONE, requests=5, window=60)])


async def _stored(keyspace: RedisKeyspace) -> dict[bytes, bytes]:
    """Every key under the keyspace's prefix, with all it holds flattened into one blob."""
    client = keyspace.client
    stored: dict[bytes, bytes] = {}
    async for key in client.scan_iter(match=f"{keyspace.prefix}:*"):
        kind = (await client.type(key)).decode()
        if kind == "hash":
            parts = [x for pair in (await client.hgetall(key)).items() for x in pair]
        elif kind == "zset":
            parts = [b"%s %r" % (m, s) for m, s in await client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            parts = [v for _, fields in await client.xrange(key) for v in fields.values()]
        else:
            parts = [await client.dump(key) or b""]
        stored[key] = b"\n".join(parts)
    return stored


async def test_redis_holds_digests_never_codes(keyspace: RedisKeyspace, clock) -> None:
    await _sign_in_traffic(keyspace, clock)
    stored = await _stored(keyspace)
    assert len(stored) == 4  # the code, the send log, the failure log, the auth log
    for key, value in stored.items():
        assert CODE.encode() not in key
        assert CODE.encode() not in value, key
    # The check looked at the real values: the live code is there, as its digest.
    assert any(POLICY.digest(PHONE, CODE) in value for value in stored.values())


async def test_keys_of_one_phone_share_one_cluster_slot(redis_cluster_keyspace, clock) -> None:
    await _sign_in_traffic(redis_cluster_keyspace, clock)
    keys = list(await _stored(redis_cluster_keyspace))
    assert all(PHONE.encode() in key for key in keys)
    slots = {await redis_cluster_keyspace.client.cluster_keyslot(key) for key in keys}
    assert len(keys) == 4 and len(slots) == 1


async def _monitored(server: RedisServer, operation: Callable[[], Awaitable[object]]) -> list[str]:
    """The commands clients sent while ``operation`` ran; a script's own calls are not listed."""
    marker = f"end-{new_prefix()}"
    probe, signal = redis.asyncio.Redis.from_url(server.url), redis.asyncio.Redis.from_url(server.url)
    try:
        await signal.ping()  # connected now, so its handshake is not listed
        async with asyncio.timeout(10), probe.monitor() as monitor:
            await operation()
            await signal.echo(marker)
            sent = []
            while marker not in (command := await monitor.next_command())["command"]:
                if command["client_type"] != "lua":
                    sent.append(command["command"].split()[0].lower())
            return sent
    finally:
        await probe.aclose()
        await signal.aclose()


@pytest.fixture
async def server_keyspace(server: RedisServer) -> AsyncIterator[RedisKeyspace]:
    keyspace = RedisKeyspace.from_url(server.url, cluster=False, prefix=new_prefix())
    yield keyspace
    await keyspace.aclose()


async def test_one_round_trip_per_decision(server, server_keyspace, clock) -> None:
    store = RedisCodeStore(server_keyspace, clock=clock)
    limiter = RedisRateLimiter(server_keyspace, clock=clock)
    digest, budget = POLICY.digest(PHONE, CODE), POLICY.failure_budget(PHONE)
    limits = [
        Limit(name="auth", subject=IP, requests=20, window=60),
        Limit(name="global", subject=IP, requests=100, window=60),
    ]

    async def send() -> None:
        await store.issue(PHONE, digest, ttl=120, max_attempts=5, send_limit=POLICY.send_limit(PHONE))

    async def verify() -> None:
        await store.check(PHONE, digest, failure_budget=budget)

    async def hit() -> None:
        await limiter.hit(limits)

    for operation in (send, verify, hit):
        await operation()  # the first call loads the script (NOSCRIPT, SCRIPT LOAD)
        assert await _monitored(server, operation) == ["evalsha"], operation.__name__


def _sign_in_events(n: int) -> list[Event]:
    """The three events a sign-in publishes together, numbered ``n``."""
    return [Event(event_type="user:authenticated", data={"n": n, "i": i}) for i in range(3)]


async def _publish_together(bus: RedisEventBus, count: int) -> list[list[Event]]:
    published = [_sign_in_events(n) for n in range(count)]
    await asyncio.gather(*(bus.publish(*events) for events in published))
    return published


async def test_publishers_that_arrive_together_share_one_append(server, server_keyspace) -> None:
    bus = RedisEventBus(server_keyspace)
    await bus.publish(*_sign_in_events(-1))  # the first append loads the script

    published: list[list[Event]] = []

    async def twenty_sign_ins() -> None:
        published.extend(await _publish_together(bus, 20))

    assert await _monitored(server, twenty_sign_ins) == ["evalsha"]
    stored = [e.event_id for e in (await bus.read_all())[3:]]
    assert stored == [e.event_id for events in published for e in events]  # whole, in call order


async def test_an_append_carries_at_most_the_batch_size_and_never_splits_a_publish(
    server, server_keyspace
) -> None:
    bus = RedisEventBus(server_keyspace, batch_size=6)
    await bus.publish(*_sign_in_events(-1))
    appended: list[list[Event]] = []

    async def sign_ins() -> None:
        appended.extend(await _publish_together(bus, 10))  # 30 events: appends of 2 sign-ins (6)

    assert await _monitored(server, sign_ins) == ["evalsha"] * 5
    big = [Event(event_type="otp:verified", data={"i": i}) for i in range(9)]
    assert await _monitored(server, lambda: bus.publish(*big)) == ["evalsha"]  # 9 > 6, one append
    stored = [e.event_id for e in (await bus.read_all())[3:]]
    assert stored == [e.event_id for events in [*appended, big] for e in events]


async def test_a_failed_append_fails_each_of_its_publishers_and_the_next_one_works(server_keyspace) -> None:
    bus = RedisEventBus(server_keyspace)
    await server_keyspace.client.set(bus.stream, "not a stream")  # every XADD now fails
    results = await asyncio.gather(
        *(bus.publish(*events) for events in [_sign_in_events(n) for n in range(5)]),
        return_exceptions=True,
    )
    assert all(isinstance(r, ServiceUnavailable) for r in results), results
    assert all(isinstance(r.__cause__, redis.exceptions.ResponseError) for r in results)
    assert len({id(r) for r in results}) == 5  # each request raises an exception of its own
    await server_keyspace.client.delete(bus.stream)
    await bus.publish(*_sign_in_events(5))
    assert [e.data["n"] for e in await bus.read_all()] == [5, 5, 5]


async def test_when_an_append_fails_those_queued_behind_it_fail_with_it() -> None:
    # Connections are accepted (by the kernel) and then nothing is ever read or written.
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    keyspace = RedisKeyspace.from_url(f"redis://127.0.0.1:{port}/0", cluster=False, timeout=0.5)
    bus = RedisEventBus(keyspace, batch_size=3)
    sends: list[list[bytes]] = []
    send = bus._send

    async def counted(payloads: list[bytes]) -> None:
        sends.append(payloads)
        await send(payloads)

    bus._send = counted  # type: ignore[method-assign]
    async with silent:
        try:
            first = asyncio.create_task(bus.publish(*_sign_in_events(0)))
            await asyncio.sleep(0.1)  # its append is waiting for an answer
            queued = [asyncio.create_task(bus.publish(*_sign_in_events(n))) for n in range(1, 11)]
            results = await asyncio.wait_for(asyncio.gather(first, *queued, return_exceptions=True), 10)
        finally:
            await keyspace.aclose()
    assert all(isinstance(r, ServiceUnavailable) for r in results), results
    assert len(sends) == 1  # not ten more appends, one timeout after another


async def test_a_publisher_that_gives_up_before_its_append_is_left_out(server_keyspace) -> None:
    bus = RedisEventBus(server_keyspace)
    first = asyncio.create_task(bus.publish(*_sign_in_events(0)))
    gone = asyncio.create_task(bus.publish(*_sign_in_events(1)))
    last = asyncio.create_task(bus.publish(*_sign_in_events(2)))
    await asyncio.sleep(0)  # all three are queued; the append has not started
    gone.cancel()
    await asyncio.wait_for(asyncio.gather(first, last), timeout=10)
    assert gone.cancelled()
    assert [e.data["n"] for e in await bus.read_all()] == [0, 0, 0, 2, 2, 2]


class _HeldSends:
    """Makes a bus's appends wait until released."""

    def __init__(self, bus: RedisEventBus) -> None:
        self.started, self.release = asyncio.Event(), asyncio.Event()
        send = bus._send

        async def held(payloads: list[bytes]) -> None:
            self.started.set()
            await self.release.wait()
            await send(payloads)

        bus._send = held  # type: ignore[method-assign]


async def test_drain_returns_once_the_appends_in_flight_are_stored(server_keyspace) -> None:
    bus = RedisEventBus(server_keyspace)
    held = _HeldSends(bus)
    publishing = asyncio.create_task(bus.publish(*_sign_in_events(0)))
    await asyncio.wait_for(held.started.wait(), 10)
    draining = asyncio.create_task(bus.drain())
    await asyncio.sleep(0.05)
    assert not draining.done()  # the append is still in flight
    held.release.set()
    await asyncio.wait_for(draining, 10)
    assert publishing.done() and [e.data["n"] for e in await bus.read_all()] == [0, 0, 0]
    await bus.drain()  # nothing in flight: returns at once


async def test_closing_the_bus_tells_the_waiting_publishers_and_a_later_publish_works(
    server_keyspace,
) -> None:
    bus = RedisEventBus(server_keyspace)
    held = _HeldSends(bus)
    publishing = asyncio.create_task(bus.publish(*_sign_in_events(0)))
    await asyncio.wait_for(held.started.wait(), 10)
    await asyncio.wait_for(bus.aclose(), 10)
    with pytest.raises(ServiceUnavailable):
        await publishing
    held.release.set()
    await asyncio.wait_for(bus.publish(*_sign_in_events(1)), 10)  # a new appender starts
    assert [e.data["n"] for e in await bus.read_all()] == [1, 1, 1]


async def _fails_fast(keyspace: RedisKeyspace) -> None:
    store, limiter = RedisCodeStore(keyspace), RedisRateLimiter(keyspace)
    bus = RedisEventBus(keyspace)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.issue(PHONE, b"d", ttl=120, max_attempts=5, send_limit=POLICY.send_limit(PHONE)),
        lambda: store.check(PHONE, b"d", failure_budget=POLICY.failure_budget(PHONE)),
        lambda: limiter.hit([Limit(name="auth", subject=IP, requests=5, window=60)]),
        lambda: bus.publish(Event(event_type="otp:generated")),
        keyspace.ping,
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable) as raised:
            await call()
        assert time.monotonic() - started < 10  # a hang guard, not a benchmark
        cause = raised.value.__cause__
        assert isinstance(cause, redis.exceptions.RedisError | redis.exceptions.RedisClusterException)


@pytest.mark.parametrize("cluster", [False, True], ids=["server", "cluster"])
async def test_redis_down_is_service_unavailable(cluster: bool) -> None:
    keyspace = RedisKeyspace.from_url(f"redis://127.0.0.1:{free_port()}/0", cluster=cluster, timeout=1)
    try:
        await _fails_fast(keyspace)
    finally:
        await keyspace.aclose()


async def test_redis_that_never_answers_is_service_unavailable() -> None:
    # Connections are accepted (by the kernel) and then nothing is ever read or written.
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    keyspace = RedisKeyspace.from_url(f"redis://127.0.0.1:{port}/0", cluster=False, timeout=0.5)
    async with silent:
        try:
            await _fails_fast(keyspace)
        finally:
            await keyspace.aclose()


async def test_redis_out_of_memory_is_service_unavailable(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, None, "--maxmemory", "1", "--maxmemory-policy", "noeviction")
    server.start()
    keyspace = RedisKeyspace.from_url(server.url, cluster=False, prefix=new_prefix())
    try:
        with pytest.raises(ServiceUnavailable) as raised:
            await RedisCodeStore(keyspace).issue(PHONE, b"d", ttl=120, max_attempts=5, send_limit=None)
        assert isinstance(raised.value.__cause__, redis.exceptions.OutOfMemoryError)
    finally:
        await keyspace.aclose()
        server.stop()


async def test_recovers_by_itself_when_redis_is_back(tmp_path: Path, clock) -> None:
    server = RedisServer(tmp_path)
    server.start()
    keyspace = RedisKeyspace.from_url(server.url, cluster=False, prefix=new_prefix(), timeout=1)
    client = keyspace.client
    limiter = RedisRateLimiter(keyspace, clock=clock)
    limit = Limit(name="auth", subject=IP, requests=100, window=60)
    try:
        assert (await limiter.hit([limit]))[0].allowed
        server.stop()
        with pytest.raises(ServiceUnavailable):
            await limiter.hit([limit])

        server.start()  # the same port, empty: no data, no scripts loaded
        deadline = time.monotonic() + 15
        while True:
            try:
                [decision] = await limiter.hit([limit])
                break
            except ServiceUnavailable:
                assert time.monotonic() < deadline, "no recovery within 15 s"
                await asyncio.sleep(0.2)
        assert decision.allowed and decision.remaining == 99  # a fresh server's count
        assert keyspace.client is client
    finally:
        await keyspace.aclose()
        server.stop()
