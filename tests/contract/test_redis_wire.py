"""The pipelined Redis connection (``redis_wire.Wire``) against real servers, and RedisKeyspace on it.

What it promises: every caller gets its own reply however many are in flight and whoever gave up
waiting; arguments are encoded, and error replies raised, as redis-py does; a lost connection is
replaced (the command retried once) unnoticed; a server that stops answering fails its callers
with redis-py's TimeoutError within about ``timeout``; nothing listening fails at once, with one
attempt; a URL is read as redis-py reads it, AUTH and SELECT included.

The shared server (``OTP_TEST_REDIS_URL``) only gets keys under this test's own prefix and kills
of the test's own connections; flushing scripts, passwords and restarts use a throwaway server.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio
from redis import exceptions as rex
from redis.connection import Encoder, parse_url

from otpcore.adapters.redis import RedisKeyspace
from otpcore.adapters.redis_wire import Arg, CannotConnect, Wire
from otpcore.domain.errors import ServiceUnavailable
from tests.backends.redis import RedisServer, free_port, new_prefix, redis_url
from tests.faults import CuttableProxy

# Generous bound on how late a timeout may fire (the wire promises "about ``timeout``").
LATE = 1.5


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def _url_via(port: int) -> str:
    """The shared server's URL (credentials, database) with its address replaced by a local port."""
    parts = urlsplit(redis_url())
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return parts._replace(netloc=netloc).geturl()


def _keyspace(url: str, timeout: float) -> RedisKeyspace:
    """A keyspace on ``url`` whose wire is the one under test (``from_url`` makes one too)."""
    keyspace = RedisKeyspace.from_url(url, cluster=False, prefix=new_prefix(), timeout=timeout)
    assert keyspace.wire is not None
    return keyspace


async def _eventually(check: Callable[[], Awaitable[bool]], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "the condition was not reached"
        await asyncio.sleep(0.01)


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    """End what a failed test left running (a test that passed left nothing)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _Link:
    up: asyncio.Event  # client -> Redis flows while set
    down: asyncio.Event  # Redis -> client flows while set
    writers: tuple[asyncio.StreamWriter, asyncio.StreamWriter]


class StallingProxy:
    """An asyncio TCP proxy to Redis that can stop forwarding without closing anything.

    ``stall`` holds both directions of every connection, new ones included (a server that stops
    answering); ``hold_replies`` holds only the replies on the connections open now (commands
    reach Redis and run, their replies wait); ``resume`` lets everything through again.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.accepted = 0
        self._stalled = False
        self._links: list[_Link] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port: int = self._server.sockets[0].getsockname()[1]

    def stall(self) -> None:
        self._stalled = True
        for link in self._links:
            link.up.clear()
            link.down.clear()

    def hold_replies(self) -> None:
        for link in self._links:
            link.down.clear()

    def resume(self) -> None:
        self._stalled = False
        for link in self._links:
            link.up.set()
            link.down.set()

    async def close(self) -> None:
        self._server.close()
        for link in self._links:
            for writer in link.writers:
                writer.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        link = _Link(asyncio.Event(), asyncio.Event(), (writer, upstream_writer))
        if not self._stalled:
            link.up.set()
            link.down.set()
        self._links.append(link)
        for pipe in (
            self._pipe(reader, upstream_writer, link.up),
            self._pipe(upstream_reader, writer, link.down),
        ):
            task = asyncio.create_task(pipe)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, flowing: asyncio.Event) -> None:
        try:
            while data := await source.read(1 << 16):
                await flowing.wait()
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()


