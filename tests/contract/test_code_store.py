"""CodeStore contract: single-use codes, attempts, send limits and the per-number budget."""

from __future__ import annotations

import asyncio

from otpcore.domain.ports import CodeOutcome, Limit

PHONE = "+14155550123"
TTL = 120.0
RIGHT, WRONG = b"right-digest", b"wrong-digest"
BUDGET = Limit(name="failures", subject=PHONE, requests=100, window=3600.0)


async def _issue(store, digest=RIGHT, *, max_attempts=5, send_limit=None, ttl=TTL):
    """The send-limit decision (None without a limit)."""
    decisions = await store.issue(PHONE, digest, ttl=ttl, max_attempts=max_attempts, send_limit=send_limit)
    assert len(decisions) == (1 if send_limit else 0)
    return decisions[0] if send_limit else None


async def _check(store, digest=RIGHT, budget=BUDGET):
    return await store.check(PHONE, digest, failure_budget=budget)


async def test_right_code_is_accepted_once(code_store):
    assert await _issue(code_store) is None  # no send limit, no decision
    assert (await _check(code_store)).outcome is CodeOutcome.ACCEPTED
    assert (await _check(code_store)).outcome is CodeOutcome.MISSING


async def test_never_sent_is_missing(code_store):
    assert (await _check(code_store)).outcome is CodeOutcome.MISSING


async def test_codes_are_per_number(code_store):
    await _issue(code_store)
    other = await code_store.check("+14155550124", RIGHT, failure_budget=BUDGET)
    assert other.outcome is CodeOutcome.MISSING
    assert (await _check(code_store)).outcome is CodeOutcome.ACCEPTED


async def test_concurrent_checks_accept_once(code_store):
    await _issue(code_store)
    results = await asyncio.gather(*(_check(code_store) for _ in range(10)))
    outcomes = [r.outcome for r in results]
    assert outcomes.count(CodeOutcome.ACCEPTED) == 1
    assert outcomes.count(CodeOutcome.MISSING) == 9


async def test_wrong_codes_burn_the_code(code_store):
    await _issue(code_store, max_attempts=3)
    first = await _check(code_store, WRONG)
    assert (first.outcome, first.attempts_remaining) == (CodeOutcome.WRONG, 2)
    second = await _check(code_store, WRONG)
    assert (second.outcome, second.attempts_remaining) == (CodeOutcome.WRONG, 1)
    assert (await _check(code_store, WRONG)).outcome is CodeOutcome.BURNED
    # Burned means burned: even the right code fails until a new one is sent.
    assert (await _check(code_store)).outcome is CodeOutcome.BURNED
    await _issue(code_store)
    assert (await _check(code_store)).outcome is CodeOutcome.ACCEPTED


async def test_expired_code_is_missing(code_store, clock):
    await _issue(code_store)
    clock.advance(TTL - 1)
    assert (await _check(code_store, WRONG)).outcome is CodeOutcome.WRONG
    clock.advance(1.5)
    assert (await _check(code_store)).outcome is CodeOutcome.MISSING


async def test_new_code_replaces_the_old_and_resets_attempts(code_store):
    await _issue(code_store, b"old", max_attempts=3)
    assert (await _check(code_store, WRONG)).attempts_remaining == 2
    await _issue(code_store, b"new", max_attempts=3)
    assert (await _check(code_store, WRONG)).attempts_remaining == 2
    replaced = await _check(code_store, b"old")
    assert (replaced.outcome, replaced.attempts_remaining) == (CodeOutcome.WRONG, 1)
    assert (await _check(code_store, b"new")).outcome is CodeOutcome.ACCEPTED


