"""EventBus contract: every published event comes back whole, in order, and the bus is bounded."""

from __future__ import annotations

import msgspec

from otpcore.domain import events as ev
from otpcore.domain.events import Event


async def test_published_events_come_back_in_order_with_their_shape(event_bus_and_reader) -> None:
    bus, read = event_bus_and_reader
    sent = [
        Event(event_type=ev.OTP_GENERATED, data={"phone_number": "+14155550123", "n": i}) for i in range(5)
    ]
    for event in sent:
        await bus.publish(event)
    received = await read()
    assert [e.event_id for e in received[-5:]] == [e.event_id for e in sent]
    shape = msgspec.to_builtins(received[-1])
    assert set(shape) == {"event_id", "event_type", "timestamp", "data"}
    assert shape["event_type"] == "otp:generated" and shape["data"]["n"] == 4


async def test_the_bus_is_bounded_and_keeps_the_newest(event_bus_and_reader) -> None:
    bus, read = event_bus_and_reader
    for i in range(200):
        await bus.publish(Event(event_type=ev.AUTH_FAILED, data={"i": i}))
    received = await read()
    assert len(received) < 200
    assert received[-1].data["i"] == 199


async def test_ping_answers(event_bus_and_reader) -> None:
    bus, _ = event_bus_and_reader
    await bus.ping()


async def test_several_events_in_one_call_are_all_appended_in_order(event_bus_and_reader) -> None:
    bus, read = event_bus_and_reader
    batch = [Event(event_type=ev.USER_AUTHENTICATED, data={"n": i}) for i in range(3)]
    await bus.publish(*batch)
    await bus.publish()  # nothing to append is not an error
    assert [e.event_id for e in (await read())[-3:]] == [e.event_id for e in batch]