@pytest.fixture
async def admin() -> AsyncIterator[redis.asyncio.Redis]:
    """A redis-py client on the shared server, to look at what the wire did."""
    client = redis.asyncio.Redis.from_url(redis_url())
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(admin: redis.asyncio.Redis) -> AsyncIterator[str]:
    prefix = new_prefix()
    yield prefix
    keys = [key async for key in admin.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await admin.unlink(*keys)


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    """A wire on the shared server, not connected yet."""
    wire = Wire.from_url(redis_url(), timeout=2)
    yield wire
    await wire.aclose()


@pytest.fixture
async def proxy() -> AsyncIterator[StallingProxy]:
    proxy = StallingProxy(*_address(redis_url()))
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A throwaway redis-server of the test's own (scripts flushed, passwords set, restarts)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


# -- Pipelining: each caller gets its own reply ------------------------------------------------


async def test_every_caller_gets_its_own_reply_among_500_in_flight(
    wire: Wire, admin: redis.asyncio.Redis, prefix: str
) -> None:
    rng = random.Random(1234)
    stored = {f"{prefix}:get:{i}": f"value {i} ✓".encode() for i in range(90)}
    await admin.mset(stored)
    payloads = [
        b"",
        b"\r\n",
        b"$-1\r\n*2\r\n:1\r\n-ERR not an error\r\n+OK\r\n",  # replies, as data
        bytes(range(256)) * 3,
        b"\r\n" * 40_000,
        b"a" * 65_535,
        b"b" * 65_536,
        b"c" * 65_537,
        rng.randbytes(300_000),
    ]
    payloads += [rng.randbytes(rng.choice([1, 17, 1000, 16_384, 70_000])) for _ in range(291)]
    for attempt in (1, 2):  # the first burst also waits for the connection, the second does not
        calls: list[tuple[tuple[Arg, ...], Any]] = [
            (("INCRBY", f"{prefix}:n:{i}", i + 1), attempt * (i + 1)) for i in range(100)
        ]
        calls += [(("GET", key), value) for key, value in stored.items()]
        calls += [(("GET", f"{prefix}:missing:{i}"), None) for i in range(10)]
        calls += [(("ECHO", payload), payload) for payload in payloads]
        rng.shuffle(calls)
        assert len(calls) == 500
        replies = await asyncio.gather(*(wire.call(*args) for args, _ in calls))
        wrong = [
            i
            for i, (reply, (_, expected)) in enumerate(zip(replies, calls, strict=True))
            if reply != expected
        ]
        assert not wrong, (
            f"attempt {attempt}: {len(wrong)} callers got another's reply, e.g. {calls[wrong[0]][0][:2]}"
        )
    counters = await admin.mget([f"{prefix}:n:{i}" for i in range(100)])
    assert counters == [b"%d" % (2 * (i + 1)) for i in range(100)]  # each INCRBY ran once


async def test_a_command_goes_at_once_unless_redis_holds_ours_then_with_the_next_reply(
    wire: Wire, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis works on the first at once; those issued while it does go in one write as its reply
    # comes back, not one write (and one TCP segment each way) per command.
    await wire.call("PING")
    assert wire._protocol is not None and wire._protocol.transport is not None
    transport = wire._protocol.transport
    writes: list[bytes] = []
    write = transport.write

    def recording(data: Any) -> None:
        writes.append(bytes(data))
        write(data)

    monkeypatch.setattr(transport, "write", recording)
    echo = [b"*2\r\n$4\r\nECHO\r\n$7\r\nreply %d\r\n" % i for i in range(3)]
    calls = [asyncio.ensure_future(wire.call("ECHO", f"reply {i}")) for i in range(3)]
    await asyncio.sleep(0)  # each call has run up to its wait for the reply, and no further
    assert writes == [echo[0]]
    assert await asyncio.gather(*calls) == [b"reply 0", b"reply 1", b"reply 2"]
    assert writes == [echo[0], echo[1] + echo[2]]
    assert await wire.call("ECHO", "reply 0") == b"reply 0"  # nothing in flight: at once again
    assert writes[-1] == echo[0]


# -- Encoding and error replies -----------------------------------------------------------------


async def test_arguments_are_encoded_as_redis_py_encodes_them(
    wire: Wire, admin: redis.asyncio.Redis, prefix: str
) -> None:
    encoder = Encoder(encoding="utf-8", encoding_errors="strict", decode_responses=False)
    values: list[Arg] = [
        "héllo wörld ✓ 日本語 🚀",
        "",
        b"\x00\xff\r\n$-1\r\n*0\r\n",
        0,
        -1,
        -(2**63),
        2**64 + 1,
        -(10**40),
        0.1,
        -2.5,
        3.0,
        1e300,
        1.5e-10,
    ]
    for i, value in enumerate(values):
        key = f"{prefix}:ключ:{i}"
        assert await wire.call("SET", key, value) == b"OK"
        stored = await wire.call("GET", key)
        assert stored == encoder.encode(value), value
        assert await admin.get(key.encode()) == stored  # the non-ASCII key is the UTF-8 one
        if isinstance(value, bytes):
            assert stored == value
        elif isinstance(value, str):
            assert stored.decode() == value
        elif isinstance(value, int):
            assert int(stored) == value
        else:
            assert float(stored) == value
    assert await wire.call("INCRBY", f"{prefix}:n", -(2**62)) == -(2**62)
    assert await wire.call("INCRBYFLOAT", f"{prefix}:f", 0.1) == b"0.1"
    assert await wire.call("INCRBYFLOAT", f"{prefix}:f", -2.5) == b"-2.4"


async def test_error_replies_raise_redis_py_exceptions_and_keep_the_connection(
    wire: Wire, prefix: str
) -> None:
    connection = await wire.call("CLIENT", "ID")
    key = f"{prefix}:string"
    await wire.call("SET", key, "x")
    with pytest.raises(rex.ResponseError, match=r"^WRONGTYPE") as wrongtype:
        await wire.call("LPUSH", key, "y")
    assert type(wrongtype.value) is rex.ResponseError
    with pytest.raises(rex.NoScriptError):
        await wire.call("EVALSHA", "0" * 40, 0)
    with pytest.raises(rex.ResponseError, match="unknown command"):
        await wire.call("NO-SUCH-COMMAND")
    # The classes follow the reply's prefix, as redis-py's parser picks them.
    with pytest.raises(rex.ReadOnlyError):
        await wire.call("EVAL", "return redis.error_reply('READONLY not really')", 0)
    with pytest.raises(rex.OutOfMemoryError):
        await wire.call("EVAL", "return redis.error_reply('OOM not really')", 0)

    # Errors among many replies land on their own callers, and only on them.
    calls: list[tuple[Arg, ...]] = [
        ("LPUSH", key, "y") if i % 3 == 0 else ("ECHO", f"reply {i}") for i in range(300)
    ]
    replies = await asyncio.gather(*(wire.call(*call) for call in calls), return_exceptions=True)
    for i, reply in enumerate(replies):
        if i % 3 == 0:
            assert isinstance(reply, rex.ResponseError) and str(reply).startswith("WRONGTYPE"), (i, reply)
        else:
            assert reply == f"reply {i}".encode(), (i, reply)
    assert await wire.call("GET", key) == b"x"
    assert await wire.call("CLIENT", "ID") == connection  # no error cost a reconnection


async def test_a_script_runs_after_the_server_forgot_it(server: RedisServer) -> None:
    keyspace = _keyspace(server.url, timeout=2)
    script = keyspace.script("return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}")
    admin = server.client()
    try:
        # Never loaded: EVALSHA meets NOSCRIPT, EVAL runs it (once: the count says so).
        assert await keyspace.run(script, ["k"], ["a"]) == [b"k", b"a", 1]
        assert admin.script_exists(script.sha) == [True]
        assert await keyspace.run(script, ["k"], ["b"]) == [b"k", b"b", 2]
        admin.script_flush()
        assert admin.script_exists(script.sha) == [False]
        assert await keyspace.run(script, ["k"], ["c"]) == [b"k", b"c", 3]
        assert admin.script_exists(script.sha) == [True]
    finally:
        admin.close()
        await keyspace.aclose()


# -- Callers that give up -------------------------------------------------------------------------


async def test_callers_that_give_up_do_not_shift_the_replies_of_the_others(proxy: StallingProxy) -> None:
    wire = Wire.from_url(_url_via(proxy.port), timeout=2)
    try:
        connection = await wire.call("CLIENT", "ID")
        proxy.stall()  # the commands below wait unanswered
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(wire.call("ECHO", "timed out"), 0.05)
        cancelled = asyncio.create_task(wire.call("ECHO", "cancelled"))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        waiting = asyncio.create_task(wire.call("ECHO", "waited"))
        await asyncio.sleep(0.05)
        proxy.resume()
        assert await waiting == b"waited"
        assert await wire.call("ECHO", "next") == b"next"
        assert cancelled.cancelled()
        assert await wire.call("CLIENT", "ID") == connection  # giving up reset nothing
    finally:
        await wire.aclose()


async def test_cancellations_at_any_point_leave_replies_aligned(wire: Wire) -> None:
    async def bounded(i: int) -> Any:  # some give up after about one round trip
        return await asyncio.wait_for(wire.call("ECHO", f"reply {i}"), 0.0005)

    tasks = []
    for i in range(300):
        call = bounded(i) if i % 7 == 0 else wire.call("ECHO", f"reply {i}")
        tasks.append(asyncio.ensure_future(call))
        if i % 10 == 0:
            await asyncio.sleep(0)  # some commands leave before the next ones are issued
    for i in range(0, 300, 6):
        tasks[i].cancel()  # before their command was written, or after
    await asyncio.sleep(0)
    for i in range(3, 300, 6):
        tasks[i].cancel()
    await asyncio.wait(tasks)
    assert any(task.cancelled() for task in tasks)
    for i, task in enumerate(tasks):
        if task.cancelled():
            assert i % 3 == 0
        elif i % 7 == 0 and isinstance(task.exception(), TimeoutError):
            continue
        else:
            assert task.result() == f"reply {i}".encode(), i
    replies = await asyncio.gather(*(wire.call("ECHO", f"after {i}") for i in range(50)))
    assert replies == [f"after {i}".encode() for i in range(50)]


# -- Lost connections -----------------------------------------------------------------------------


async def test_a_killed_connection_is_replaced_unnoticed(wire: Wire, admin: redis.asyncio.Redis) -> None:
    first = await wire.call("CLIENT", "ID")
    await admin.client_kill_filter(_id=first)
    await asyncio.sleep(0.05)  # the wire notices the close while idle
    seen = [first, await wire.call("CLIENT", "ID")]
    assert seen[1] != first
    # Or it does not yet: the next command meets the close (the loop may have seen Redis's EOF
    # in the iteration that delivered the kill's reply, or not: a few rounds meet both orders).
    for _ in range(10):
        await admin.client_kill_filter(_id=seen[-1])
        seen.append(await wire.call("CLIENT", "ID"))
    assert len(set(seen)) == len(seen)
    replies = await asyncio.gather(*(wire.call("ECHO", f"reply {i}") for i in range(100)))
    assert replies == [f"reply {i}".encode() for i in range(100)]


async def test_a_connection_found_closing_is_replaced_for_the_retry(wire: Wire) -> None:
    """On Redis's EOF the loop closes the transport at once and calls connection_lost one
    iteration later; a call made in between is retried on a new connection too."""
    first = await wire.call("CLIENT", "ID")
    assert wire._protocol is not None and wire._protocol.transport is not None
    wire._protocol.transport.close()  # the state an EOF leaves until connection_lost runs
    assert await wire.call("CLIENT", "ID") != first


async def test_a_command_whose_connection_dies_before_the_reply_is_sent_again(
    wire: Wire, admin: redis.asyncio.Redis, prefix: str
) -> None:
    key = f"{prefix}:queue"
    first = await wire.call("CLIENT", "ID")
    popping = asyncio.create_task(wire.call("BLPOP", key, 0))

    async def blocked() -> bool:
        return any(c["id"] == str(first) and c["cmd"] == "blpop" for c in await admin.client_list())

    await _eventually(blocked)
    await admin.client_kill_filter(_id=first)
    await admin.rpush(key, "job")
    assert await asyncio.wait_for(popping, 2) == [key.encode(), b"job"]
    assert await admin.llen(key) == 0
    assert await wire.call("CLIENT", "ID") != first


async def test_a_restarted_server_is_reconnected_on_the_next_call(server: RedisServer) -> None:
    wire = Wire.from_url(server.url, timeout=2)
    keyspace = _keyspace(server.url, timeout=2)
    script = keyspace.script("return redis.call('INCR', KEYS[1])")
    try:
        assert await wire.call("SET", "k", "before") == b"OK"
        assert await keyspace.run(script, ["n"], []) == 1
        server.stop()
        server.start()  # the same port, empty: no keys, no scripts
        assert await wire.call("GET", "k") is None
        assert await keyspace.run(script, ["n"], []) == 1
        assert await keyspace.call("INCR", "n") == 2
    finally:
        await wire.aclose()
        await keyspace.aclose()


async def test_a_cut_route_fails_with_a_connection_error_and_heals() -> None:
    proxy = CuttableProxy(*_address(redis_url()))
    wire = Wire.from_url(_url_via(proxy.port), timeout=2)
    keyspace = _keyspace(_url_via(proxy.port), timeout=2)
    try:
        assert await wire.call("PING") == b"PONG"
        assert await keyspace.call("PING") == b"PONG"
        proxy.cut()
        with pytest.raises(rex.ConnectionError):
            await wire.call("PING")
        with pytest.raises(ServiceUnavailable) as raised:
            await keyspace.call("PING")
        assert isinstance(raised.value.__cause__, rex.ConnectionError)
        proxy.restore()
        assert await wire.call("PING") == b"PONG"
        assert await keyspace.call("PING") == b"PONG"
    finally:
        await wire.aclose()
        await keyspace.aclose()
        proxy.close()


# -- Servers that do not answer, or are not there -------------------------------------------------


async def test_a_server_that_stops_answering_times_out_then_recovers(proxy: StallingProxy) -> None:
    timeout = 0.3
    wire = Wire.from_url(_url_via(proxy.port), timeout=timeout)
    try:
        assert await wire.call("PING") == b"PONG"
        proxy.stall()
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(wire.call("ECHO", f"reply {i}") for i in range(20)), return_exceptions=True
        )
        assert time.monotonic() - started < timeout + LATE
        assert all(isinstance(outcome, rex.TimeoutError) for outcome in outcomes), outcomes
        proxy.resume()
        assert await wire.call("ECHO", "back") == b"back"
    finally:
        await wire.aclose()


async def test_a_stall_is_service_unavailable_through_the_keyspace(proxy: StallingProxy) -> None:
    timeout = 0.3
    keyspace = _keyspace(_url_via(proxy.port), timeout=timeout)
    script = keyspace.script("return 7")
    try:
        assert await keyspace.run(script, [], []) == 7
        proxy.stall()
        for call in (lambda: keyspace.run(script, [], []), lambda: keyspace.call("PING")):
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable) as raised:
                await call()
            assert time.monotonic() - started < timeout + LATE
            assert isinstance(raised.value.__cause__, rex.TimeoutError)
        proxy.resume()
        assert await keyspace.run(script, [], []) == 7
    finally:
        await keyspace.aclose()