async def test_send_limit_keeps_the_previous_code(code_store):
    limit = Limit(name="otp", subject=PHONE, requests=3, window=600.0)
    decisions = [await _issue(code_store, b"code%d" % i, send_limit=limit) for i in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[3].reset_after > 0
    # The refused send did not replace the code sent before it.
    assert (await _check(code_store, b"code3")).outcome is CodeOutcome.WRONG
    assert (await _check(code_store, b"code2")).outcome is CodeOutcome.ACCEPTED


async def test_send_limit_window_slides(code_store, clock):
    limit = Limit(name="otp", subject=PHONE, requests=3, window=600.0)
    for _ in range(3):
        assert (await _issue(code_store, send_limit=limit)).allowed
        clock.advance(100)
    assert not (await _issue(code_store, send_limit=limit)).allowed
    clock.advance(300.5)  # the first send is now more than 600 s old
    assert (await _issue(code_store, send_limit=limit)).allowed


async def test_concurrent_sends_respect_the_limit(code_store):
    limit = Limit(name="otp", subject=PHONE, requests=3, window=600.0)
    decisions = await asyncio.gather(
        *(_issue(code_store, b"code%d" % i, send_limit=limit) for i in range(20))
    )
    assert sum(d.allowed for d in decisions) == 3


async def test_failure_budget_locks_the_number_across_resends(code_store, clock):
    budget = Limit(name="failures", subject=PHONE, requests=10, window=3600.0)
    outcomes = []
    for _ in range(2):
        await _issue(code_store, max_attempts=5)
        outcomes += [(await _check(code_store, WRONG, budget)).outcome for _ in range(5)]
    assert outcomes[:4] == [CodeOutcome.WRONG] * 4
    assert outcomes[4] is CodeOutcome.BURNED
    assert outcomes[5:9] == [CodeOutcome.WRONG] * 4
    assert outcomes[9] is CodeOutcome.LOCKED  # the tenth failure spends the budget

    # Resending buys no more guesses: even the right code is refused while locked.
    await _issue(code_store, max_attempts=5)
    locked = await _check(code_store, RIGHT, budget)
    assert locked.outcome is CodeOutcome.LOCKED
    assert 0 < locked.retry_after <= 3600

    clock.advance(3600.5)
    await _issue(code_store, max_attempts=5)
    assert (await _check(code_store, RIGHT, budget)).outcome is CodeOutcome.ACCEPTED


async def test_ping(code_store):
    await code_store.ping()


# -- admission: the caller's own limits, decided with the send (one step where the store can) --

IP = "203.0.113.7"


def _admission(requests: int) -> list[Limit]:
    return [
        Limit(name="global", subject=IP, requests=100, window=60),
        Limit(name="auth", subject=IP, requests=requests, window=60),
    ]


async def _send(store, phone: str, *, admission, send_limit=None):
    return await store.issue(
        phone, RIGHT, ttl=TTL, max_attempts=5, send_limit=send_limit, admission=admission
    )


async def test_admission_limits_are_the_limiters_own(limiter_and_code_store) -> None:
    limiter, store = limiter_and_code_store
    for i in range(2):
        decisions = await _send(store, f"+1415555{i:04d}", admission=_admission(3))
        assert [(d.name, d.allowed, d.remaining) for d in decisions] == [
            ("global", True, 99 - i),
            ("auth", True, 2 - i),
        ]
    # The limiter counts what the store recorded, and the store what the limiter did.
    assert [d.remaining for d in await limiter.hit(_admission(3))] == [97, 0]
    refused = await _send(store, "+14155550009", admission=_admission(3))
    assert [(d.name, d.allowed, d.remaining) for d in refused] == [("global", False, 97), ("auth", False, 0)]
    assert refused[1].reset_after > 0


async def test_a_refused_admission_writes_and_records_nothing(code_store, clock) -> None:
    limit = Limit(name="otp", subject=PHONE, requests=3, window=600)
    await _send(code_store, "+14155550100", admission=_admission(1))
    refused = await _send(code_store, PHONE, admission=_admission(1), send_limit=limit)
    # Refused by admission: no send-limit decision at all.
    assert [(d.name, d.allowed) for d in refused] == [("global", False), ("auth", False)]
    assert (await code_store.check(PHONE, RIGHT, failure_budget=BUDGET)).outcome is CodeOutcome.MISSING
    clock.advance(61)
    decisions = await _send(code_store, PHONE, admission=_admission(1), send_limit=limit)
    assert decisions[-1].name == "otp" and decisions[-1].remaining == 2  # nothing was counted


async def test_a_send_refused_by_its_number_still_counts_for_the_client(limiter_and_code_store) -> None:
    limiter, store = limiter_and_code_store
    limit = Limit(name="otp", subject=PHONE, requests=1, window=600)
    assert all(d.allowed for d in await _send(store, PHONE, admission=_admission(5), send_limit=limit))
    decisions = await _send(store, PHONE, admission=_admission(5), send_limit=limit)
    assert [(d.name, d.allowed) for d in decisions] == [("global", True), ("auth", True), ("otp", False)]
    assert [d.remaining for d in await limiter.hit(_admission(5))] == [97, 2]


async def test_concurrent_admissions_allow_exactly_the_limit(code_store) -> None:
    results = await asyncio.gather(
        *(_send(code_store, f"+1415556{i:04d}", admission=_admission(5)) for i in range(20))
    )
    assert sum(all(d.allowed for d in decisions) for decisions in results) == 5


# -- admission with the check: the same limits, decided with a verification --


async def _verify(store, phone: str, digest=RIGHT, *, admission, budget=BUDGET):
    return await store.check(phone, digest, failure_budget=budget, admission=admission)


async def test_checks_admit_on_the_limiters_own_logs(limiter_and_code_store) -> None:
    limiter, store = limiter_and_code_store
    await _send(store, PHONE, admission=())
    accepted = await _verify(store, PHONE, admission=_admission(3))
    assert accepted.outcome is CodeOutcome.ACCEPTED
    assert [(d.name, d.allowed, d.remaining) for d in accepted.admission] == [
        ("global", True, 99),
        ("auth", True, 2),
    ]
    # Every outcome counts for the client: a check of a code never sent as well.
    missing = await _verify(store, "+14155550999", admission=_admission(3))
    assert missing.outcome is CodeOutcome.MISSING
    assert [d.remaining for d in missing.admission] == [98, 1]
    assert [d.remaining for d in await limiter.hit(_admission(3))] == [97, 0]


async def test_a_refused_check_looks_at_nothing_and_records_nothing(code_store, clock) -> None:
    budget = Limit(name="failures", subject=PHONE, requests=2, window=3600.0)
    await _send(code_store, PHONE, admission=())
    await _verify(code_store, "+14155550100", admission=_admission(1))
    refused = await _verify(code_store, PHONE, WRONG, admission=_admission(1), budget=budget)
    assert refused.outcome is CodeOutcome.REFUSED
    assert [(d.name, d.allowed, d.remaining) for d in refused.admission] == [
        ("global", False, 99),
        ("auth", False, 0),
    ]
    assert refused.admission[1].reset_after > 0
    # The wrong guess was not counted against the code or the number, nor the right one spent.
    clock.advance(61)
    wrong = await _verify(code_store, PHONE, WRONG, admission=_admission(1), budget=budget)
    assert (wrong.outcome, wrong.attempts_remaining) == (CodeOutcome.WRONG, 1)
    assert (await _verify(code_store, PHONE, admission=())).outcome is CodeOutcome.ACCEPTED


async def test_concurrent_checks_admit_exactly_the_limit(code_store) -> None:
    results = await asyncio.gather(
        *(_verify(code_store, f"+1415557{i:04d}", admission=_admission(5)) for i in range(20))
    )
    assert sum(r.outcome is not CodeOutcome.REFUSED for r in results) == 5
    assert all(all(d.allowed for d in r.admission) == (r.outcome is not CodeOutcome.REFUSED) for r in results)
