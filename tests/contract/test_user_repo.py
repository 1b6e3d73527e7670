"""UserRepo contract: every adapter behaves like the in-memory reference."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from otpcore.domain.model import Role

PHONE = "+14155550123"


async def test_unknown_user_is_none(user_repo):
    assert await user_repo.get(1) is None
    assert await user_repo.get_by_phone(PHONE) is None


async def test_get_or_create_creates_once(user_repo, clock):
    user, created = await user_repo.get_or_create(PHONE, name="Ada", role=Role.ADMIN)
    assert created
    assert (user.phone_number, user.name, user.role, user.is_active) == (
        PHONE,
        "Ada",
        Role.ADMIN,
        True,
    )
    assert user.created_at == user.updated_at == datetime.fromtimestamp(clock.now, UTC)

    again, created = await user_repo.get_or_create(PHONE, name="Other", role=Role.USER)
    assert not created
    assert again == user
    assert await user_repo.get(user.id) == user
    assert await user_repo.get_by_phone(PHONE) == user


async def test_concurrent_first_logins_create_one_user(user_repo):
    results = await asyncio.gather(
        *(user_repo.get_or_create(PHONE, name=f"n{i}", role=Role.USER) for i in range(50))
    )
    assert sum(created for _, created in results) == 1
    assert len({user.id for user, _ in results}) == 1


async def test_ids_are_distinct_and_increasing(user_repo):
    first, _ = await user_repo.get_or_create("+14155550001", name="", role=Role.USER)
    second, _ = await user_repo.get_or_create("+14155550002", name="", role=Role.USER)
    assert second.id > first.id


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"name": "Grace"}, {"name": "Grace"}),
        ({"role": Role.ADMIN}, {"role": Role.ADMIN}),
        ({"is_active": False}, {"is_active": False}),
        (
            {"name": "Grace", "role": Role.ADMIN, "is_active": False},
            {"name": "Grace", "role": Role.ADMIN, "is_active": False},
        ),
        ({}, {}),
    ],
)
async def test_update_changes_only_given_fields(user_repo, clock, changes, expected):
    user, _ = await user_repo.get_or_create(PHONE, name="Ada", role=Role.USER)
    clock.advance(12.345678)

    updated = await user_repo.update(user.id, **changes)

    assert updated is not None
    for field in ("name", "role", "is_active"):
        assert getattr(updated, field) == expected.get(field, getattr(user, field))
    assert updated.created_at == user.created_at
    assert updated.updated_at == datetime.fromtimestamp(clock.now, UTC)
    assert updated.updated_at > user.updated_at
    assert await user_repo.get(user.id) == updated


async def test_update_reactivates(user_repo):
    user, _ = await user_repo.get_or_create(PHONE, name="Ada", role=Role.USER)
    await user_repo.update(user.id, is_active=False)
    updated = await user_repo.update(user.id, is_active=True)
    assert updated is not None and updated.is_active


async def test_update_unknown_user_is_none(user_repo):
    assert await user_repo.update(999, name="x") is None


async def _populate(user_repo, names: list[str]) -> list:
    users = []
    for i, name in enumerate(names):
        user, _ = await user_repo.get_or_create(f"+1415555{i:04d}", name=name, role=Role.USER)
        users.append(user)
    return users


async def _names(user_repo, query: str, **kw) -> tuple[list[str], int]:
    kw = {"offset": 0, "limit": 100, "after_id": None, **kw}
    users, total = await user_repo.search(query, **kw)
    return [u.name for u in users], total


async def test_search_name_is_case_insensitive_substring(user_repo):
    await _populate(user_repo, ["élodie Martin", "ÉLODIE", "Elodie", "Straße", "Bob"])
    assert await _names(user_repo, "ÉLODIE") == (["élodie Martin", "ÉLODIE"], 2)
    assert await _names(user_repo, "lodie m") == (["élodie Martin"], 1)
    assert await _names(user_repo, "STRASSE") == (["Straße"], 1)  # full case folding
    assert await _names(user_repo, "nobody") == ([], 0)


async def test_search_phone_substring(user_repo):
    users = await _populate(user_repo, ["a", "b", "c"])
    found, total = await user_repo.search("5550001", offset=0, limit=10, after_id=None)
    assert (found, total) == ([users[1]], 1)
    found, total = await user_repo.search("+1415", offset=0, limit=10, after_id=None)
    assert (found, total) == (users, 3)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("%", ["100%"]),
        ("_", ["a_b"]),
        ("\\", ["back\\slash"]),
        ("a%b", []),  # a LIKE pattern would match "a_b" and "axb"
        ("a_b", ["a_b"]),  # a LIKE pattern would match "axb" too
        ("%%", []),
    ],
)
async def test_search_wildcards_match_only_themselves(user_repo, query, expected):
    await _populate(user_repo, ["100%", "a_b", "axb", "back\\slash", "plain"])
    assert await _names(user_repo, query) == (expected, len(expected))


async def test_empty_query_matches_all(user_repo):
    users = await _populate(user_repo, ["a", "", "c"])
    assert await user_repo.search("", offset=0, limit=10, after_id=None) == (users, 3)


async def test_search_pages_by_id(user_repo):
    users = await _populate(user_repo, [f"user {i}" for i in range(7)] + ["other"])

    page, total = await user_repo.search("user", offset=0, limit=3, after_id=None)
    assert (page, total) == (users[0:3], 7)
    page, total = await user_repo.search("user", offset=3, limit=3, after_id=None)
    assert (page, total) == (users[3:6], 7)
    page, total = await user_repo.search("user", offset=6, limit=3, after_id=None)
    assert (page, total) == (users[6:7], 7)
    page, total = await user_repo.search("user", offset=9, limit=3, after_id=None)
    assert (page, total) == ([], 7)


async def test_search_keyset_paging_with_after_id(user_repo):
    users = await _populate(user_repo, [f"user {i}" for i in range(7)])

    seen, after = [], None
    while True:
        page, total = await user_repo.search("user", offset=0, limit=3, after_id=after)
        assert total == 7  # all matches, whatever the page
        if not page:
            break
        seen += page
        after = page[-1].id
    assert seen == users

    page, _ = await user_repo.search("user", offset=1, limit=2, after_id=users[2].id)
    assert page == users[4:6]


async def test_search_totals_follow_renames(user_repo):
    users = await _populate(user_repo, ["Ada", "Ada", "", "Grace"])
    assert await _names(user_repo, "ada") == (["Ada", "Ada"], 2)
    await user_repo.update(users[0].id, name="Grace Ada")
    await user_repo.update(users[1].id, name="")
    await user_repo.update(users[2].id, name="Adam")
    await user_repo.update(users[3].id, name="Grace")  # the same name again: nothing changes
    assert await _names(user_repo, "ada") == (["Grace Ada", "Adam"], 2)
    assert await _names(user_repo, "grace") == (["Grace Ada", "Grace"], 2)
    assert (await _names(user_repo, ""))[1] == 4


async def test_a_user_matching_by_name_and_phone_counts_once(user_repo):
    await _populate(user_repo, ["5550000", "a", "b"])  # the first one's number ends in 5550000
    assert await _names(user_repo, "5550000") == (["5550000"], 1)
    assert await _names(user_repo, "555000") == (["5550000", "a", "b"], 3)


async def test_search_totals_are_exact_after_concurrent_first_logins(user_repo):
    names = ["", "Ada", ""] * 8
    await asyncio.gather(
        *(user_repo.get_or_create(f"+1415556{i:04d}", name=n, role=Role.USER) for i, n in enumerate(names))
    )
    assert (await _names(user_repo, "ada"))[1] == 8
    assert (await _names(user_repo, ""))[1] == 24


async def test_ping(user_repo):
    await user_repo.ping()
