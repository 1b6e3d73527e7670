"""The durable SMS queue (QueuedCodeSender + DeliveryWorker) on real Redis and a real receiver."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterator

import pytest

from otpcore import Settings, build_core
from otpcore.adapters.delivery_queue import STREAM, DeliveryWorker, JobCipher, QueuedCodeSender
from otpcore.adapters.event_stream import EventStream
from otpcore.adapters.memory import MemoryCounters, MemoryEventBus
from otpcore.adapters.redis import RedisEventBus, RedisKeyspace
from otpcore.adapters.webhooks import WebhookCodeSender, WebhookPoster, WebhookSigner
from tests.backends.redis import redis_url
from tests.integration.test_event_forwarder import Answers
from tests.integration.test_webhook_sender import SECRET, Receiver, verify_standard_webhook

PHONE = "+14155550123"
CIPHER = JobCipher(b"k" * 32)
# Letters: a code can never be mistaken for the digits of a stream id or a timestamp.
CHARSET = "ABCDEFGHJKLMNPQRSTUVWXYZ"


class Hook:
    def __init__(self, status: Callable[[int], int], first_delay: float = 0.0) -> None:
        self.answers = Answers(status)
        self.receiver = Receiver(self.answers, first_delay)  # type: ignore[arg-type]
        self.url = self.receiver.url

    @property
    def requests(self) -> list[tuple[dict[str, str], bytes, int]]:
        done = list(self.receiver.requests)
        return [(h, b, self.answers.given[n]) for n, (h, b, *_) in enumerate(done)]

    def accepted(self) -> list[tuple[dict[str, str], bytes, int]]:
        return [r for r in self.requests if r[2] < 300]

    async def wait(self, until: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


@pytest.fixture
def hook_factory() -> Iterator[Callable[..., Hook]]:
    hooks: list[Hook] = []

    def make(status: Callable[[int], int], first_delay: float = 0.0) -> Hook:
        hooks.append(Hook(status, first_delay))
        return hooks[-1]

    yield make
    for hook in hooks:
        hook.receiver.close()


def worker(
    keyspace: RedisKeyspace,
    url: str,
    consumer: str,
    *,
    events: MemoryEventBus,
    counters: MemoryCounters,
    min_idle: float = 0.5,
) -> DeliveryWorker:
    poster = WebhookPoster(url, WebhookSigner(SECRET), timeout=3.0, first_backoff=0.05)
    return DeliveryWorker(
        EventStream(keyspace, stream=STREAM, block=0.2),
        WebhookCodeSender(poster, give_up_after=30),
        CIPHER,
        events=events,
        counters=counters,
        country_of=lambda phone: "US",
        consumer=consumer,
        min_idle=min_idle,
        grace=1.0,
    )


async def pending(keyspace: RedisKeyspace) -> int:
    key = RedisEventBus(keyspace, stream=STREAM).stream
    return int((await keyspace.client.xpending(key, DeliveryWorker.GROUP))["pending"])


async def everything_under(keyspace: RedisKeyspace) -> bytes:
    """Every key and value under the keyspace's prefix, dumped into one byte string."""
    client, dump = keyspace.client, []
    async for key in client.scan_iter(match=f"{keyspace.prefix}:*", count=1000):
        kind = await client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        value: object
        if kind == "string":
            value = await client.get(key)
        elif kind == "hash":
            value = await client.hgetall(key)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "set":
            value = await client.smembers(key)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        else:
            assert kind == "stream", kind
            value = await client.xrange(key)
        dump.append(repr((key, value)).encode())
    return b"\n".join(dump)


def failed_events(events: MemoryEventBus) -> list[dict[str, object]]:
    return [e.data for e in events.events if e.event_type == "otp:delivery_failed"]


async def test_the_service_queues_and_delivers_once_signed_with_no_plain_code_in_redis(
    redis_keyspace, hook_factory
) -> None:
    hook = hook_factory(lambda n: 200)
    settings = Settings(
        db_provider="memory",
        otp_sender="webhook",
        sms_webhook_url=hook.url,
        sms_webhook_secret=SECRET,
        redis_url=redis_url(),
        otp_redis_key_prefix=redis_keyspace.prefix,
        otp_code_charset=CHARSET,
        otp_length=8,
        jwt_secret="q" * 40,
    )
    core = build_core(settings)
    assert isinstance(core.container.code_sender(), QueuedCodeSender)
    await core.start()
    try:
        await core.auth.send_code(PHONE)
        await hook.wait(lambda: len(hook.accepted()) == 1)
        await asyncio.sleep(0.3)  # a second delivery would show up here
        stored = await everything_under(redis_keyspace)
        metrics = core.telemetry.render().decode()
        assert await pending(redis_keyspace) == 0
    finally:
        await core.aclose()

    [(headers, body, _)] = hook.requests
    assert verify_standard_webhook(headers, body)
    payload = json.loads(body)
    assert payload["phone_number"] == PHONE
    code = re.search(rf"\b[{CHARSET}]{{8}}\b", payload["message"])
    assert code is not None, payload
    assert f":{{{STREAM}}}".encode() in stored, "the job is in the stream"
    assert code.group().encode() not in stored, "a plain code sits in Redis"
    assert b"sign-in code" not in stored, "the SMS text sits in Redis unencrypted"
    # Counted once, by the worker, as delivered (AuthService counts nothing for a queued send).
    series = re.findall(r"otp_deliveries_total\{([^}]*)\} (\S+)", metrics)
    assert [(re.findall(r'(?:country|result)="\w+"', labels), n) for labels, n in series] == [
        (['country="US"', 'result="delivered"'], "1.0")
    ]


