"""A cached ``SessionStore``: per-request token checks without a database statement.

Every authenticated request looks its session up. Sessions change in one way that matters to an
access token: revocation (logout, refresh-token reuse, ...). So an L1 entry (in-process, short
TTL) is served only after one Redis ``EXISTS`` finds no revocation marker for it; revoking
writes that marker *before* the database, and keeps it as long as any access token of the
session can live. A process that cached the session earlier therefore refuses its tokens from
the moment the revocation returned. Without Redis (the embedded default, one process) L1 is
dropped locally on revocation.

If Redis cannot answer, reads go to the database; a revocation that cannot write its marker is
refused (ServiceUnavailable) before the database changes, so no process can keep honouring it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

import msgspec

from otpcore.adapters.cache import LruCache
from otpcore.adapters.redis import RedisKeyspace
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.ports import Rotation, RotationOutcome, Session, SessionStore


class CachedSessionStore:
    def __init__(
        self,
        inner: SessionStore,
        *,
        keyspace: RedisKeyspace | None,
        revoked_ttl: float,
        l1_size: int = 100_000,
        l1_ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.keyspace = keyspace
        # Longer than any access token of a revoked session can still be presented.
        self.revoked_ttl = revoked_ttl
        self._l1: LruCache[str, Session] = LruCache(l1_size, l1_ttl, clock)

    def _marker(self, session_id: str) -> str:
        assert self.keyspace is not None
        return self.keyspace.key(f"session:{session_id}", "revoked")

    async def get(self, session_id: str) -> Session | None:
        cached = self._l1.get(session_id)
        if cached is not None:
            if self.keyspace is None:
                return cached
            client, marker = self.keyspace.client, self._marker(session_id)
            try:
                revoked = await self.keyspace.execute(lambda: client.exists(marker))
            except ServiceUnavailable:
                return await self.inner.get(session_id)
            return msgspec.structs.replace(cached, revoked=True) if revoked else cached
        session = await self.inner.get(session_id)
        if session is not None and not session.revoked:
            self._l1.put(session_id, session)
        return session

    async def revoke(self, session_id: str) -> bool:
        await self._mark_revoked(session_id)
        return await self.inner.revoke(session_id)

    async def rotate(
        self, token_hash: bytes, new_hash: bytes, *, now: datetime, expires_at: datetime
    ) -> Rotation:
        rotation = await self.inner.rotate(token_hash, new_hash, now=now, expires_at=expires_at)
        if rotation.outcome is RotationOutcome.REUSED and rotation.session is not None:
            # The database already revoked the family; tell every process's L1.
            await self._mark_revoked(rotation.session.id)
        return rotation

    async def _mark_revoked(self, session_id: str) -> None:
        self._l1.pop(session_id)
        if self.keyspace is not None:
            client, key, ttl = self.keyspace.client, self._marker(session_id), int(self.revoked_ttl * 1000)
            await self.keyspace.execute(lambda: client.set(key, b"1", px=ttl))

    async def create(
        self, session_id: str, user_id: int, token_hash: bytes, *, now: datetime, expires_at: datetime
    ) -> Session:
        return await self.inner.create(session_id, user_id, token_hash, now=now, expires_at=expires_at)

    async def find(self, token_hash: bytes) -> Session | None:
        return await self.inner.find(token_hash)

    async def ping(self) -> None:
        await self.inner.ping()
