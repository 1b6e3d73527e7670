"""Redis adapters for ``CodeStore``, ``RateLimiter`` and ``EventBus`` (redis-py asyncio).

Every decision is one Lua script, so it is atomic across processes and costs one round trip.
Time comes from the adapter's clock, passed in as milliseconds: tests move it with a fake clock
and every process of a deployment judges windows by the same rule. Key TTLs only clean up.

Keys are ``{prefix}:{{subject}}:{name}``: the hash tag puts every key of one phone number (or
one client IP) on one Redis Cluster slot, so each script's keys are on one node.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import msgspec
from redis import exceptions as rex
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript

from otpcore.adapters.group_commit import GroupCommit
from otpcore.adapters.redis_wire import Wire
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.events import Event
from otpcore.domain.ports import CodeCheck, CodeOutcome, Limit, RateDecision

Clock = Callable[[], float]
T = TypeVar("T")

# A PING before reusing a connection idle this long finds connections a restart left dead.
HEALTH_CHECK_INTERVAL = 10

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rex.ConnectionError,  # also BusyLoadingError, MaxConnectionsError, AuthenticationError
    rex.TimeoutError,
    rex.ClusterError,  # ClusterDownError, MasterDownError
    rex.RedisClusterException,  # no reachable node, slots not covered
    rex.TryAgainError,
    rex.ReadOnlyError,  # a replica promoted away under us
    rex.OutOfMemoryError,
    TimeoutError,  # waiting for a free cluster connection (asyncio.timeout)
)
# Error replies that mean "the server cannot serve now", not "this call is wrong".
_UNAVAILABLE_REPLIES = (
    "OOM",
    "BUSY ",  # a busy script; not BUSYGROUP, which says a consumer group exists
    "LOADING",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "READONLY",
    "NOREPLICAS",
    "MISCONF",
)


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE):
        return True
    return isinstance(exc, rex.ResponseError) and str(exc).startswith(_UNAVAILABLE_REPLIES)


class Script:
    """A Lua script: its source, its SHA1, and redis-py's handle on it for clients without a wire."""

    def __init__(self, source: str, registered: AsyncScript) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - the name Redis gives it
        self.registered = registered


