"""A cached ``UserRepo``: L1 in-process (bounded LRU, short TTL) and L2 Redis in front of the database.

Reads (``get``, ``get_by_phone``) go L1 → L2 → the wrapped repo; a miss fills both. Search, creation
and ``ping`` pass through: misses are never cached and ids are never reused, so creating a user
leaves nothing to invalidate, and a phone number never changes, so phone → id mappings need none.

**Versions.** Redis holds a version token per user (``{prefix}:{user:<id>}:user-version``, random
and never reused, created on first read). Every L1 entry and every L2 entry carries the token it
was read under, and an L1 entry is served only after one Redis script confirms the token is still
current; that script returns just the token when it matches, so a cached read costs one small Redis
round trip and no database statement. Pub/sub (``{prefix}:user-invalidations``) makes every
process drop its L1 entry at once, but correctness never waits for it: a process that has not yet
received the message still finds its token outdated. The listener holds one pooled Redis
connection per process and resubscribes by itself after Redis restarts.

**Writes.** ``update`` first replaces the token and raises the user's "writing" marker (which
refuses refills of L1 and L2 for ``WRITE_WINDOW`` seconds), then writes the database, then
replaces the token again, lowers the marker, deletes the L2 entry and publishes. If the first
step fails (Redis down) the update is refused with ServiceUnavailable before the database is
touched: another process that still reaches Redis could otherwise serve the old user. If the
last step fails the update still succeeds: every cached copy was already made unusable, and no
copy can be refilled until the marker expires, by which time the database holds the new row.

**Staleness bound.** With Redis: none. A read that starts after an update's response, in any
process sharing the Redis, returns the updated user (provided the database write took less than
``WRITE_WINDOW``, and Redis keeps the marker that long: it is a volatile key an eviction policy
could drop). Without Redis (``keyspace=None``, the embedded default): exact within one process,
which drops its entry before the update returns; other processes on the same database see a
change after at most ``l1_ttl`` seconds.

**Redis down.** Reads skip both layers (an L1 entry cannot be validated) and go to the database,
counted as ``result="error"``; for ``RETRY_AFTER`` seconds after a failure they do not even try, so
an outage costs the database a little load and no latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec

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

# ARGV: a fresh token, its TTL in ms, the marker's TTL in ms.
_BEGIN_WRITE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('DEL', KEYS[3])
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
        # Bumped by every local write: a read that overlapped one does not fill L1 (no Redis).
        self._writes = 0
        self._redis_failed_at: float | None = None
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        self._decoder = msgspec.msgpack.Decoder(_Stamped)
        if keyspace is not None:
            self.channel = f"{keyspace.prefix}:user-invalidations"
            self._read = keyspace.script(_READ)
            self._fill = keyspace.script(_FILL)
            self._begin_write = keyspace.script(_BEGIN_WRITE)
            self._end_write = keyspace.script(_END_WRITE)

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, user_id: int) -> User | None:
        if self.keyspace is None:
            return await self._get_local(user_id)
        self._listen()
        if not self._redis_usable():
            self._count("l2", "error")
            return await self.inner.get(user_id)
        return await self._get_shared(self.keyspace, user_id)

    async def _get_local(self, user_id: int) -> User | None:
        cached = self._users.get(user_id)
        if cached is not None:
            self._count("l1", "hit")
            return cached[0]
        self._count("l1", "miss")
        writes = self._writes
        user = await self.inner.get(user_id)
        if user is not None and writes == self._writes:
            self._users.put(user_id, (user, b""))
        return user

    async def _get_shared(self, keyspace: RedisKeyspace, user_id: int) -> User | None:
        cached = self._users.get(user_id)
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
                self._users.put(user_id, (stored.user, token))
                return stored.user
        self._count("l2", "miss")
        user = await self.inner.get(user_id)
        if user is not None and not writing:
            await self._store(keyspace, user, token)
        return user

    async def _store(self, keyspace: RedisKeyspace, user: User, token: bytes) -> None:
        payload = msgspec.msgpack.encode(_Stamped(token, user))
        try:
            filled = await keyspace.run(self._fill, self._keys(user.id), [token, payload, _ms(self.l2_ttl)])
        except ServiceUnavailable:
            self._redis_failed()
            return
        if filled:
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
        if keyspace is not None:
            self._listen()
            # Raises ServiceUnavailable before anything is written if Redis is out of reach.
            await keyspace.run(
                self._begin_write,
                self._keys(user_id),
                [keyspace.unique(), _ms(self.l2_ttl), _ms(WRITE_WINDOW)],
            )
        try:
            return await self.inner.update(user_id, name=name, role=role, is_active=is_active)
        finally:
            self._writes += 1
            self._users.pop(user_id)
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

    # -- invalidation listener -----------------------------------------------------------------

    def holds(self, user_id: int) -> bool:
        """Whether L1 holds an unexpired entry for ``user_id``, current or not (for tests)."""
        return self._users.get(user_id) is not None

    def _listen(self) -> None:
        """Start the pub/sub listener on first use: ``build_core`` runs outside any event loop."""
        if self._listener is None and self.keyspace is not None:
            self._listener = asyncio.get_running_loop().create_task(
                self._run_listener(self.keyspace), name="user-cache-invalidations"
            )

    async def _run_listener(self, keyspace: RedisKeyspace) -> None:
        delay = LISTEN_BACKOFF[0]
        while not self._closing:
            pubsub = keyspace.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                delay = LISTEN_BACKOFF[0]
                while not self._closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        with contextlib.suppress(ValueError):
                            self._users.pop(int(message["data"]))
            except Exception as exc:  # whatever cut the subscription, subscribe again
                log.info("user cache listener lost Redis (%s); resubscribing", type(exc).__name__)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            # Invalidations published while unsubscribed are lost to us: start L1 afresh.
            self._users.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_BACKOFF[1])

    async def aclose(self) -> None:
        """Stop the invalidation listener (the keyspace belongs to the caller)."""
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
