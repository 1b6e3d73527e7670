"""Consumers of the event stream that ``RedisEventBus`` appends to.

``EventStream`` follows the stream (``otp-server events tail``); ``ConsumerGroup`` reads it
through a Redis consumer group, at least once: an entry read is pending until acknowledged, a
consumer starts with its own pending entries, and entries left pending by a consumer that died
are claimed (XAUTOCLAIM) once idle long enough. ``EventForwarder`` is the group ``webhooks``
that POSTs every event to EVENTS_WEBHOOK_URL.

Nothing here buffers an event in memory: the stream is the only buffer. The domain appends a
request's events (an awaited XADD) before the response acknowledges the request, and a consumer
acknowledges an entry only after handling it, so stopping or crashing at any moment loses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from redis import exceptions as rex

from otpcore.adapters.redis import RedisEventBus, RedisKeyspace
from otpcore.adapters.webhooks import WebhookPoster
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.events import Event

log = logging.getLogger("otpcore.events")

# How long a read waits for new entries: short, so stopping and claiming are never far off.
BLOCK = 2.0
BATCH = 100


def default_consumer_name() -> str:
    """hostname-pid: unique per process, and says where a pending entry is stuck."""
    return f"{socket.gethostname()}-{os.getpid()}"


def event_document(event: Event) -> dict[str, Any]:
    """The wire shape of an event: ``{"event_id", "event_type", "timestamp", "data"}``."""
    return {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "timestamp": event.timestamp,
        "data": event.data,
    }


class Entry(msgspec.Struct, frozen=True):
    id: str
    # None when the stream no longer holds the entry (trimmed) or it is not an event.
    event: Event | None


class Backoff:
    """Exponential waits between retries, reset by a success."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)


class EventStream:
    """The reading side of the event stream, with blocking reads of at most ``block`` seconds."""

    def __init__(
        self,
        keyspace: RedisKeyspace,
        *,
        stream: str = "events",
        block: float = BLOCK,
        count: int = BATCH,
        owns_keyspace: bool = False,
    ) -> None:
        self.keyspace = keyspace
        self.key = RedisEventBus(keyspace, stream=stream).stream
        self.block = block
        self.count = count
        self._owns_keyspace = owns_keyspace
        self._decoder = msgspec.json.Decoder(Event)

    @classmethod
    def connect(
        cls, url: str, *, cluster: bool, prefix: str, stream: str, block: float = BLOCK
    ) -> EventStream:
        """A stream on a Redis client of its own.

        A blocking read holds its connection for up to ``block`` seconds: on the service's pool
        it would take a connection from the requests, and outlast the pool's read timeout.
        """
        keyspace = RedisKeyspace.from_url(
            url, cluster=cluster, prefix=prefix, pool_size=2, timeout=block + 2.0
        )
        return cls(keyspace, stream=stream, block=block, owns_keyspace=True)

    def group(self, name: str, consumer: str | None = None, *, min_idle: float = 30.0) -> ConsumerGroup:
        return ConsumerGroup(self, name, consumer or default_consumer_name(), min_idle=min_idle)

    async def follow(self, *, from_start: bool = False) -> AsyncIterator[Entry]:
        """Entries appended from now on (or all the stream holds), forever; Redis outages waited out."""
        backoff = Backoff()
        after: str | None = "0-0" if from_start else None
        while True:
            try:
                if after is None:
                    after = await self.last_id()
                batch = await self.read(after)
            except ServiceUnavailable:
                log.warning("Redis unavailable; reading the event stream again in %.1fs", backoff.delay)
                await backoff.wait()
                continue
            backoff.reset()
            for entry in batch:
                yield entry
                after = entry.id

    async def last_id(self) -> str:
        client = self.keyspace.client
        newest = await self.keyspace.execute(lambda: client.xrevrange(self.key, count=1))
        return _text(newest[0][0]) if newest else "0-0"

    async def read(self, after: str) -> list[Entry]:
        """Entries after ``after``, waiting up to ``block`` seconds for one."""
        client = self.keyspace.client
        block = _ms(self.block)
        reply = await self.keyspace.execute(
            lambda: client.xread({self.key: after}, count=self.count, block=block)
        )
        return self.entries(reply)

    def entries(self, reply: Any) -> list[Entry]:
        """The entries of an XREAD or XREADGROUP reply (a RESP2 list or a RESP3 map)."""
        if isinstance(reply, dict):
            return [e for rows in reply.values() for e in self.decode_rows(rows[0] if rows else [])]
        return [e for _, rows in reply or [] for e in self.decode_rows(rows)]

    def decode_rows(self, rows: list[tuple[bytes, dict[bytes, bytes] | None]]) -> list[Entry]:
        return [Entry(_text(entry_id), self._decode(fields)) for entry_id, fields in rows if entry_id]

    def _decode(self, fields: dict[bytes, bytes] | None) -> Event | None:
        raw = (fields or {}).get(RedisEventBus.FIELD)
        if raw is None:
            return None
        try:
            return self._decoder.decode(raw)
        except msgspec.DecodeError:
            log.error("skipping a stream entry that is not an event")
            return None

    async def aclose(self) -> None:
        if self._owns_keyspace:
            await self.keyspace.aclose()