class RedisKeyspace:
    """A client, the key prefix, the scripts registered on it, and the error mapping.

    On a single server, scripts and ``call`` go over ``wire`` (one pipelined connection, see
    redis_wire) when there is one; everything else, and a cluster, goes through ``client``.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        prefix: str = "otp",
        *,
        timeout: float = 2.0,
        max_in_flight: int = 10,
        wire: Wire | None = None,
    ) -> None:
        self.client = client
        self.wire = wire
        self.prefix = prefix
        self.timeout = timeout
        self._scripts: dict[str, Script] = {}
        # A cluster client: RedisCluster has no blocking pool (past max_connections a node
        # raises at once), so callers queue at this gate instead (a server's pool queues them).
        self._cluster = client if isinstance(client, RedisCluster) else None
        self._gate = asyncio.Semaphore(max_in_flight)
        self._discovering = asyncio.Lock()
        self._discovered = False
        # Sorted-set members must be unique per request: a random per-process tag and a counter.
        self._tag = os.urandom(6).hex().encode()
        self._ids = itertools.count()

    @property
    def is_cluster(self) -> bool:
        return self._cluster is not None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        cluster: bool,
        prefix: str = "otp",
        pool_size: int = 10,
        timeout: float = 2.0,
    ) -> RedisKeyspace:
        """A keyspace whose calls fail with ServiceUnavailable within seconds when Redis is down.

        Connect and read timeouts are ``timeout``. A connection error is retried once, so a
        pooled connection that a restart killed reconnects unnoticed; on a single server a read
        timeout is not retried: the script may have run, and none of these scripts is idempotent.
        Nothing connects here; the client connects, and reconnects, on use.
        """
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "health_check_interval": HEALTH_CHECK_INTERVAL,
        }
        backoff = ExponentialWithJitterBackoff(base=0.05, cap=0.5)
        if cluster:
            # The cluster client retries connection errors and timeouts alike, rebuilding its
            # slot map in between; one retry keeps a dead cluster's answer within seconds.
            client = RedisCluster.from_url(
                url, max_connections=pool_size, retry=Retry(backoff, retries=1), **options
            )
            return cls(client, prefix, timeout=timeout, max_in_flight=pool_size)
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=timeout,  # wait for a free connection at most this long
            retry=Retry(backoff, retries=1, supported_errors=(rex.ConnectionError,)),
            **options,
        )
        wire = Wire.from_url(url, timeout=timeout) if Wire.understands(url) else None
        return cls(Redis.from_pool(pool), prefix, timeout=timeout, wire=wire)

    def key(self, subject: str, name: str) -> str:
        return f"{self.prefix}:{{{subject}}}:{name}"

    def unique(self) -> bytes:
        return b"%s:%d" % (self._tag, next(self._ids))

    def script(self, source: str) -> Script:
        """The script registered for ``source``: loaded once per keyspace, run by its SHA."""
        registered = self._scripts.get(source)
        if registered is None:
            registered = self._scripts[source] = Script(source, self.client.register_script(source))
        return registered

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        # EVALSHA; on NOSCRIPT (a restarted or new node) the script is sent whole once.
        wire = self.wire
        if wire is None:
            return await self.execute(lambda: script.registered(keys=keys, args=args))
        try:
            return await self.execute(lambda: wire.call("EVALSHA", script.sha, len(keys), *keys, *args))
        except rex.NoScriptError:
            pass
        return await self.execute(lambda: wire.call("EVAL", script.source, len(keys), *keys, *args))

    async def call(self, *args: Any) -> Any:
        """One plain command (over the wire if there is one)."""
        wire = self.wire
        if wire is None:
            return await self.execute(lambda: self.client.execute_command(*args))
        return await self.execute(lambda: wire.call(*args))

    async def execute(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis call, turning "Redis cannot answer" into ServiceUnavailable."""
        try:
            if self._cluster is None:
                return await call()
            await self._discover(self._cluster)
            async with asyncio.timeout(self.timeout):
                await self._gate.acquire()
            try:
                return await call()
            finally:
                self._gate.release()
        except Exception as exc:
            if _unavailable(exc):
                self._discovered = False
                raise ServiceUnavailable() from exc
            raise

    async def _discover(self, cluster: RedisCluster) -> None:
        # Commands sent while a RedisCluster client is still discovering its nodes can find
        # their connection closed under them (redis-py 8.1: a few of 20 concurrent first calls
        # fail), so one caller discovers while the others wait; again after any failure.
        if self._discovered:
            return
        async with self._discovering:
            if not self._discovered:
                await cluster.initialize()
                self._discovered = True

    async def ping(self) -> None:
        await self.execute(self.client.ping)

    async def aclose(self) -> None:
        if self.wire is not None:
            await self.wire.aclose()
        await self.client.aclose()


# Every script that writes starts with this line (Redis 7 script flags, none given): Redis then
# refuses the whole script up front when it is over maxmemory, instead of refusing its first
# memory-growing command only if nothing was written before it (a ZREMRANGEBYSCORE counts), so a
# full Redis fails every decision closed, and never half of one.
_WRITES = "#!lua\n"

# Sliding logs shared by the scripts: a sorted set per (limit, subject) holding the times, in
# milliseconds of the caller's clock, of accepted requests; members are unique per request.
# An entry is live while its time is after now - window (as SlidingLog in adapters.memory).
_SLIDING_LOG = """
local function live(key, now, window)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  return redis.call('ZCARD', key)
end
local function reset_after(key, count, now, window)
  if count == 0 then return 0 end
  local oldest = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
  return math.max(0, math.ceil((oldest + window - now) / 1000))
end
local function record(key, now, window, member)
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, window)
end
-- Limits KEYS[first + 1 .. first + count], requests and window of the i-th at ARGV[base + 2i]
-- and ARGV[base + 2i + 1]: all of them or none. Records member:i in each if all allow; sets
-- reply[2i] and reply[2i + 1] to its remaining and reset_after; returns 1 if all allowed.
local function decide(first, count, base, now, member, reply)
  local function limit(i)
    return KEYS[first + i], tonumber(ARGV[base + 2 * i]), tonumber(ARGV[base + 2 * i + 1])
  end
  local counts, allowed = {}, 1
  for i = 1, count do
    local key, requests, window = limit(i)
    counts[i] = live(key, now, window)
    if counts[i] >= requests then allowed = 0 end
  end
  for i = 1, count do
    local key, requests, window = limit(i)
    if allowed == 1 then
      record(key, now, window, member .. ':' .. i)
      counts[i] = counts[i] + 1
    end
    reply[2 * i] = math.max(0, requests - counts[i])
    reply[1 + 2 * i] = reset_after(key, counts[i], now, window)
  end
  return allowed
end
"""