@pytest.mark.parametrize("password", [None, "pw"], ids=["command", "handshake"])
async def test_a_server_that_never_answers_times_out(password: str | None) -> None:
    writers: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda _, writer: writers.append(writer), "127.0.0.1", 0)
    timeout = 0.3
    wire = Wire(port=silent.sockets[0].getsockname()[1], password=password, timeout=timeout)
    try:
        started = time.monotonic()
        with pytest.raises(rex.TimeoutError):
            await wire.call("PING")
        assert time.monotonic() - started < timeout + LATE
    finally:
        await wire.aclose()
        for writer in writers:
            writer.close()
        silent.close()


async def test_nothing_listening_fails_at_once_with_one_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    timeout = 5.0
    wire = Wire(port=free_port(), timeout=timeout)
    attempts = 0
    open_connection = wire._open

    async def counted() -> Any:
        nonlocal attempts
        attempts += 1
        return await open_connection()

    monkeypatch.setattr(wire, "_open", counted)
    started = time.monotonic()
    outcomes = await asyncio.gather(*(wire.call("PING") for _ in range(20)), return_exceptions=True)
    assert time.monotonic() - started < 2  # refused: not a wait for ``timeout``
    assert all(isinstance(outcome, CannotConnect) for outcome in outcomes), outcomes
    assert issubclass(CannotConnect, rex.ConnectionError)
    assert attempts == 1  # twenty callers, one attempt, no retry
    with pytest.raises(CannotConnect):
        await wire.call("PING")
    assert attempts == 2
    await wire.aclose()