async def test_a_job_pending_at_a_killed_worker_is_taken_over(redis_keyspace, hook_factory) -> None:
    first_alive = True
    hook = hook_factory(lambda n: 500 if first_alive else 200)
    events, counters = MemoryEventBus(), MemoryCounters()
    await QueuedCodeSender(redis_keyspace, CIPHER, ttl=30).send(PHONE, "123456", "code 123456")
    first = worker(redis_keyspace, hook.url, "first", events=events, counters=counters)
    first.start()
    await hook.wait(lambda: len(hook.requests) >= 2)
    assert first._task is not None
    first._task.cancel()  # killed: no stop, no acknowledgement, the job stays pending
    with pytest.raises(asyncio.CancelledError):
        await first._task
    first_alive = False
    assert await pending(redis_keyspace) == 1

    second = worker(redis_keyspace, hook.url, "second", events=events, counters=counters)
    second.start()
    await hook.wait(lambda: len(hook.accepted()) == 1)
    await second.stop()

    [(headers, body, _)] = hook.accepted()
    assert verify_standard_webhook(headers, body)
    assert json.loads(body)["message"] == "code 123456"
    assert len({h["webhook-id"] for h, *_ in hook.requests}) == 1, "one message id for the job"
    assert await pending(redis_keyspace) == 0
    assert counters.total("otp_deliveries", result="delivered") == 1
    assert counters.total("otp_deliveries", result="failed") == 0
    assert failed_events(events) == []


async def test_a_slow_delivery_is_not_taken_over_while_its_worker_lives(redis_keyspace, hook_factory) -> None:
    hook = hook_factory(lambda n: 200, first_delay=1.6)  # over three times min_idle
    events, counters = MemoryEventBus(), MemoryCounters()
    workers = [
        worker(redis_keyspace, hook.url, name, events=events, counters=counters) for name in ("a", "b")
    ]
    for running in workers:
        running.start()
    await QueuedCodeSender(redis_keyspace, CIPHER, ttl=30).send(PHONE, "123456", "code 123456")
    await hook.wait(lambda: len(hook.requests) == 1)
    await asyncio.sleep(1.0)
    for running in workers:
        await running.stop()
    assert len(hook.requests) == 1
    assert counters.total("otp_deliveries", result="delivered") == 1
    assert await pending(redis_keyspace) == 0


async def test_an_expired_job_is_dropped(redis_keyspace, hook_factory) -> None:
    hook = hook_factory(lambda n: 200)
    events, counters = MemoryEventBus(), MemoryCounters()
    await QueuedCodeSender(redis_keyspace, CIPHER, ttl=0.1).send(PHONE, "123456", "code 123456")
    await asyncio.sleep(0.2)
    running = worker(redis_keyspace, hook.url, "late", events=events, counters=counters)
    running.start()
    deadline = time.monotonic() + 10
    while not failed_events(events) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await running.stop()
    assert failed_events(events) == [{"phone_number": PHONE, "reason": "expired"}]
    assert hook.requests == []
    assert counters.total("otp_deliveries", result="expired", country="US") == 1
    assert await pending(redis_keyspace) == 0


async def test_a_receiver_that_always_fails_gives_delivery_failed(redis_keyspace, hook_factory) -> None:
    hook = hook_factory(lambda n: 503)
    events, counters = MemoryEventBus(), MemoryCounters()
    running = worker(redis_keyspace, hook.url, "one", events=events, counters=counters)
    running.start()
    await QueuedCodeSender(redis_keyspace, CIPHER, ttl=1.5).send(PHONE, "123456", "code 123456")
    deadline = time.monotonic() + 10
    while not failed_events(events) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await running.stop()
    assert failed_events(events) == [{"phone_number": PHONE, "reason": "DeliveryFailed"}]
    assert len(hook.requests) >= 2, "retried until the code expired"
    assert counters.total("otp_deliveries", result="failed", country="US") == 1
    assert counters.total("otp_deliveries", result="delivered") == 0
    assert await pending(redis_keyspace) == 0, "acknowledged after the final failure"


def test_jobs_are_sealed_to_their_number_with_fresh_nonces() -> None:
    one, two = CIPHER.seal(PHONE, "code 123456"), CIPHER.seal(PHONE, "code 123456")
    assert one != two
    assert CIPHER.open(PHONE, *one) == "code 123456"
    with pytest.raises(ValueError, match="undecryptable"):
        CIPHER.open("+14155550124", *one)
    with pytest.raises(ValueError, match="undecryptable"):
        JobCipher(b"other" * 8).open(PHONE, *one)
