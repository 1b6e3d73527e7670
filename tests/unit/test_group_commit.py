"""GroupCommit: calls arriving while one is in flight go together in the next, each caller
hearing its own result once its batch is stored."""

from __future__ import annotations

import asyncio

import pytest

from otpcore.adapters.group_commit import GroupCommit
from otpcore.domain.errors import ServiceUnavailable


class Store:
    """Stores batches of strings, each held until ``release`` once ``hold`` is set."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.hold = False
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.error: Exception | None = None

    async def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(items)
        self.started.set()
        if self.hold:
            await self.release.wait()
        if self.error is not None:
            raise self.error
        return [item.upper() for item in items]


async def _held_first(group: GroupCommit[str, str], store: Store, first: str = "first") -> asyncio.Task[str]:
    store.hold = True
    store.started.clear()
    task = asyncio.create_task(group.submit(first))
    await asyncio.wait_for(store.started.wait(), 5)
    return task


async def test_an_idle_group_stores_at_once_and_those_arriving_meanwhile_go_together() -> None:
    store = Store()
    group = GroupCommit(store, max_weight=10)
    assert await group.submit("alone") == "ALONE"

    first = await _held_first(group, store)
    queued = [asyncio.create_task(group.submit(f"q{n}")) for n in range(4)]
    await asyncio.sleep(0.01)
    assert store.batches == [["alone"], ["first"]]  # nothing goes while one is in flight
    store.release.set()

    assert await asyncio.wait_for(asyncio.gather(first, *queued), 5) == ["FIRST", "Q0", "Q1", "Q2", "Q3"]
    assert store.batches[2:] == [["q0", "q1", "q2", "q3"]]


async def test_a_batch_weighs_at_most_max_weight_and_a_heavier_item_goes_alone() -> None:
    store = Store()
    group = GroupCommit(store, max_weight=5, weight=len)
    first = await _held_first(group, store, "x")
    queued = [asyncio.create_task(group.submit(item)) for item in ("aa", "bbb", "c", "dddddddd", "ee")]
    store.release.set()

    assert await asyncio.wait_for(asyncio.gather(first, *queued), 5) == [
        "X",
        "AA",
        "BBB",
        "C",
        "DDDDDDDD",
        "EE",
    ]
    assert store.batches == [["x"], ["aa", "bbb"], ["c"], ["dddddddd"], ["ee"]]


async def test_no_two_items_of_one_key_share_a_batch_and_order_is_kept() -> None:
    store = Store()
    group = GroupCommit(store, max_weight=10, key=lambda item: item[0])
    first = await _held_first(group, store)
    queued = [asyncio.create_task(group.submit(item)) for item in ("a1", "b1", "a2", "c1", "a3", "b2")]
    store.release.set()

    assert await asyncio.wait_for(asyncio.gather(first, *queued), 5) == [
        "FIRST",
        "A1",
        "B1",
        "A2",
        "C1",
        "A3",
        "B2",
    ]
    assert store.batches == [["first"], ["a1", "b1", "c1"], ["a2", "b2"], ["a3"]]


async def test_a_failed_batch_fails_each_caller_with_an_error_of_its_own_and_the_next_call_works() -> None:
    store = Store()
    group = GroupCommit(store, max_weight=10)
    store.error = ValueError("boom")
    results = await asyncio.gather(*(group.submit(f"i{n}") for n in range(4)), return_exceptions=True)

    assert all(isinstance(r, ServiceUnavailable) and isinstance(r.__cause__, ValueError) for r in results)
    assert len({id(r) for r in results}) == 4
    store.error = None
    assert await group.submit("again") == "AGAIN"


async def test_when_the_store_is_unavailable_those_queued_behind_the_batch_fail_with_it() -> None:
    store = Store()
    group = GroupCommit(store, max_weight=2)
    store.error = ServiceUnavailable("down")
    first = await _held_first(group, store)
    queued = [asyncio.create_task(group.submit(f"q{n}")) for n in range(6)]
    store.release.set()

    results = await asyncio.wait_for(asyncio.gather(first, *queued, return_exceptions=True), 5)
    assert all(isinstance(r, ServiceUnavailable) and r.message == "down" for r in results), results
    assert store.batches == [["first"]]  # not three more batches, one failure after another


async def test_a_caller_that_gives_up_before_its_batch_is_left_out() -> None:
    store = Store()
    group = GroupCommit(store, max_weight=10)
    first = await _held_first(group, store)
    gone = asyncio.create_task(group.submit("gone"))
    last = asyncio.create_task(group.submit("last"))
    await asyncio.sleep(0)
    gone.cancel()
    store.release.set()

    assert await asyncio.wait_for(asyncio.gather(first, last), 5) == ["FIRST", "LAST"]
    assert gone.cancelled() and store.batches == [["first"], ["last"]]


async def test_drain_waits_for_the_batch_in_flight_and_aclose_tells_its_callers() -> None:
    store = Store()
    group = GroupCommit(store, max_weight=10, stopped="stopped, unconfirmed")
    first = await _held_first(group, store)
    draining = asyncio.create_task(group.drain())
    await asyncio.sleep(0.02)
    assert not draining.done()
    store.release.set()
    await asyncio.wait_for(draining, 5)
    assert first.result() == "FIRST"

    store.release.clear()
    held = await _held_first(group, store, "held")
    queued = asyncio.create_task(group.submit("queued"))
    await asyncio.sleep(0)
    await asyncio.wait_for(group.aclose(), 5)
    for task in (held, queued):
        with pytest.raises(ServiceUnavailable, match="stopped, unconfirmed"):
            await task
    store.hold = False
    assert await group.submit("later") == "LATER"  # a later call starts afresh


async def test_a_store_answering_for_fewer_items_fails_the_whole_batch() -> None:
    async def short(items: list[str]) -> list[str]:
        return items[1:]

    group = GroupCommit(short, max_weight=10)
    results = await asyncio.gather(*(group.submit(f"i{n}") for n in range(3)), return_exceptions=True)
    assert all(isinstance(r, ServiceUnavailable) and isinstance(r.__cause__, RuntimeError) for r in results)


async def test_a_weight_that_raises_fails_the_callers_rather_than_losing_them() -> None:
    def weight(item: str) -> int:
        if item == "bad":
            raise ValueError(item)
        return 1

    store = Store()
    group = GroupCommit(store, max_weight=10, weight=weight)
    first = await _held_first(group, store)
    queued = [asyncio.create_task(group.submit(item)) for item in ("a", "bad", "b")]
    store.release.set()

    results = await asyncio.wait_for(asyncio.gather(first, *queued, return_exceptions=True), 5)
    assert results[0] == "FIRST"
    assert all(isinstance(r, ServiceUnavailable) for r in results[1:]), results


def test_max_weight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_weight"):
        GroupCommit(Store(), max_weight=0)