class ConsumerGroup:
    """One consumer of a consumer group on the event stream: at-least-once delivery."""

    def __init__(self, stream: EventStream, name: str, consumer: str, *, min_idle: float = 30.0) -> None:
        self.stream = stream
        self.name = name
        self.consumer = consumer
        # Entries pending this long at another consumer are taken over: it is presumed dead.
        self.min_idle = min_idle
        # True from reading an entry until it is acknowledged (see EventForwarder.stop).
        self.handling = False

    async def create(self, *, from_start: bool) -> None:
        """Create the group (and the stream) unless it exists: from the first entry, or from now."""
        client, key = self.stream.keyspace.client, self.stream.key
        try:
            await self.stream.keyspace.execute(
                lambda: client.xgroup_create(key, self.name, id="0" if from_start else "$", mkstream=True)
            )
        except rex.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def deliveries(self, *, from_start: bool = True) -> AsyncGenerator[Entry, None]:
        """This consumer's pending entries, then forever: entries of dead consumers, new entries."""
        await self.create(from_start=from_start)
        after = "0"
        while batch := await self._read(after, block=None):
            for entry in batch:
                yield entry
            after = batch[-1].id
        next_claim = 0.0
        while True:
            if time.monotonic() >= next_claim:
                async for entry in self._claim():
                    yield entry
                next_claim = time.monotonic() + self.min_idle
            for entry in await self._read(">", block=self.stream.block):
                yield entry

    async def run(
        self,
        handle: Callable[[Event], Awaitable[object]],
        *,
        stopping: asyncio.Event | None = None,
        from_start: bool = True,
        give_up_on: tuple[type[Exception], ...] = (),
    ) -> None:
        """Hand each event to ``handle`` and acknowledge it once ``handle`` returned.

        Until ``stopping`` is set, or ``handle`` raises one of ``give_up_on``. Any other failure
        (Redis down, ``handle`` failing) leaves the entry pending and starts again, after a
        backoff, from this consumer's pending entries: in order, nothing skipped.
        """
        stopping = stopping or asyncio.Event()
        backoff = Backoff()
        while not stopping.is_set():
            try:
                async with contextlib.aclosing(self.deliveries(from_start=from_start)) as entries:
                    async for entry in entries:
                        self.handling = True
                        try:
                            if entry.event is not None:
                                await handle(entry.event)
                            await self.ack(entry.id)
                        finally:
                            self.handling = False
                        backoff.reset()
                        if stopping.is_set():
                            return
            except give_up_on:
                raise
            except Exception as exc:
                cause = exc.__cause__ if isinstance(exc, ServiceUnavailable) else exc
                reason = f"{type(exc).__name__} ({type(cause).__name__}: {cause})"
                log.warning("consumer group %s: %s; retrying in %.1fs", self.name, reason, backoff.delay)
                await backoff.wait()

    async def ack(self, *ids: str) -> None:
        client, key = self.stream.keyspace.client, self.stream.key
        await self.stream.keyspace.execute(lambda: client.xack(key, self.name, *ids))

    async def leave(self) -> None:
        """Remove this consumer from the group if nothing is pending at it (names are per process)."""
        client, key = self.stream.keyspace.client, self.stream.key
        pending = await self.stream.keyspace.execute(
            lambda: client.xpending_range(key, self.name, "-", "+", 1, consumername=self.consumer)
        )
        if not pending:
            await self.stream.keyspace.execute(
                lambda: client.xgroup_delconsumer(key, self.name, self.consumer)
            )

    async def _read(self, after: str, *, block: float | None) -> list[Entry]:
        client, key = self.stream.keyspace.client, self.stream.key
        reply = await self.stream.keyspace.execute(
            lambda: client.xreadgroup(
                self.name,
                self.consumer,
                {key: after},
                count=self.stream.count,
                block=None if block is None else _ms(block),
            )
        )
        return self.stream.entries(reply)

    async def _claim(self) -> AsyncIterator[Entry]:
        client, key = self.stream.keyspace.client, self.stream.key
        start = "0-0"
        while True:
            claim = functools.partial(
                client.xautoclaim,
                key,
                self.name,
                self.consumer,
                _ms(self.min_idle),
                start,
                count=self.stream.count,
            )
            reply = await self.stream.keyspace.execute(claim)
            # Entries trimmed from the stream leave the pending list by themselves (third part).
            claimed = self.stream.decode_rows(reply[1])
            if claimed:
                log.info("consumer group %s: took over %d idle entries", self.name, len(claimed))
            for entry in claimed:
                yield entry
            start = _text(reply[0])
            if start == "0-0":
                return