# KEYS: one sorted set per limit. ARGV: now, member, then requests and window of each limit.
# Returns {allowed, remaining_1, reset_after_1, remaining_2, ...}: all limits or none.
_HIT = (
    _WRITES
    + _SLIDING_LOG
    + """
local reply = {}
reply[1] = decide(0, #KEYS, 1, tonumber(ARGV[1]), ARGV[2], reply)
return reply
"""
)

# KEYS: the code hash, the send-limit sorted set (the code key again when there is no limit),
# the event stream (the code key again when the event is not in this step), then one sorted set
# per admission limit (RedisRateLimiter's keys). ARGV: now, digest, expires_at, ttl,
# max_attempts, member, requests (0: no limit), window, the event ("": none), the stream's max
# length, then requests and window of each admission limit.
# Returns {status, then remaining and reset_after of each admission limit, then of the send
# limit}: status 1 sent, 0 an admission limit refused (nothing recorded), 2 the send limit
# refused (the admission counted, as the limiter would have; the previous code kept).
_ISSUE = (
    _WRITES
    + _SLIDING_LOG
    + """
local now = tonumber(ARGV[1])
local reply = {}
local status = decide(3, #KEYS - 3, 9, now, ARGV[6], reply)
reply[1] = status
if status == 0 then return reply end
local requests = tonumber(ARGV[7])
if requests > 0 then
  local window = tonumber(ARGV[8])
  local count = live(KEYS[2], now, window)
  if count >= requests then
    reply[1] = 2
    table.insert(reply, math.max(0, requests - count))
    table.insert(reply, reset_after(KEYS[2], count, now, window))
    return reply
  end
  record(KEYS[2], now, window, ARGV[6])
  table.insert(reply, requests - count - 1)
  table.insert(reply, reset_after(KEYS[2], count + 1, now, window))
end
redis.call('HSET', KEYS[1], 'digest', ARGV[2], 'expires_at', ARGV[3], 'attempts', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if ARGV[9] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[10], '*', 'event', ARGV[9])
end
return reply
"""
)

# KEYS: the code hash, the failure-budget sorted set, then one sorted set per admission limit
# (RedisRateLimiter's keys). ARGV: now, digest, requests, window, member, then requests and
# window of each admission limit.
# Returns {outcome, attempts_remaining, retry_after, then remaining and reset_after of each
# admission limit}; outcome indexes _OUTCOMES. An admission limit refusing: REFUSED, nothing
# recorded, the code untouched.
_CHECK = (
    _WRITES
    + _SLIDING_LOG
    + """
local ACCEPTED, WRONG, BURNED, LOCKED, MISSING, REFUSED = 0, 1, 2, 3, 4, 5
local now, requests, window = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
local admitted = {}
local function answer(outcome, remaining, retry)
  local reply = {outcome, remaining, retry}
  for i = 2, 2 * (#KEYS - 2) + 1 do table.insert(reply, admitted[i]) end
  return reply
end
if decide(2, #KEYS - 2, 4, now, ARGV[5], admitted) == 0 then return answer(REFUSED, 0, 0) end
local failures = live(KEYS[2], now, window)
if failures >= requests then
  return answer(LOCKED, 0, reset_after(KEYS[2], failures, now, window))
end
local code = redis.call('HMGET', KEYS[1], 'digest', 'expires_at', 'attempts')
if not code[1] then return answer(MISSING, 0, 0) end
if tonumber(code[2]) <= now then
  redis.call('DEL', KEYS[1])
  return answer(MISSING, 0, 0)
end
if tonumber(code[3]) <= 0 then return answer(BURNED, 0, 0) end
-- A plain comparison is safe: both sides are HMAC-SHA256 outputs under a key Redis never
-- sees, and an attacker cannot choose HMAC outputs, so how long it takes to find a mismatch
-- tells nothing about the code.
if code[1] == ARGV[2] then
  redis.call('DEL', KEYS[1])
  return answer(ACCEPTED, 0, 0)
end
local left = redis.call('HINCRBY', KEYS[1], 'attempts', -1)
record(KEYS[2], now, window, ARGV[5])
failures = failures + 1
if failures >= requests then
  return answer(LOCKED, 0, reset_after(KEYS[2], failures, now, window))
end
if left <= 0 then return answer(BURNED, 0, 0) end
-- What is left is whichever runs out first: this code's attempts or the number's budget.
return answer(WRONG, math.min(left, requests - failures), 0)
"""
)

