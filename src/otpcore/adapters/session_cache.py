"""A cached ``SessionStore``: per-request token checks without a database statement.

Every authenticated request looks its session up. Sessions change in one way that matters to an
access token: revocation (logout, refresh-token reuse, an inactive user's refresh, ...).

**With Redis.** Revoking first runs one script that sets the session's revocation marker (kept as
long as any access token of the session can live) and publishes the session id on
``{prefix}:session-revocations``, and only then revokes in the database; if Redis cannot take it
the revocation is refused (ServiceUnavailable) before the database changes, so no process can keep
honouring the session. Every process applies the message on receipt by dropping its L1 entry
(the subscription is ``cache.Invalidations``, shared with the user cache). While that
subscription is live, an L1 hit is served with no Redis call; while it is not (not yet
confirmed, or lost: L1 was emptied then), each hit is checked with one ``EXISTS`` on the marker,
as is every fill: a session read from the database enters L1 only if no marker exists and no
invalidation arrived while it was being read, so a fill cannot outlive a revocation.

**Staleness bound.** A revoked session's tokens keep working in another process until that
process receives the message — sub-millisecond on one host, and the message goes out before the
database changes (``tests/contract/test_cached_session_store.py`` measures it). A subscription
that dies empties L1 as it goes, and one that dies unnoticed is noticed by its heartbeat within
about 3 s, which empties L1 too; ``l1_ttl`` (60 s) only bounds what no message or heartbeat
could. A longer TTL than the user cache's 5 s keeps a cached profile read free of database
statements (a session changes only by revocation; a user's L1 misses go to L2 in Redis, a
session's would go to the database). The process that revoked refuses the session at once.

**Without Redis** (the embedded default, one process) L1 is dropped locally on revocation. If
Redis cannot answer, reads go to the database and nothing read then is cached.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

import msgspec

from otpcore.adapters.cache import DropLog, Invalidations, LruCache
from otpcore.adapters.redis import RedisKeyspace
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.ports import Rotation, RotationOutcome, Session, SessionStore

# KEYS: the session's revocation marker. ARGV: its TTL in ms, the revocation channel, the session id.
_REVOKE = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""


class CachedSessionStore:
    def __init__(
        self,
        inner: SessionStore,
        *,
        keyspace: RedisKeyspace | None,
        revoked_ttl: float,
        invalidations: Invalidations | None = None,
        l1_size: int = 100_000,
        l1_ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.keyspace = keyspace
        # Longer than any access token of a revoked session can still be presented.
        self.revoked_ttl = revoked_ttl
        self._l1: LruCache[str, Session] = LruCache(l1_size, l1_ttl, clock)
        # Entries dropped: a read that overlapped the drop of its entry does not fill L1.
        self._drops: DropLog[str] = DropLog()
        self.invalidations: Invalidations | None = None
        self._owns_invalidations = False
        if keyspace is not None:
            # Without one given (tests, embedding), a subscription of its own.
            self._owns_invalidations = invalidations is None
            self.invalidations = invalidations or Invalidations(keyspace)
            self.channel = self.invalidations.session_channel
            self.invalidations.watch(self.channel, self._revoked, self._reset)
            self._revoke = keyspace.script(_REVOKE)

    def _marker(self, session_id: str) -> str:
        assert self.keyspace is not None
        return self.keyspace.key(f"session:{session_id}", "revoked")

    async def get(self, session_id: str) -> Session | None:
        cached = self._l1.get(session_id)
        keyspace, invalidations = self.keyspace, self.invalidations
        if keyspace is None or invalidations is None:
            if cached is not None:
                return cached
            since = self._drops.now()
            session = await self.inner.get(session_id)
            if session is not None and not session.revoked and self._drops.untouched(session_id, since):
                self._l1.put(session_id, session)
            return session
        invalidations.start()
        if cached is not None:
            if invalidations.live:
                return cached
            try:
                revoked = await self._is_marked(keyspace, session_id)
            except ServiceUnavailable:
                return await self.inner.get(session_id)
            return msgspec.structs.replace(cached, revoked=True) if revoked else cached
        since = self._drops.now()
        session = await self.inner.get(session_id)
        if session is None or session.revoked:
            return session
        # The marker is set before the database changes: checked after the read, it catches a
        # revocation whose message came before the read began.
        try:
            revoked = await self._is_marked(keyspace, session_id)
        except ServiceUnavailable:
            return session  # nothing vouches for it: not cached
        if revoked:
            return msgspec.structs.replace(session, revoked=True)
        if self._drops.untouched(session_id, since):
            self._l1.put(session_id, session)
        return session

    async def _is_marked(self, keyspace: RedisKeyspace, session_id: str) -> bool:
        return bool(await keyspace.call("EXISTS", self._marker(session_id)))

    async def revoke(self, session_id: str) -> bool:
        await self._mark_revoked(session_id)
        try:
            return await self.inner.revoke(session_id)
        finally:
            self._drop(session_id)  # again: a read of ours that overlapped must not refill L1

    async def rotate(
        self, token_hash: bytes, new_hash: bytes, *, now: datetime, expires_at: datetime
    ) -> Rotation:
        rotation = await self.inner.rotate(token_hash, new_hash, now=now, expires_at=expires_at)
        if rotation.outcome is RotationOutcome.REUSED and rotation.session is not None:
            # The database already revoked the family; tell every process's L1.
            await self._mark_revoked(rotation.session.id)
            self._drop(rotation.session.id)
        return rotation

    async def _mark_revoked(self, session_id: str) -> None:
        self._drop(session_id)
        if self.keyspace is not None:
            keyspace, ttl = self.keyspace, round(self.revoked_ttl * 1000)
            await keyspace.run(self._revoke, [self._marker(session_id)], [ttl, self.channel, session_id])

    def _drop(self, session_id: str) -> None:
        self._drops.drop(session_id)
        self._l1.pop(session_id)

    def _revoked(self, data: bytes) -> None:
        self._drop(data.decode())

    def _reset(self) -> None:
        self._drops.reset()
        self._l1.clear()

    def holds(self, session_id: str) -> bool:
        """Whether L1 holds an unexpired entry for ``session_id`` (for tests)."""
        return self._l1.get(session_id) is not None

    async def aclose(self) -> None:
        """Stop the invalidation listener if it is this cache's own (the keyspace is the caller's)."""
        if self._owns_invalidations and self.invalidations is not None:
            await self.invalidations.aclose()

    async def create(
        self, session_id: str, user_id: int, token_hash: bytes, *, now: datetime, expires_at: datetime
    ) -> Session:
        return await self.inner.create(session_id, user_id, token_hash, now=now, expires_at=expires_at)

    async def find(self, token_hash: bytes) -> Session | None:
        return await self.inner.find(token_hash)

    async def ping(self) -> None:
        await self.inner.ping()