class GroupWorker:
    """A background reader of one consumer group: started once, stopped with a grace period.

    ``stop`` lets the work in flight finish for up to ``grace`` seconds, then cancels the reader
    and leaves the group; what was not acknowledged stays pending for another consumer. Each of
    its waits is bounded by ``grace``.
    """

    TASK_NAME = "stream-worker"

    def __init__(self, stream: EventStream, group: ConsumerGroup, *, grace: float) -> None:
        self.stream = stream
        self.group = group
        self.grace = grace
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=self.TASK_NAME)

    async def run(self) -> None:
        raise NotImplementedError

    def _in_flight(self, reader: asyncio.Task[None]) -> set[asyncio.Task[None]]:
        """Tasks worth waiting for on stop (``reader`` is the task of ``run``)."""
        return set()

    async def _close(self) -> None:
        """Release what the subclass holds, after the reader stopped."""

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._stopping.set()
        if task is not None:
            in_flight = self._in_flight(task)
            if in_flight:
                await asyncio.wait(in_flight, timeout=self.grace)
            task.cancel()
            # Bounded too: a reader that swallowed the cancellation must not hold up shutdown.
            await asyncio.wait({task}, timeout=self.grace)
            if not task.done():
                log.warning("%s did not stop within %.1fs; left behind", self.TASK_NAME, self.grace)
            elif not task.cancelled():
                task.result()  # raises what ended the reader, as awaiting it did
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.grace):
                    await self.group.leave()
        await self._close()
        await self.stream.aclose()


class EventForwarder(GroupWorker):
    """POSTs every event of the stream to EVENTS_WEBHOOK_URL, signed (Standard Webhooks).

    Every server process runs one, all in the consumer group ``webhooks``: each event is
    forwarded by one of them, at least once. An entry is acknowledged only after a 2xx answer;
    until then it stays pending in the stream, to be retried by this process or taken over by
    another once idle ``min_idle`` seconds. There is no in-process buffer, so nothing needs
    flushing on shutdown: ``stop`` lets the post in flight finish (for up to ``grace`` seconds)
    or leaves it pending. Receivers tell redeliveries apart by ``event_id``.
    """

    GROUP = "webhooks"
    TASK_NAME = "event-forwarder"

    def __init__(
        self,
        stream: EventStream,
        poster: WebhookPoster,
        *,
        group: str = GROUP,
        consumer: str | None = None,
        min_idle: float = 30.0,
        give_up_after: float = 20.0,
        grace: float = 5.0,
    ) -> None:
        super().__init__(stream, stream.group(group, consumer, min_idle=min_idle), grace=grace)
        self.poster = poster
        # Below min_idle: a post that keeps failing lets go before another process takes over.
        self.give_up_after = give_up_after

    async def run(self) -> None:
        """Forward until stopped; outages of Redis or the receiver are waited out, never raised."""
        # From the first entry: a group created now forwards what the stream already holds.
        await self.group.run(self._post, stopping=self._stopping, from_start=True)

    async def _post(self, event: Event) -> None:
        # The event id is the message id: a redelivered event keeps it, so receivers can dedupe.
        await self.poster.post(
            event_document(event), give_up_after=self.give_up_after, message_id=f"msg_{event.event_id}"
        )

    def _in_flight(self, reader: asyncio.Task[None]) -> set[asyncio.Task[None]]:
        # A post under way: wait for the reader itself to finish handling it.
        return {reader} if self.group.handling else set()

    async def _close(self) -> None:
        await self.poster.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