_OUTCOMES = (
    CodeOutcome.ACCEPTED,
    CodeOutcome.WRONG,
    CodeOutcome.BURNED,
    CodeOutcome.LOCKED,
    CodeOutcome.MISSING,
    CodeOutcome.REFUSED,
)


def _decisions(limits: Sequence[Limit], reply: list[Any], first: int, *, allowed: bool) -> list[RateDecision]:
    """The decisions of ``limits`` from a script's reply, where each limit's remaining and
    reset_after follow one another from ``reply[first]`` on."""
    return [
        RateDecision(
            allowed=allowed,
            limit=limit.requests,
            remaining=int(reply[first + 2 * i]),
            reset_after=int(reply[first + 1 + 2 * i]),
            name=limit.name,
        )
        for i, limit in enumerate(limits)
    ]


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class RedisRateLimiter:
    def __init__(self, keyspace: RedisKeyspace, clock: Clock = time.time) -> None:
        self.keyspace = keyspace
        self.clock = clock
        self._hit = keyspace.script(_HIT)

    def key(self, limit: Limit) -> str:
        """The sorted set of ``limit`` (the code store decides admission limits on it too)."""
        return self.keyspace.key(limit.subject, f"rate:{limit.name}")

    async def hit(self, limits: Sequence[Limit]) -> list[RateDecision]:
        if not limits:
            return []
        # The limits of one call share a subject (the port says so), hence one cluster slot.
        keys = [self.key(limit) for limit in limits]
        args: list[Any] = [_ms(self.clock()), self.keyspace.unique()]
        for limit in limits:
            args += [limit.requests, _ms(limit.window)]
        reply = await self.keyspace.run(self._hit, keys, args)
        return _decisions(limits, reply, 1, allowed=bool(reply[0]))

    async def ping(self) -> None:
        await self.keyspace.ping()


class RedisCodeStore:
    """Codes as ``{digest, expires_at, attempts}`` hashes: digests only, never a plain code."""

    def __init__(
        self, keyspace: RedisKeyspace, clock: Clock = time.time, *, events: RedisEventBus | None = None
    ) -> None:
        self.keyspace = keyspace
        self.clock = clock
        # With an event bus, a send's event is appended in the send's own script (one round
        # trip) -- except on a cluster, where the stream lives on another slot.
        self.events = events
        self._issue = keyspace.script(_ISSUE)
        self._check = keyspace.script(_CHECK)
        self._limiter = RedisRateLimiter(keyspace, clock)

    def _limit_key(self, phone: str, limit: Limit) -> str:
        # Keyed by the phone, not limit.subject (which is the phone, from CodePolicy), so that
        # every key a script touches is under the phone's hash tag.
        return self.keyspace.key(phone, f"code:{limit.name}")

    async def issue(
        self,
        phone: str,
        digest: bytes,
        *,
        ttl: float,
        max_attempts: int,
        send_limit: Limit | None,
        event: Event | None = None,
        admission: Sequence[Limit] = (),
    ) -> list[RateDecision]:
        if event is not None and self.events is None:
            raise ValueError("this code store has no event bus to publish the send's event to")
        admitted, admission = await self._admit_apart(admission)
        if admitted and not admitted[0].allowed:
            return admitted
        now = _ms(self.clock())
        code_key = self.keyspace.key(phone, "code")
        # The event goes in the script, except on a cluster (the stream lives on another slot).
        bus = self.events if event is not None and not self.keyspace.is_cluster else None
        keys = [
            code_key,
            self._limit_key(phone, send_limit) if send_limit else code_key,
            bus.stream if bus is not None else code_key,
            *(self._limiter.key(limit) for limit in admission),
        ]
        args: list[Any] = [now, digest, now + _ms(ttl), max(1, math.ceil(ttl * 1000)), max_attempts]
        args.append(self.keyspace.unique())
        args += [send_limit.requests, _ms(send_limit.window)] if send_limit else [0, 0]
        args += [msgspec.json.encode(event), bus.max_len] if bus is not None else ["", 0]
        for limit in admission:
            args += [limit.requests, _ms(limit.window)]
        reply = await self.keyspace.run(self._issue, keys, args)
        status = int(reply[0])
        decisions = admitted + _decisions(admission, reply, 1, allowed=status != 0)
        if send_limit and status != 0:
            decisions += _decisions([send_limit], reply, 1 + 2 * len(admission), allowed=status == 1)
        if status == 1 and self.events is not None and event is not None and bus is None:
            await self.events.publish(event)
        return decisions

    async def check(
        self, phone: str, digest: bytes, *, failure_budget: Limit, admission: Sequence[Limit] = ()
    ) -> CodeCheck:
        admitted, admission = await self._admit_apart(admission)
        if admitted and not admitted[0].allowed:
            return CodeCheck(outcome=CodeOutcome.REFUSED, admission=admitted)
        keys = [
            self.keyspace.key(phone, "code"),
            self._limit_key(phone, failure_budget),
            *(self._limiter.key(limit) for limit in admission),
        ]
        args: list[Any] = [
            _ms(self.clock()),
            digest,
            failure_budget.requests,
            _ms(failure_budget.window),
            self.keyspace.unique(),
        ]
        for limit in admission:
            args += [limit.requests, _ms(limit.window)]
        reply = await self.keyspace.run(self._check, keys, args)
        outcome = _OUTCOMES[reply[0]]
        admitted += _decisions(admission, reply, 3, allowed=outcome is not CodeOutcome.REFUSED)
        return CodeCheck(
            outcome=outcome, attempts_remaining=int(reply[1]), retry_after=int(reply[2]), admission=admitted
        )

    async def _admit_apart(self, admission: Sequence[Limit]) -> tuple[list[RateDecision], Sequence[Limit]]:
        """On a cluster the client's keys live on other slots than the number's: their limits
        are decided first, apart. Returns those decisions and the limits left for the script."""
        if admission and self.keyspace.is_cluster:
            return await self._limiter.hit(admission), ()
        return [], admission

    async def ping(self) -> None:
        await self.keyspace.ping()


