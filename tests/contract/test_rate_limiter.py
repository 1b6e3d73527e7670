"""RateLimiter contract: exact sliding windows, all or nothing across limits."""

from __future__ import annotations

import asyncio

from otpcore.domain.ports import Limit

LIMIT = Limit(name="auth", subject="192.0.2.1", requests=3, window=10.0)


async def _allowed_at(limiter, clock, start: float, offset: float) -> bool:
    clock.now = start + offset
    [decision] = await limiter.hit([LIMIT])
    return decision.allowed


async def test_window_slides_rather_than_resetting(rate_limiter, clock):
    start = clock.now
    timeline = [(0, True), (5, True), (9, True), (9.5, False), (10.01, True), (12, False)]
    results = [(t, await _allowed_at(rate_limiter, clock, start, t)) for t, _ in timeline]
    assert results == timeline


async def test_fixed_buckets_would_allow_a_burst(rate_limiter, clock):
    # Three hits at the end of one 10 s bucket and three at the start of the next: a fixed
    # window allows six in one second, a sliding one only three.
    start = clock.now
    allowed = [await _allowed_at(rate_limiter, clock, start, t) for t in (9.7, 9.8, 9.9)]
    allowed += [await _allowed_at(rate_limiter, clock, start, t) for t in (10.1, 10.2, 10.3)]
    assert allowed == [True, True, True, False, False, False]


async def test_refused_hits_are_not_recorded(rate_limiter, clock):
    start = clock.now
    for t in (0, 1, 2):
        assert await _allowed_at(rate_limiter, clock, start, t)
    for t in (3, 4, 5, 6, 7, 8, 9):
        assert not await _allowed_at(rate_limiter, clock, start, t)
    # Had the refusals counted, the window would still be full at t=10.5.
    assert await _allowed_at(rate_limiter, clock, start, 10.5)


async def test_remaining_and_reset_after(rate_limiter, clock):
    start = clock.now
    [first] = await rate_limiter.hit([LIMIT])
    assert (first.allowed, first.limit, first.remaining, first.reset_after) == (True, 3, 2, 10)
    assert first.name == "auth"
    clock.now = start + 5
    [second] = await rate_limiter.hit([LIMIT])
    assert (second.remaining, second.reset_after) == (1, 5)
    clock.now = start + 6.5
    [third] = await rate_limiter.hit([LIMIT])
    assert (third.remaining, third.reset_after) == (0, 4)  # ceil(3.5)
    clock.now = start + 9.5
    [refused] = await rate_limiter.hit([LIMIT])
    assert (refused.allowed, refused.remaining, refused.reset_after) == (False, 0, 1)


async def test_keys_are_independent(rate_limiter):
    other = Limit(name="ip", subject="192.0.2.2", requests=3, window=10.0)
    for _ in range(3):
        await rate_limiter.hit([LIMIT])
    [refused] = await rate_limiter.hit([LIMIT])
    [allowed] = await rate_limiter.hit([other])
    assert not refused.allowed
    assert allowed.allowed


async def test_several_limits_all_or_nothing(rate_limiter):
    narrow = Limit(name="auth", subject="192.0.2.1", requests=1, window=60.0)
    wide = Limit(name="global", subject="192.0.2.1", requests=5, window=60.0)

    first = await rate_limiter.hit([narrow, wide])
    assert [d.allowed for d in first] == [True, True]
    assert [(d.name, d.remaining) for d in first] == [("auth", 0), ("global", 4)]

    second = await rate_limiter.hit([narrow, wide])
    assert not second[0].allowed
    assert second[1].remaining == 4  # the refused request was not counted in the wide window

    [alone] = await rate_limiter.hit([wide])
    assert (alone.allowed, alone.remaining) == (True, 3)


async def test_concurrent_hits_accept_exactly_the_limit(rate_limiter):
    limit = Limit(name="ip", subject="198.51.100.7", requests=7, window=60.0)
    results = await asyncio.gather(*(rate_limiter.hit([limit]) for _ in range(20)))
    assert sum(decision.allowed for [decision] in results) == 7


async def test_ping(rate_limiter):
    await rate_limiter.ping()
