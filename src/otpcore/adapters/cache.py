"""A cached ``UserRepo``: L1 in-process (bounded LRU, short TTL) and L2 Redis in front of the database.

Reads (``get``, ``get_by_phone``) go L1 → L2 → the wrapped repo; a miss fills both. Search, creation
and ``ping`` pass through: misses are never cached and ids are never reused, so creating a user
leaves nothing to invalidate, and a phone number never changes, so phone → id mappings need none.

**Invalidations.** Each process holds one pub/sub subscription (``Invalidations``, shared with the
session cache) to ``{prefix}:user-invalidations`` and ``{prefix}:session-revocations``; every
message drops one L1 entry as it arrives. While that subscription is *live* — its SUBSCRIBE
confirmed, the connection answering — an L1 entry is served with no Redis call at all: a cached
read costs no round trip and no database statement. The subscription becomes live only after L1
has been emptied (messages may have been missed while it was down); any error on it (Redis
restarted, connection killed, no answer to a heartbeat PING within three heartbeats)
makes it not live and empties L1 at once, and it resubscribes by itself.

**Versions.** Redis also holds a version token per user (``{prefix}:{user:<id>}:user-version``,
random and never reused, created on first read). Every L1 and L2 entry carries the token it was
read under. While the subscription is not live an L1 entry is served only after one Redis script
confirms its token is still current (the strict path: one small round trip, no database), so
correctness never depends on pub/sub being up. L2 entries are always checked that way.

**Writes.** ``update`` first replaces the token, raises the user's "writing" marker (which refuses
refills of L1 and L2 for ``WRITE_WINDOW`` seconds) and publishes the invalidation, so every
process drops its L1 entry before the database changes; then it writes the database; then it
replaces the token again, lowers the marker, deletes the L2 entry and publishes again. A read
that was under way when an invalidation arrived does not fill L1 with what it read. If the first
step fails (Redis down) the update is refused with ServiceUnavailable before the database is
touched: another process that still reaches Redis could otherwise serve the old user. If the
last step fails the update still succeeds: every cached copy was already dropped or made
unusable, and no copy can be refilled until the marker expires, by which time the database
holds the new row.

**Staleness bound.** With Redis: until the invalidation message is received by each process —
sub-millisecond on one host (``tests/contract/test_cached_user_repo.py`` measures it), and
usually before the update has even returned, since the first message goes out before the
database write — and never longer than ``l1_ttl`` (default 5 s), which also bounds a process
whose subscription died without it noticing. The process that wrote reads its own write at once.
Refills are blocked while the write is under way, provided the database write takes less than
``WRITE_WINDOW`` and Redis keeps the marker that long (it is a volatile key an eviction policy
could drop). Without Redis (``keyspace=None``, the embedded default): exact within one process,
which drops its entry before the update returns; other processes on the same database see a
change after at most ``l1_ttl`` seconds.

**Redis down.** The subscription is not live, so L1 cannot be trusted; reads skip both layers
and go to the database, counted as ``result="error"``; for ``RETRY_AFTER`` seconds after a
failure they do not even try, so an outage costs the database a little load and no latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from otpcore.adapters.redis import RedisKeyspace
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.model import Role, User
from otpcore.domain.ports import Counters, UserRepo

log = logging.getLogger("otpcore.cache")

K = TypeVar("K")
V = TypeVar("V")

# Seconds the "writing" marker refuses refills: longer than any database write may take.
WRITE_WINDOW = 30.0
# Seconds reads leave Redis alone after it failed.
RETRY_AFTER = 1.0
# Seconds between attempts to resubscribe after the invalidation listener lost Redis.
LISTEN_BACKOFF = (0.1, 2.0)
# Seconds of silence on the subscription before it is PINGed; three times that, it is dead.
HEARTBEAT = 1.0
_HEARTBEAT_TOKEN = b"otp-invalidations"


class _Stamped(msgspec.Struct, frozen=True, array_like=True):
    """A user with the version token it was read under (the L2 payload)."""

    stamp: bytes
    user: User


class _NoCounters:
    def add(self, name: str, /, **labels: str) -> None:
        return None


class LruCache(Generic[K, V]):
    """At most ``size`` entries, each live for ``ttl`` seconds of ``clock``; least recent goes first."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float]) -> None:
        self.size = size
        self.ttl = ttl
        self.clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: K, value: V) -> None:
        self._entries[key] = (self.clock() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class DropLog(Generic[K]):
    """Which L1 entries were dropped since a read began, so that the read does not refill one.

    ``now()`` before the read; ``untouched(key, since)`` after it is false if ``key`` was
    dropped, or everything was, in between. The newest ``size`` drops are remembered by key;
    past that, a read that overlapped a forgotten drop is refused as if its key were dropped.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._now = 0
        self._reset_at = 0
        self._forgotten_at = 0
        self._dropped: OrderedDict[K, int] = OrderedDict()

    def now(self) -> int:
        return self._now

    def drop(self, key: K) -> None:
        self._now += 1
        self._dropped[key] = self._now
        self._dropped.move_to_end(key)
        if len(self._dropped) > self.size:
            _, self._forgotten_at = self._dropped.popitem(last=False)

    def reset(self) -> None:
        self._now += 1
        self._reset_at = self._now
        self._dropped.clear()

    def untouched(self, key: K, since: int) -> bool:
        return max(self._reset_at, self._forgotten_at, self._dropped.get(key, 0)) <= since


class Invalidations:
    """One process's subscription to the caches' invalidation channels, shared by its caches.

    A cache ``watch``es a channel with ``drop`` (called with each message's payload) and
    ``reset`` (called whenever messages may have been missed: it must empty that cache's L1).
    ``live`` is true only while the subscription is confirmed and answering; every
    (re)subscription calls every ``reset`` before ``live`` turns true, every error calls them
    again as ``live`` turns false. The listener starts on first use (``start``, inside the
    running loop: ``build_core`` runs outside any) and holds one Redis connection; ``aclose``
    stops it.
    """

    def __init__(
        self,
        keyspace: RedisKeyspace,
        *,
        backoff: tuple[float, float] = LISTEN_BACKOFF,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self.keyspace = keyspace
        self.user_channel = f"{keyspace.prefix}:user-invalidations"
        self.session_channel = f"{keyspace.prefix}:session-revocations"
        self.backoff = backoff
        self.heartbeat = heartbeat
        self._handlers: dict[bytes, list[Callable[[bytes], None]]] = {
            self.user_channel.encode(): [],
            self.session_channel.encode(): [],
        }
        self._resets: list[Callable[[], None]] = []
        self._live = False
        self._listener: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def live(self) -> bool:
        """Whether every invalidation published from now on will reach this process."""
        return self._live

    def watch(self, channel: str, drop: Callable[[bytes], None], reset: Callable[[], None]) -> None:
        self._handlers[channel.encode()].append(drop)
        self._resets.append(reset)

    def start(self) -> None:
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._run(), name="cache-invalidations")

    async def _run(self) -> None:
        delay = self.backoff[0]
        while not self._closing:
            pubsub = self.keyspace.client.pubsub()
            connection, retry = None, None
            try:
                # Through the keyspace first: a cluster client learns its nodes there.
                await self.keyspace.execute(self.keyspace.client.ping)
                await pubsub.subscribe(self.user_channel, self.session_channel)
                # redis-py would reconnect and resubscribe silently after a connection error,
                # losing the messages in between unseen; every error must reach us instead.
                connection = pubsub.connection
                assert connection is not None
                retry, connection.retry = connection.retry, _NO_RETRY
                await self._listen(pubsub)
            except Exception as exc:  # whatever cut the subscription, subscribe again
                log.info("cache invalidation listener lost Redis (%s); resubscribing", type(exc).__name__)
            finally:
                if self._live:
                    delay = self.backoff[0]  # it worked for a while: resubscribe soon
                # Invalidations published from now on are lost to us: L1 cannot be trusted.
                self._down()
                if connection is not None and retry is not None:
                    connection.retry = retry  # the connection goes back to the shared pool
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def _listen(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        unconfirmed = set(self._handlers)
        heard = loop.time()
        pinged = False
        while not self._closing:
            message = await pubsub.get_message(timeout=min(0.5, self.heartbeat / 2))
            now = loop.time()
            if message is None:
                silent = now - heard
                if silent > 3 * self.heartbeat:
                    raise TimeoutError(f"no word from Redis on the subscription for {silent:.1f} s")
                if silent > self.heartbeat and not pinged:
                    await pubsub.ping(_HEARTBEAT_TOKEN)
                    pinged = True
                continue
            heard, pinged = now, False
            kind = message["type"]
            if kind == "message":
                self._dispatch(message["channel"], message["data"])
            elif kind == "subscribe":
                # A (re)subscription: whatever was published before it may have been missed.
                self._reset()
                unconfirmed.discard(message["channel"])
                if not unconfirmed:
                    self._live = True
                    log.debug("cache invalidation listener subscribed")
            # "pong": the heartbeat's answer; hearing it is all it was for.

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        for drop in self._handlers.get(channel, ()):
            try:
                drop(data)
            except Exception:  # a message we cannot read: forget everything rather than guess
                log.warning("unreadable cache invalidation on %r; emptying L1", channel)
                self._reset()

    def _reset(self) -> None:
        for reset in self._resets:
            reset()

    def _down(self) -> None:
        self._live = False
        self._reset()

    async def aclose(self) -> None:
        """Stop the listener (the keyspace belongs to the caller)."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._closing = True
        # redis-py's get_message can swallow a cancellation (redis-py 8.1); the flag ends the
        # loop then, and cancelling again ends a sleep or a subscribe.
        while not listener.done():
            listener.cancel()
            await asyncio.wait({listener}, timeout=0.1)
        self._closing = False
        self._down()


# No retry, no reconnect: a connection error on the subscription surfaces at once.
_NO_RETRY = Retry(NoBackoff(), 0, supported_errors=())


# Every script's KEYS: the user's version token, "writing" marker and L2 entry (one hash tag).

# ARGV: the L1 entry's token ("" if none), a fresh token, the token's TTL in ms.
# Returns {token} when the L1 token is current, else {token, writing, L2 payload or nil}.
_READ = """
local token = redis.call('GET', KEYS[1])
if not token then
  token = ARGV[2]
  redis.call('SET', KEYS[1], token, 'PX', ARGV[3])
end
if token == ARGV[1] then return {token} end
return {token, redis.call('EXISTS', KEYS[2]), redis.call('GET', KEYS[3])}
"""

# ARGV: the token the user was read under, the payload, its TTL in ms. Fills only if that token
# is still current and no write is under way; returns 1 if it filled.
_FILL = """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# ARGV: a fresh token, its TTL in ms, the marker's TTL in ms, the invalidation channel, the user id.
_BEGIN_WRITE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('DEL', KEYS[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# ARGV: a fresh token, its TTL in ms, the invalidation channel, the user id.
_END_WRITE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('DECR', KEYS[2]) <= 0 then redis.call('DEL', KEYS[2]) end
redis.call('DEL', KEYS[3])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""


class CachedUserRepo:
    def __init__(
        self,
        inner: UserRepo,
        *,
        l1_size: int = 10_000,
        l1_ttl: float = 5.0,
        keyspace: RedisKeyspace | None = None,
        invalidations: Invalidations | None = None,
        l2_ttl: float = 300,
        counters: Counters | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.keyspace = keyspace
        self.l2_ttl = l2_ttl
        self.counters: Counters = counters or _NoCounters()
        self.clock = clock
        # user id -> (user, version token); the token is b"" without Redis.
        self._users: LruCache[int, tuple[User, bytes]] = LruCache(l1_size, l1_ttl, clock)
        self._phones: LruCache[str, int] = LruCache(l1_size, l1_ttl, clock)
        # Entries dropped (a write here, an invalidation, a reset): a read that overlapped the
        # drop of its entry does not fill L1 with what it read before.
        self._drops: DropLog[int] = DropLog()
        self._redis_failed_at: float | None = None
        self._decoder = msgspec.msgpack.Decoder(_Stamped)
        self.invalidations: Invalidations | None = None
        self._owns_invalidations = False
        if keyspace is not None:
            # Without one given (tests, embedding), a subscription of its own.
            self._owns_invalidations = invalidations is None
            self.invalidations = invalidations or Invalidations(keyspace)
            self.channel = self.invalidations.user_channel
            self.invalidations.watch(self.channel, self._invalidated, self._reset)
            self._read = keyspace.script(_READ)
            self._fill = keyspace.script(_FILL)
            self._begin_write = keyspace.script(_BEGIN_WRITE)
            self._end_write = keyspace.script(_END_WRITE)

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, user_id: int) -> User | None:
        if self.keyspace is None or self.invalidations is None:
            return await self._get_local(user_id)
        self.invalidations.start()
        cached = self._users.get(user_id)
        if cached is not None and self.invalidations.live:
            self._count("l1", "hit")
            return cached[0]
        if not self._redis_usable():
            self._count("l2", "error")
            return await self.inner.get(user_id)
        return await self._get_shared(self.keyspace, user_id, cached)

    async def _get_local(self, user_id: int) -> User | None:
        cached = self._users.get(user_id)
        if cached is not None:
            self._count("l1", "hit")
            return cached[0]
        self._count("l1", "miss")
        since = self._drops.now()
        user = await self.inner.get(user_id)
        if user is not None and self._drops.untouched(user_id, since):
            self._users.put(user_id, (user, b""))
        return user

    async def _get_shared(
        self, keyspace: RedisKeyspace, user_id: int, cached: tuple[User, bytes] | None
    ) -> User | None:
        """The strict path: L1 validated by its token, else L2 by its token, else the database."""
        since = self._drops.now()
        held = cached[1] if cached is not None else b""
        try:
            reply = await keyspace.run(
                self._read, self._keys(user_id), [held, keyspace.unique(), _ms(self.l2_ttl)]
            )
        except ServiceUnavailable:
            self._redis_failed()
            return await self.inner.get(user_id)
        token: bytes = reply[0]
        if cached is not None and len(reply) == 1:
            self._count("l1", "hit")
            return cached[0]
        self._count("l1", "miss")
        if cached is not None:
            self._users.pop(user_id)  # outdated
        writing, payload = bool(reply[1]), reply[2]
        if payload is not None:
            stored = self._decoder.decode(payload)
            if stored.stamp == token:
                self._count("l2", "hit")
                if self._drops.untouched(user_id, since):
                    self._users.put(user_id, (stored.user, token))
                return stored.user
        self._count("l2", "miss")
        user = await self.inner.get(user_id)
        if user is not None and not writing:
            await self._store(keyspace, user, token, since)
        return user

    async def _store(self, keyspace: RedisKeyspace, user: User, token: bytes, since: int) -> None:
        payload = msgspec.msgpack.encode(_Stamped(token, user))
        try:
            filled = await keyspace.run(self._fill, self._keys(user.id), [token, payload, _ms(self.l2_ttl)])
        except ServiceUnavailable:
            self._redis_failed()
            return
        if filled and self._drops.untouched(user.id, since):
            self._users.put(user.id, (user, token))

    async def get_by_phone(self, phone: str) -> User | None:
        # Phone -> id mappings never change, so they need no versions; they are not counted.
        user_id = self._phones.get(phone)
        if user_id is None and self.keyspace is not None and self._redis_usable():
            user_id = await self._shared_phone(self.keyspace, phone)
        if user_id is not None:
            return await self.get(user_id)
        user = await self.inner.get_by_phone(phone)
        if user is not None:
            self._phones.put(phone, user.id)
            if self.keyspace is not None and self._redis_usable():
                await self._remember_phone(self.keyspace, phone, user.id)
        return user

    async def _shared_phone(self, keyspace: RedisKeyspace, phone: str) -> int | None:
        key = keyspace.key(phone, "user-id")
        try:
            raw = await keyspace.execute(lambda: keyspace.client.get(key))
        except ServiceUnavailable:
            self._redis_failed()
            return None
        if raw is None:
            return None
        self._phones.put(phone, int(raw))
        return int(raw)

    async def _remember_phone(self, keyspace: RedisKeyspace, phone: str, user_id: int) -> None:
        key, ttl = keyspace.key(phone, "user-id"), _ms(self.l2_ttl)
        try:
            await keyspace.execute(lambda: keyspace.client.set(key, user_id, px=ttl))
        except ServiceUnavailable:
            self._redis_failed()

    # -- writes --------------------------------------------------------------------------------

    async def update(
        self,
        user_id: int,
        *,
        name: str | None = None,
        role: Role | None = None,
        is_active: bool | None = None,
    ) -> User | None:
        keyspace = self.keyspace
        self._invalidate(user_id)
        if keyspace is not None:
            # Raises ServiceUnavailable before anything is written if Redis is out of reach.
            await keyspace.run(
                self._begin_write,
                self._keys(user_id),
                [keyspace.unique(), _ms(self.l2_ttl), _ms(WRITE_WINDOW), self.channel, user_id],
            )
        try:
            return await self.inner.update(user_id, name=name, role=role, is_active=is_active)
        finally:
            # Again after the write: a read of ours that overlapped it must not refill L1.
            self._invalidate(user_id)
            if keyspace is not None:
                await self._finish_write(keyspace, user_id)

    async def _finish_write(self, keyspace: RedisKeyspace, user_id: int) -> None:
        args = [keyspace.unique(), _ms(self.l2_ttl), self.channel, user_id]
        try:
            await keyspace.run(self._end_write, self._keys(user_id), args)
        except ServiceUnavailable:
            # Safe: the first step made every copy unusable and the marker blocks refills.
            log.warning("user %d: cache invalidation left to the write marker (Redis failed)", user_id)

    async def get_or_create(self, phone: str, *, name: str, role: Role) -> tuple[User, bool]:
        return await self.inner.get_or_create(phone, name=name, role=role)

    async def search(
        self, query: str, *, offset: int, limit: int, after_id: int | None
    ) -> tuple[list[User], int]:
        return await self.inner.search(query, offset=offset, limit=limit, after_id=after_id)

    async def ping(self) -> None:
        await self.inner.ping()

    # -- invalidations -------------------------------------------------------------------------

    def holds(self, user_id: int) -> bool:
        """Whether L1 holds an unexpired entry for ``user_id``, current or not (for tests)."""
        return self._users.get(user_id) is not None

    def _invalidate(self, user_id: int) -> None:
        self._drops.drop(user_id)
        self._users.pop(user_id)

    def _invalidated(self, data: bytes) -> None:
        self._invalidate(int(data))

    def _reset(self) -> None:
        self._drops.reset()
        self._users.clear()

    async def aclose(self) -> None:
        """Stop the invalidation listener if it is this cache's own (the keyspace is the caller's)."""
        if self._owns_invalidations and self.invalidations is not None:
            await self.invalidations.aclose()

    # -- helpers -------------------------------------------------------------------------------

    def _keys(self, user_id: int) -> list[str]:
        assert self.keyspace is not None
        subject = f"user:{user_id}"
        return [
            self.keyspace.key(subject, "user-version"),
            self.keyspace.key(subject, "user-writing"),
            self.keyspace.key(subject, "user"),
        ]

    def _count(self, layer: str, result: str) -> None:
        self.counters.add("user_cache", layer=layer, result=result)

    def _redis_usable(self) -> bool:
        failed_at = self._redis_failed_at
        return failed_at is None or self.clock() - failed_at >= RETRY_AFTER

    def _redis_failed(self) -> None:
        self._redis_failed_at = self.clock()
        self._count("l2", "error")


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