async def test_nothing_listening_is_service_unavailable_through_the_keyspace() -> None:
    keyspace = _keyspace(f"redis://127.0.0.1:{free_port()}/0", timeout=5)
    script = keyspace.script("return 1")
    try:
        for call in (lambda: keyspace.run(script, [], []), lambda: keyspace.call("PING")):
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable) as raised:
                await call()
            assert time.monotonic() - started < 2
            assert isinstance(raised.value.__cause__, CannotConnect)
    finally:
        await keyspace.aclose()


# -- URLs and the handshake -----------------------------------------------------------------------


URLS = [
    ("password-db", "redis://:s3cret@redis.internal:6380/3", "redis.internal", 6380, None, [
        ("AUTH", "s3cret"), ("SELECT", 3)]),
    ("user-quoted", "redis://alice:p%40ss%3Aword@10.0.0.5/0", "10.0.0.5", 6379, None, [
        ("AUTH", "alice", "p@ss:word")]),
    ("tls", "rediss://bob:pw@cache.example.com:6390/1", "cache.example.com", 6390, None, [
        ("AUTH", "bob", "pw"), ("SELECT", 1)]),
    ("unix-db", "unix:///run/redis/redis.sock?db=2", None, None, "/run/redis/redis.sock", [("SELECT", 2)]),
    ("bare", "redis://localhost", "localhost", 6379, None, []),
    ("ipv6", "redis://[::1]:7000/5", "::1", 7000, None, [("SELECT", 5)]),
    # Forms redis-py reads too: query arguments (which win over the path), a quoted socket path.
    ("query-password", "redis://cache.example.com/0?password=s3cret", "cache.example.com", 6379, None, [
        ("AUTH", "s3cret")]),
    ("query-db", "redis://cache.example.com/3?db=5", "cache.example.com", 6379, None, [("SELECT", 5)]),
    ("unix-quoted", "unix:///run/redis/redis%20sock?db=2", None, None, "/run/redis/redis sock", [
        ("SELECT", 2)]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("url", "host", "port", "path", "handshake"), [pytest.param(*case[1:], id=case[0]) for case in URLS]
)
def test_from_url_reads_a_url_as_redis_py_does(
    url: str, host: str | None, port: int | None, path: str | None, handshake: list[tuple[Arg, ...]]
) -> None:
    # The expectation is redis-py's reading of the URL...
    parsed = parse_url(url)
    auth = [a for a in handshake if a[0] == "AUTH"]
    assert parsed.get("password") == (auth[0][-1] if auth else None)
    assert parsed.get("username") == (auth[0][1] if auth and len(auth[0]) == 3 else None)
    assert parsed.get("db", 0) == next((a[1] for a in handshake if a[0] == "SELECT"), 0)
    if path is None:
        assert (parsed.get("host"), parsed.get("port", 6379)) == (host, port)
    else:
        assert parsed.get("path") == path
    # ...and the wire's.
    wire = Wire.from_url(url, timeout=1.5)
    assert wire.timeout == 1.5
    assert wire.path == path
    if path is None:
        assert (wire.host, wire.port) == (host, port)
    assert wire._handshake == handshake
    if url.startswith("rediss://"):
        assert wire._tls is not None and wire._tls.verify_mode == ssl.CERT_REQUIRED
    else:
        assert wire._tls is None


async def test_password_and_database_of_the_url_are_used(server: RedisServer) -> None:
    # RedisServer waits for an unauthenticated PING, so the password is set once it runs.
    server.client().config_set("requirepass", "s3cr3t p@ss")
    admin = redis.Redis(port=server.port, password="s3cr3t p@ss", db=3)
    wire = Wire.from_url(f"redis://:s3cr3t%20p%40ss@127.0.0.1:{server.port}/3", timeout=2)
    try:
        # Twenty first calls share one connection and its handshake; each lands in database 3.
        replies = await asyncio.gather(*(wire.call("SET", f"k{i}", i) for i in range(20)))
        assert replies == [b"OK"] * 20
        assert admin.mget([f"k{i}" for i in range(20)]) == [b"%d" % i for i in range(20)]
        assert admin.execute_command("SELECT", 0) and admin.dbsize() == 0
    finally:
        admin.close()
        await wire.aclose()


async def test_calls_made_during_the_handshake_land_in_the_urls_database(server: RedisServer) -> None:
    server.client().config_set("requirepass", "pw")
    admin = redis.Redis(port=server.port, password="pw", db=3)
    wire = Wire.from_url(f"redis://:pw@127.0.0.1:{server.port}/3", timeout=2)
    try:
        first = asyncio.ensure_future(wire.call("SET", "k-first", 1))
        late: list[asyncio.Future[Any]] = []
        while not first.done():  # one more call every loop iteration until the first returns
            late.append(asyncio.ensure_future(wire.call("SET", f"k{len(late)}", 1)))
            await asyncio.sleep(0)
        await asyncio.gather(first, *late)
        assert len(late) > 2
        assert admin.exists("k-first", *(f"k{i}" for i in range(len(late)))) == len(late) + 1
        assert admin.execute_command("SELECT", 0) and admin.dbsize() == 0
    finally:
        admin.close()
        await wire.aclose()


async def test_an_acl_user_of_the_url_logs_in(server: RedisServer) -> None:
    admin = server.client()
    admin.acl_setuser("wire-user", enabled=True, passwords=["+pass word"], keys=["*"], commands=["+@all"])
    wire = Wire.from_url(f"redis://wire-user:pass%20word@127.0.0.1:{server.port}/2", timeout=2)
    try:
        assert await wire.call("ACL", "WHOAMI") == b"wire-user"
        assert await wire.call("SET", "k", "v") == b"OK"
        assert redis.Redis(port=server.port, db=2).get("k") == b"v"
    finally:
        admin.close()
        await wire.aclose()


async def test_a_unix_socket_url_connects_and_selects(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    server = RedisServer(tmp_path, None, "--unixsocket", str(socket_path), "--unixsocketperm", "700")
    server.start()
    wire = Wire.from_url(f"unix://{socket_path}?db=2", timeout=2)
    try:
        assert await wire.call("SET", "k", "over the socket") == b"OK"
        assert redis.Redis(port=server.port, db=2).get("k") == b"over the socket"
    finally:
        await wire.aclose()
        server.stop()


async def test_a_wrong_password_is_an_authentication_error(server: RedisServer) -> None:
    server.client().config_set("requirepass", "right")
    wire = Wire(port=server.port, password="wrong", timeout=2)
    keyspace = _keyspace(f"redis://:wrong@127.0.0.1:{server.port}/0", timeout=2)
    script = keyspace.script("return 1")
    try:
        with pytest.raises(rex.AuthenticationError):
            await wire.call("PING")
        for call in (lambda: keyspace.run(script, [], []), lambda: keyspace.call("PING")):
            with pytest.raises(ServiceUnavailable) as raised:
                await call()
            assert isinstance(raised.value.__cause__, rex.AuthenticationError)
    finally:
        await wire.aclose()
        await keyspace.aclose()


async def test_a_refused_login_does_not_stay_the_connection(server: RedisServer) -> None:
    """Once the password is right, the next call logs in: the refused connection was dropped."""
    server.client().config_set("requirepass", "old")
    wire = Wire(port=server.port, password="new", timeout=2)
    try:
        with pytest.raises(rex.AuthenticationError):
            await wire.call("PING")
        with redis.Redis(port=server.port, password="old") as admin:
            admin.config_set("requirepass", "new")
        assert await wire.call("PING") == b"PONG"
    finally:
        await wire.aclose()


# -- aclose ---------------------------------------------------------------------------------------


async def test_aclose_closes_the_connection_and_a_later_call_opens_another(
    wire: Wire, admin: redis.asyncio.Redis
) -> None:
    first = await wire.call("CLIENT", "ID")
    await wire.aclose()

    async def gone() -> bool:
        return all(c["id"] != str(first) for c in await admin.client_list())

    await _eventually(gone)
    assert await wire.call("CLIENT", "ID") != first
    await wire.aclose()
    await wire.aclose()  # twice is fine


async def test_aclose_fails_the_calls_in_flight_rather_than_sending_them_again(
    proxy: StallingProxy, admin: redis.asyncio.Redis, prefix: str
) -> None:
    wire = Wire.from_url(_url_via(proxy.port), timeout=2)
    key = f"{prefix}:count"
    calls: list[asyncio.Task[Any]] = []
    try:
        await wire.call("SET", key, 0)
        proxy.hold_replies()  # the first INCR reaches Redis and runs; its reply waits in the proxy
        calls += [asyncio.create_task(wire.call("INCR", key)) for _ in range(50)]

        async def first_ran() -> bool:
            return await admin.get(key) == b"1"

        await _eventually(first_ran)  # the others wait to go with its reply
        await wire.aclose()
        done, _ = await asyncio.wait(calls, timeout=1)
        assert len(done) == 50, "aclose left callers waiting"
        assert await admin.get(key) == b"1", "commands were sent after aclose"
        assert proxy.accepted == 1, "aclose was followed by a new connection"
        assert all(isinstance(call.exception(), rex.ConnectionError) for call in calls)
        assert await wire.call("GET", key) == b"1"  # a later call connects again
    finally:
        await _cancel(calls)
        await wire.aclose()


async def test_aclose_while_connecting_fails_callers_with_a_connection_error() -> None:
    # The server accepts and never answers: the wire waits for the reply to its AUTH.
    writers: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda _, writer: writers.append(writer), "127.0.0.1", 0)
    wire = Wire(port=silent.sockets[0].getsockname()[1], password="pw", timeout=2)
    calls: list[asyncio.Task[Any]] = []
    try:
        calls += [asyncio.create_task(wire.call("PING")) for _ in range(3)]
        await _eventually(lambda: asyncio.sleep(0, bool(writers)))
        await wire.aclose()
        done, _ = await asyncio.wait(calls, timeout=1)
        assert len(done) == 3, "aclose left callers waiting"
        assert not any(call.cancelled() for call in calls), "callers nobody cancelled got CancelledError"
        assert all(isinstance(call.exception(), rex.ConnectionError) for call in calls)
    finally:
        await _cancel(calls)
        await wire.aclose()
        for writer in writers:
            writer.close()
        silent.close()


def test_rediss_urls_carry_redis_py_tls_options() -> None:
    checked = Wire.from_url("rediss://cache.example:6380/0", timeout=1)._tls
    assert checked is not None and checked.verify_mode == ssl.CERT_REQUIRED and checked.check_hostname
    unchecked = Wire.from_url("rediss://cache.example:6380/0?ssl_cert_reqs=none", timeout=1)._tls
    assert unchecked is not None and unchecked.verify_mode == ssl.CERT_NONE
    assert Wire.from_url("redis://cache.example:6379/0", timeout=1)._tls is None


def test_a_url_with_tls_options_the_wire_lacks_is_left_to_redis_py() -> None:
    assert Wire.understands("rediss://cache.example:6380/0?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem")
    with_client_cert = "rediss://cache.example:6380/0?ssl_certfile=/c.pem&ssl_keyfile=/k.pem"
    assert not Wire.understands(with_client_cert)
    assert RedisKeyspace.from_url(with_client_cert, cluster=False).wire is None
    assert RedisKeyspace.from_url("redis://127.0.0.1:6379/0", cluster=False).wire is not None
