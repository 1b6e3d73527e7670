"""The event forwarder against real Redis and a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from otpcore import Settings, SettingsError, build_core
from otpcore.adapters.event_stream import EventForwarder, EventStream, GroupWorker
from otpcore.adapters.redis import RedisEventBus, RedisKeyspace
from otpcore.adapters.webhooks import WebhookPoster, WebhookSigner
from otpcore.domain.events import Event
from tests.backends.redis import redis_url
from tests.faults import CuttableProxy
from tests.integration.test_webhook_sender import SECRET, Receiver, verify_standard_webhook

SHAPE = {"event_id", "event_type", "timestamp", "data"}


class Answers:
    """A ``Receiver`` script computed per request: the n-th POST (from 0) gets ``status(n)``."""

    def __init__(self, status: Callable[[int], int]) -> None:
        self.status = status
        self.given: dict[int, int] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, n: int) -> int:
        self.given[n] = self.status(n)
        return self.given[n]


class Hook:
    """A real receiver on 127.0.0.1 and what it answered to each POST."""

    def __init__(self, receiver: Receiver, answers: Answers) -> None:
        self.receiver = receiver
        self.answers = answers
        self.url = receiver.url

    @property
    def requests(self) -> list[tuple[dict[str, str], bytes, int]]:
        return [(h, b, self.answers.given[n]) for n, (h, b, *_) in enumerate(self.receiver.requests)]

    def delivered(self) -> list[str]:
        """event_ids of the accepted (2xx) posts, in the order they were accepted."""
        return [json.loads(body)["event_id"] for _, body, status in self.requests if status < 300]

    async def wait_for(self, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while len(set(self.delivered())) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


@pytest.fixture
def hook_factory() -> Iterator[Callable[[Callable[[int], int]], Hook]]:
    hooks: list[Hook] = []

    def make(status: Callable[[int], int]) -> Hook:
        answers = Answers(status)
        hooks.append(Hook(Receiver(answers), answers))  # type: ignore[arg-type]
        return hooks[-1]

    yield make
    for hook in hooks:
        hook.receiver.close()


def forwarder(stream: EventStream, url: str, consumer: str) -> EventForwarder:
    poster = WebhookPoster(url, WebhookSigner(SECRET), timeout=2.0, first_backoff=0.05)
    return EventForwarder(stream, poster, consumer=consumer, min_idle=0.3, give_up_after=1.0, grace=2.0)


async def publish(keyspace: RedisKeyspace, count: int, tag: str) -> list[str]:
    bus = RedisEventBus(keyspace)
    events = [Event(event_type="user:authenticated", data={"user_id": i, "tag": tag}) for i in range(count)]
    for i in range(0, count, 7):  # several appends, one round trip each
        await bus.publish(*events[i : i + 7])
    return [e.event_id for e in events]


async def pending(keyspace: RedisKeyspace) -> int:
    summary = await keyspace.client.xpending(RedisEventBus(keyspace).stream, EventForwarder.GROUP)
    return int(summary["pending"])


async def test_every_event_arrives_once_signed_in_order(redis_keyspace, hook_factory) -> None:
    receiver = hook_factory(lambda n: (500, 503)[n] if n < 2 else 200)
    before = await publish(redis_keyspace, 15, "before")  # the group starts at the first entry
    stream = EventStream(redis_keyspace, block=0.2)
    running = forwarder(stream, receiver.url, "one")
    running.start()
    after = await publish(redis_keyspace, 15, "after")
    await receiver.wait_for(30)
    await running.stop()

    assert receiver.delivered() == before + after, "each event once, in stream order"
    assert [status for *_, status in receiver.requests[:3]] == [500, 503, 200]
    assert len({h["webhook-id"] for h, *_ in receiver.requests[:3]}) == 1, "one message id per event"
    for headers, body, _ in receiver.requests:
        assert verify_standard_webhook(headers, body)
        assert set(json.loads(body)) == SHAPE
    assert await pending(redis_keyspace) == 0


async def test_entries_of_a_killed_forwarder_are_taken_over(redis_keyspace, hook_factory) -> None:
    # The receiver accepts five events, then fails until the first forwarder is gone.
    first_alive = True
    receiver = hook_factory(lambda n: 200 if n < 5 or not first_alive else 500)
    published = await publish(redis_keyspace, 40, "crash")
    stream = EventStream(redis_keyspace, block=0.2)
    first = forwarder(stream, receiver.url, "first")
    first.start()
    deadline = time.monotonic() + 10
    while len(receiver.requests) < 7 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert first._task is not None
    first._task.cancel()  # killed: no stop, no acknowledgement, its entries stay pending
    with pytest.raises(asyncio.CancelledError):
        await first._task
    first_alive = False
    assert await pending(redis_keyspace) == 35

    second = forwarder(stream, receiver.url, "second")
    second.start()
    await receiver.wait_for(40)
    await second.stop()

    assert sorted(receiver.delivered()) == sorted(published)
    assert len(receiver.delivered()) == 40, "each event accepted once"
    assert all(verify_standard_webhook(h, b) for h, b, _ in receiver.requests)
    assert await pending(redis_keyspace) == 0


async def test_a_redis_outage_is_waited_out(redis_keyspace, hook_factory) -> None:
    receiver = hook_factory(lambda n: 200)
    host, port = redis_url().split("//", 1)[1].split("/")[0].split(":")
    proxy = CuttableProxy(host, int(port))
    try:
        stream = EventStream.connect(
            f"redis://127.0.0.1:{proxy.port}/0",
            cluster=False,
            prefix=redis_keyspace.prefix,
            stream="events",
            block=0.2,
        )
        running = forwarder(stream, receiver.url, "outage")
        running.start()
        first = await publish(redis_keyspace, 3, "up")
        await receiver.wait_for(3)
        proxy.cut()
        during = await publish(redis_keyspace, 5, "down")
        await asyncio.sleep(1.5)
        assert running._task is not None and not running._task.done(), "the forwarder gave up"
        proxy.restore()
        await receiver.wait_for(8, timeout=20)
        await running.stop()
    finally:
        proxy.close()
    assert receiver.delivered() == first + during


class Stubborn(GroupWorker):
    """A reader that shrugs off its first cancellation, as one caught mid-retry might."""

    async def run(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.Event().wait()


async def test_stop_does_not_wait_for_ever_on_a_reader_that_ignores_cancellation(redis_keyspace) -> None:
    stream = EventStream(redis_keyspace, block=0.2)
    stubborn = Stubborn(stream, stream.group("stubborn", "one"), grace=0.3)
    stubborn.start()
    await asyncio.sleep(0)
    started = time.monotonic()
    await asyncio.wait_for(stubborn.stop(), timeout=5)
    assert time.monotonic() - started < 2, "bounded by the grace period"


async def test_the_service_forwards_its_events(redis_keyspace, hook_factory) -> None:
    receiver = hook_factory(lambda n: 200)
    settings = Settings(
        db_provider="memory",
        otp_sender="memory",
        redis_url=redis_url(),
        otp_redis_key_prefix=redis_keyspace.prefix,
        events_webhook_url=receiver.url,
        events_webhook_secret=SECRET,
        jwt_secret="f" * 40,
    )
    core = build_core(settings)
    await core.start()
    await core.auth.send_code("+14155550123")
    await receiver.wait_for(1)
    await core.aclose()
    headers, body, _ = receiver.requests[0]
    assert verify_standard_webhook(headers, body)
    assert json.loads(body)["event_type"] == "otp:generated"


def test_event_webhook_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match="EVENTS_WEBHOOK_URL needs REDIS_URL"):
        Settings(events_webhook_url="https://audit.example/hook", events_webhook_secret=SECRET)
    with pytest.raises(SettingsError, match="EVENTS_WEBHOOK_SECRET"):
        Settings(redis_url="redis://r", events_webhook_url="https://audit.example/hook")
    with pytest.raises(SettingsError, match="EVENTS_WEBHOOK_URL must be"):
        Settings(redis_url="redis://r", events_webhook_secret=SECRET)
    assert Settings().event_forwarding == "off"


async def test_events_batch_size_reaches_the_bus_and_must_be_positive(redis_keyspace) -> None:
    settings = Settings(
        db_provider="memory",
        otp_sender="memory",
        redis_url=redis_url(),
        otp_redis_key_prefix=redis_keyspace.prefix,
        events_batch_size=7,
        jwt_secret="f" * 40,
    )
    core = build_core(settings)
    assert isinstance(core.events, RedisEventBus) and core.events.batch_size == 7
    await core.aclose()
    with pytest.raises(SettingsError, match="EVENTS_BATCH_SIZE must be positive"):
        Settings(events_batch_size=0)