# KEYS: the stream. ARGV: its approximate max length, then one encoded event per entry.
_APPEND = (
    _WRITES
    + """
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'event', ARGV[i])
end
return #ARGV - 1
"""
)


class RedisEventBus:
    """Events on a Redis Stream, trimmed to about ``max_len``; consumer groups read it.

    Appends are group commits: ``publish`` returns once its events are in the stream, and the
    publishers that arrive while an append is in flight go together in the next one (at most
    ``batch_size`` events, never splitting one publish). Nothing waits to fill a batch, so an
    idle bus appends at once; under load one command carries several sign-ins' events.
    """

    FIELD = b"event"

    def __init__(
        self,
        keyspace: RedisKeyspace,
        *,
        stream: str = "events",
        max_len: int = 100_000,
        batch_size: int = 100,
    ) -> None:
        self.keyspace = keyspace
        self.stream = f"{keyspace.prefix}:{{{stream}}}"
        self.max_len = max_len
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        self._decoder = msgspec.json.Decoder(Event)
        self._append_script = keyspace.script(_APPEND)
        self._appends = GroupCommit(
            self._append,
            max_weight=batch_size,
            weight=len,
            stopped="the event bus stopped before its append was confirmed",
        )

    async def publish(self, *events: Event) -> None:
        """Append ``events`` together (in one command with other publishers' when they queue)."""
        if events:
            await self._appends.submit([msgspec.json.encode(event) for event in events])

    async def _append(self, publishes: list[list[bytes]]) -> list[None]:
        await self._send([payload for payloads in publishes for payload in payloads])
        return [None] * len(publishes)

    async def _send(self, payloads: list[bytes]) -> None:
        if len(payloads) == 1:
            trim = ("MAXLEN", "~", self.max_len)
            await self.keyspace.call("XADD", self.stream, *trim, "*", self.FIELD, payloads[0])
        else:
            await self.keyspace.run(self._append_script, [self.stream], [self.max_len, *payloads])

    async def drain(self) -> None:
        """Wait for the appends still in flight (on shutdown); cancelling the wait leaves them be."""
        await self._appends.drain()

    async def aclose(self) -> None:
        """Stop appending: an append still in flight is cancelled, its publishers told so."""
        await self._appends.aclose()

    async def read_all(self) -> list[Event]:
        """Every event the stream holds, oldest first (for tests and tools)."""
        client = self.keyspace.client
        entries = cast(
            "list[tuple[bytes, dict[bytes, bytes]]]",
            await self.keyspace.execute(lambda: client.xrange(self.stream)),
        )
        return [self._decoder.decode(fields[self.FIELD]) for _, fields in entries]

    async def ping(self) -> None:
        await self.keyspace.ping()
