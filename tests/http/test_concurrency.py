"""SPEC §4: atomic send limits, single-use codes and one user per number under concurrency.

Requests run through ``httpx.ASGITransport`` on one event loop with ``asyncio.gather``, so
they really interleave at every ``await`` of the app (SQLite calls go to its thread).
"""

from __future__ import annotations

import asyncio
from collections import Counter

from otpcore.domain.ports import CodeCheck, CodeOutcome, RateDecision
from tests.http.conftest import assert_error, new_phone


async def test_parallel_sends_to_one_number_allow_exactly_three(api):
    local = new_phone()[2:]  # "415555xxxx"
    spellings = [
        f"+1{local}",
        f"+1 ({local[:3]}) {local[3:6]}-{local[6:]}",
        f"+1 {local[:3]}-{local[3:6]}-{local[6:]}",
        f"+1.{local[:3]}.{local[3:6]}.{local[6:]}",
    ]
    responses = await asyncio.gather(*(api.send(spellings[i % 4]) for i in range(20)))
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 3, 429: 17}, statuses
    for response in responses:
        if response.status_code == 429:
            assert_error(response, 429, "rate_limit_exceeded")
            assert response.headers["X-RateLimit-Exceeded"] == "true"
            assert int(response.headers["Retry-After"]) >= 1
        else:
            assert response.json()["phone_number"] == f"+1{local}"
    await asyncio.sleep(0.05)
    assert len([to for to, _, _ in api.sender.sent if to == f"+1{local}"]) == 3


async def test_parallel_verifications_of_one_code_succeed_once(api):
    phone = new_phone()
    code = await api.send_and_code(phone)
    responses = await asyncio.gather(*(api.verify(phone, code) for _ in range(10)))
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 1, 400: 9}, [r.text for r in responses]
    for response in responses:
        if response.status_code == 400:
            assert response.json()["error"] in {"otp_expired", "invalid_otp"}


def allowed(limits):
    return [RateDecision(allowed=True, limit=x.requests, remaining=x.requests, reset_after=0, name=x.name)
            for x in limits]  # fmt: skip


class AcceptingCodes:
    """A code store that accepts every code, so many first logins can race."""

    async def issue(self, *a, send_limit=None, admission=(), **k):
        return allowed([*admission, *([send_limit] if send_limit else [])])

    async def check(self, *a, admission=(), **k):
        await asyncio.sleep(0)
        return CodeCheck(outcome=CodeOutcome.ACCEPTED, admission=allowed(admission))

    async def ping(self):
        return None


async def test_concurrent_first_logins_create_one_user(make_api, storage):
    api = await make_api(storage, overrides={"code_store": AcceptingCodes()})
    phone = new_phone()
    responses = await asyncio.gather(*(api.verify(phone, "123456", name="Ada") for _ in range(12)))
    assert [r.status_code for r in responses] == [200] * 12, [r.text for r in responses]
    ids = {r.json()["user"]["id"] for r in responses}
    assert len(ids) == 1
    # And the repository holds exactly one such user.
    admin = await api.admin()
    found = await api.get(
        "/api/v1/users/search",
        params={"query": phone[2:]},
        headers={"Authorization": f"Bearer {admin['token']}"},
    )
    assert found.json()["total"] == 1


async def test_two_processes_sharing_one_database_create_one_user(make_api, tmp_path):
    """Two apps (two 'processes') on one SQLite file, each with its own code store."""
    path = str(tmp_path / "shared.db")
    first = await make_api("sqlite", sqlite_path=path)
    second = await make_api("sqlite", sqlite_path=path)
    # Create the schema once before racing (migrations are another suite's concern).
    await first.core.migrate()
    phone = new_phone()
    code_one = await first.send_and_code(phone)
    code_two = await second.send_and_code(phone)
    one, two = await asyncio.gather(first.verify(phone, code_one), second.verify(phone, code_two))
    assert one.status_code == 200 and two.status_code == 200, (one.text, two.text)
    assert one.json()["user"]["id"] == two.json()["user"]["id"]
