"""A send's event is published with its code, and only when the send is accepted."""

from __future__ import annotations

import pytest

from otpcore.adapters.memory import MemoryCodeStore, MemoryEventBus
from otpcore.adapters.redis import RedisCodeStore, RedisEventBus
from otpcore.domain import events as ev
from otpcore.domain.events import Event
from otpcore.domain.ports import Limit

PHONE = "+14155550123"


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def store_and_events(request, clock):
    if request.param == "memory":
        bus = MemoryEventBus()

        async def read_memory() -> list[Event]:
            return list(bus.events)

        return MemoryCodeStore(clock=clock, events=bus), read_memory
    fixture = "redis_keyspace" if request.param == "redis" else "redis_cluster_keyspace"
    keyspace = request.getfixturevalue(fixture)
    redis_bus = RedisEventBus(keyspace, stream="events")
    return RedisCodeStore(keyspace, clock=clock, events=redis_bus), redis_bus.read_all


async def test_accepted_sends_publish_their_event_refused_ones_do_not(store_and_events) -> None:
    store, read = store_and_events
    limit = Limit(name="otp", subject=PHONE, requests=2, window=600)
    sent = [Event(event_type=ev.OTP_GENERATED, data={"phone_number": PHONE, "n": i}) for i in range(3)]
    decisions = [
        (await store.issue(PHONE, b"d" * 32, ttl=120, max_attempts=5, send_limit=limit, event=e))[-1]
        for e in sent
    ]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert [e.event_id for e in await read()] == [e.event_id for e in sent[:2]]


async def test_a_store_without_an_event_bus_refuses_an_event(clock) -> None:
    store = MemoryCodeStore(clock=clock)
    event = Event(event_type=ev.OTP_GENERATED)
    with pytest.raises(ValueError, match="no event bus"):
        await store.issue(PHONE, b"d" * 32, ttl=120, max_attempts=5, send_limit=None, event=event)
