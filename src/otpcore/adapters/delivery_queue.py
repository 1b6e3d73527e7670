"""Durable SMS delivery: a Redis Stream of encrypted jobs and the worker that posts them.

``QueuedCodeSender.send`` appends one job to the stream ``{prefix}:{deliveries}`` (trimmed to
about ``max_len``) and returns: the send-otp request waits on one XADD, never on the provider.
The job holds the number, the code's expiry and the SMS text *encrypted* (AES-256-GCM, a key
derived from the code HMAC key with HKDF under a label of its own, a fresh 96-bit nonce per job,
the number as associated data): no code ever sits in Redis in plain text.

``DeliveryWorker`` runs in every server process, all in the consumer group ``sms`` of that
stream, through the event stream's ``ConsumerGroup`` (at least once: an entry read stays pending
until acknowledged, entries pending at a dead process are taken over by XAUTOCLAIM once idle
``min_idle`` seconds). Each job is decrypted and posted through ``WebhookCodeSender`` with
retries until the code expires (the job id is the webhook id, so a receiver can drop a repeat),
then acknowledged: after delivery, or after the final failure, which is counted and emitted as
``otp:delivery_failed``. A job whose code expired before it was posted is dropped the same way
(reason ``expired``). Jobs being worked on are kept from looking idle (a periodic XCLAIM of their
ids by their own consumer), so a slow delivery is not taken over while its process lives.

The sender declares ``counts_own_deliveries``: AuthService then counts nothing for a send (the
worker counts ``otp_deliveries{result,country}`` once the provider answered).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.typing import StreamIdT

from otpcore.adapters.event_stream import Backoff, Entry, EventStream, GroupWorker
from otpcore.adapters.redis import RedisEventBus, RedisKeyspace
from otpcore.adapters.webhooks import DeliveryFailed, WebhookCodeSender
from otpcore.domain import events as ev
from otpcore.domain.events import Event
from otpcore.domain.ports import Counters, EventBus

log = logging.getLogger("otpcore.delivery")

STREAM = "deliveries"
JOB = "otp:delivery_job"  # the stream's entries are jobs, never published as domain events
_KEY_LABEL = b"otp-server sms delivery queue v1"


class JobCipher:
    """AES-256-GCM under a key derived from the code HMAC key; associated data: the number."""

    def __init__(self, secret: bytes) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_LABEL).derive(secret)
        self._aead = AESGCM(key)

    def seal(self, phone: str, message: str) -> tuple[str, str]:
        """(nonce, ciphertext), base64: a fresh random 96-bit nonce each time."""
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, message.encode(), phone.encode())
        return base64.b64encode(nonce).decode(), base64.b64encode(sealed).decode()

    def open(self, phone: str, nonce: str, sealed: str) -> str:
        """The message; raises ValueError if it was not sealed for ``phone`` under this key."""
        try:
            raw = base64.b64decode(nonce, validate=True), base64.b64decode(sealed, validate=True)
            return self._aead.decrypt(raw[0], raw[1], phone.encode()).decode()
        except (InvalidTag, binascii.Error, UnicodeDecodeError) as exc:
            raise ValueError("undecryptable delivery job") from exc


class QueuedCodeSender:
    """A CodeSender that queues the SMS in Redis for ``DeliveryWorker`` (see the module doc)."""

    # AuthService awaits ``send`` (an enqueue) and leaves counting and failure events to the worker.
    counts_own_deliveries = True

    def __init__(
        self,
        keyspace: RedisKeyspace,
        cipher: JobCipher,
        *,
        ttl: float,
        max_len: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stream = RedisEventBus(keyspace, stream=STREAM, max_len=max_len)
        self.cipher = cipher
        self.ttl = ttl
        self.clock = clock

    async def send(self, phone: str, code: str, message: str) -> None:
        """Queue ``message`` (which holds ``code``, encrypted) for ``phone``; returns once stored."""
        nonce, sealed = self.cipher.seal(phone, message)
        job = Event(
            event_type=JOB,
            data={
                "phone_number": phone,
                "expires_at": self.clock() + self.ttl,
                "nonce": nonce,
                "message": sealed,
            },
        )
        await self.stream.publish(job)

    async def aclose(self) -> None:
        pass  # the keyspace belongs to the container


class DeliveryWorker(GroupWorker):
    """This process's consumer of the delivery queue (consumer group ``sms``)."""

    GROUP = "sms"
    TASK_NAME = "sms-delivery-worker"

    def __init__(
        self,
        stream: EventStream,
        sender: WebhookCodeSender,
        cipher: JobCipher,
        *,
        events: EventBus,
        counters: Counters | None = None,
        country_of: Callable[[str], str] = lambda phone: "ZZ",
        group: str = GROUP,
        consumer: str | None = None,
        min_idle: float = 10.0,
        concurrency: int = 32,
        grace: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(stream, stream.group(group, consumer, min_idle=min_idle), grace=grace)
        self.sender = sender
        self.cipher = cipher
        self.events = events
        self.counters = counters
        self.country_of = country_of
        self.clock = clock
        self._slots = asyncio.Semaphore(concurrency)
        # Read and not yet acknowledged (kept from looking idle), and handled but not acknowledged.
        self._held: set[str] = set()
        self._done: set[str] = set()
        self._jobs: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Deliver until cancelled; Redis outages are waited out, never raised."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._keep_held_busy())
            backoff = Backoff()
            while not self._stopping.is_set():
                try:
                    async with contextlib.aclosing(self.group.deliveries(from_start=True)) as entries:
                        async for entry in entries:
                            backoff.reset()
                            if entry.id in self._done:  # handled; its acknowledgement failed
                                await self._ack(entry.id)
                                continue
                            if entry.id in self._held or self._stopping.is_set():
                                continue
                            self._held.add(entry.id)
                            await self._slots.acquire()
                            job = tasks.create_task(self._handle(entry))
                            self._jobs.add(job)
                            job.add_done_callback(self._jobs.discard)
                except Exception as exc:
                    reason = type(exc).__name__
                    log.warning("SMS delivery queue: %s; retrying in %.1fs", reason, backoff.delay)
                    await backoff.wait()

    async def _handle(self, entry: Entry) -> None:
        try:
            if entry.event is not None:
                await self._deliver(entry.event)
            self._done.add(entry.id)
            await self._ack(entry.id)
        except Exception as exc:
            # Left pending: taken over (by any consumer, this one too) once idle min_idle seconds.
            log.warning("SMS delivery job %s left pending: %s", entry.id, type(exc).__name__)
        finally:
            self._held.discard(entry.id)
            self._slots.release()

    async def _ack(self, entry_id: str) -> None:
        backoff = Backoff(first=0.2, cap=2.0)
        for attempt in range(4):
            try:
                await self.group.ack(entry_id)
                self._done.discard(entry_id)
                return
            except Exception:
                if attempt == 3:
                    raise
                await backoff.wait()

    async def _deliver(self, job: Event) -> None:
        data = job.data
        phone = str(data.get("phone_number", ""))
        try:
            expires_at = float(data["expires_at"])
            message = self.cipher.open(phone, str(data["nonce"]), str(data["message"]))
        except (KeyError, TypeError, ValueError):
            log.error("dropping an SMS delivery job that cannot be read (key changed?)")
            await self._failed(phone, "undecryptable", result="failed")
            return
        remaining = expires_at - self.clock()
        if remaining <= 0:
            await self._failed(phone, "expired", result="expired")
            return
        try:
            await self.sender.deliver(
                phone, message, give_up_after=remaining, message_id=f"msg_{job.event_id}"
            )
        except Exception as exc:
            detail = str(exc) if isinstance(exc, DeliveryFailed) else type(exc).__name__
            log.warning("code delivery to %s failed: %s", phone, detail)
            await self._failed(phone, type(exc).__name__, result="failed")
            return
        self._count("delivered", phone)

    async def _failed(self, phone: str, reason: str, *, result: str) -> None:
        # Published before the acknowledgement: if Redis is down the job stays pending, not lost.
        await self.events.publish(
            Event(event_type=ev.OTP_DELIVERY_FAILED, data={"phone_number": phone, "reason": reason})
        )
        self._count(result, phone)

    def _count(self, result: str, phone: str) -> None:
        if self.counters is not None:
            self.counters.add("otp_deliveries", result=result, country=self.country_of(phone))

    async def _keep_held_busy(self) -> None:
        """Reset the idle time of the jobs read here, so no other process takes them over."""
        client, key = self.stream.keyspace.client, self.stream.key
        while not self._stopping.is_set():
            await asyncio.sleep(self.group.min_idle / 3)
            if not self._held:
                continue
            ids: list[StreamIdT] = [*self._held]
            touch = functools.partial(
                client.xclaim,
                key,
                self.group.name,
                self.group.consumer,
                0,
                ids,
                justid=True,
            )
            try:
                await self.stream.keyspace.execute(touch)
            except Exception as exc:
                log.warning("SMS delivery queue: keeping jobs claimed failed: %s", type(exc).__name__)

    def _in_flight(self, reader: asyncio.Task[None]) -> set[asyncio.Task[None]]:
        return set(self._jobs)

    async def _close(self) -> None:
        await self.sender.aclose()
