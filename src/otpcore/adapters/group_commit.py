"""Group commit: the calls that arrive while one is in flight go together in the next.

A store that charges per statement rather than per row (a commit waiting for its log flush, a
round trip, a script call) is called through a ``GroupCommit``: the first call of an idle one
goes at once, and those that arrive while it is in flight queue and go together, in order, when
it returns. Nothing waits to fill a batch, so a quiet process pays no latency; under load one
statement serves many requests. Each caller gets its own item's result once the batch holding it
is stored: what a caller is told was stored, was.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

from otpcore.domain.errors import ServiceUnavailable

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupCommit(Generic[Item, Result]):
    """Runs ``store`` on batches of submitted items; ``store`` returns one result per item, in
    order. A batch weighs at most ``max_weight`` (each item ``weight``; one heavier item goes
    alone) and holds no two items of one ``key``: the later waits for the next batch, so a
    statement never meets the same row twice."""

    def __init__(
        self,
        store: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        *,
        max_weight: int,
        weight: Callable[[Item], int] | None = None,
        key: Callable[[Item], Hashable] | None = None,
        stopped: str = "stopped before the write was confirmed",
    ) -> None:
        if max_weight < 1:
            raise ValueError("max_weight must be at least 1")
        self.store = store
        self.max_weight = max_weight
        self.weight = weight
        self.key = key
        self.stopped = stopped
        self._queued: collections.deque[tuple[Item, asyncio.Future[Result]]] = collections.deque()
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        """``item``'s result, once the batch holding it is stored."""
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[Result] = loop.create_future()
        self._queued.append((item, stored))
        if self._runner is None or self._runner.done() or self._runner.get_loop() is not loop:
            # A context of its own: the batches it stores are no one request's (trace, log ids).
            self._runner = asyncio.create_task(self._run(), context=contextvars.Context())
        return await stored

    def _take(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        """The next batch, in order. Callers that gave up, or wait on another (closed) event loop,
        are dropped: nobody would hear that their item was stored."""
        loop = asyncio.get_running_loop()
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        later: list[tuple[Item, asyncio.Future[Result]]] = []
        keys: set[Hashable] = set()
        total = 0
        try:
            # Items held back for their key are counted too, so a queue of one key's items is
            # not scanned whole for every batch.
            while self._queued and len(later) < self.max_weight:
                item, stored = self._queued[0]
                if stored.done() or stored.get_loop() is not loop:
                    self._queued.popleft()
                    continue
                weight = 1 if self.weight is None else self.weight(item)
                if batch and total + weight > self.max_weight:
                    break
                if self.key is not None:
                    key = self.key(item)
                    if key in keys:
                        later.append(self._queued.popleft())
                        continue
                    keys.add(key)
                batch.append(self._queued.popleft())
                total += weight
        except BaseException:
            later = batch + later  # back in the queue, to hear why the runner stopped
            batch = []
            raise
        finally:
            self._queued.extendleft(reversed(later))
        return batch

    async def _run(self) -> None:
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        try:
            while batch := self._take():
                try:
                    results = await self.store([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
                except Exception as exc:
                    if isinstance(exc, ServiceUnavailable):
                        # Those queued meanwhile hear it too, rather than each waiting out a
                        # timeout of its own, batch after batch; a later call tries afresh.
                        batch += self._queued
                        self._queued.clear()
                    _fail(batch, exc)
                else:
                    for (_, stored), result in zip(batch, results, strict=True):  # checked above
                        if not stored.done():
                            stored.set_result(result)
                batch = []
        finally:
            # Cancelled (shutdown): the batch in flight may or may not have been stored.
            stranded = batch + list(self._queued)
            self._queued.clear()
            if stranded:
                _fail(stranded, ServiceUnavailable(self.stopped))

    async def drain(self) -> None:
        """Wait for the batches in flight (on shutdown); cancelling the wait leaves them be."""
        if self._runner is not None and not self._runner.done():
            await asyncio.wait([self._runner])

    async def aclose(self) -> None:
        """Stop: a batch still in flight is cancelled, its callers told so."""
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            await asyncio.wait([self._runner])


def _fail(batch: Sequence[tuple[object, asyncio.Future[Result]]], error: Exception) -> None:
    """Fail each waiting caller of ``batch`` with a ServiceUnavailable of its own (one exception
    object raised in many requests would gather all their tracebacks)."""
    message: str | None = None
    cause: BaseException | None = error
    if isinstance(error, ServiceUnavailable):
        message, cause = error.message, error.__cause__
    for _, stored in batch:
        if stored.done():
            continue  # its caller gave up
        own = ServiceUnavailable(message)
        own.__cause__ = cause
        stored.set_exception(own)
