"""UserService with the in-memory adapters: search, roles, profile updates (SPEC §4 Users, Search)."""

from __future__ import annotations

import pytest

from otpcore import Role, User, UserService
from otpcore.adapters.memory import MemoryEventBus, MemoryUserRepo
from otpcore.domain import events as ev
from otpcore.domain.errors import Forbidden, InvalidPhoneNumber, NotFound, ValidationError
from otpcore.domain.model import PhonePolicy
from tests.fakes import FakeClock

ADMIN_PHONE = "+14155550100"
PHONE = "+14155550123"


@pytest.fixture
def repo() -> MemoryUserRepo:
    return MemoryUserRepo(clock=FakeClock())


@pytest.fixture
def bus() -> MemoryEventBus:
    return MemoryEventBus()


@pytest.fixture
def users(repo: MemoryUserRepo, bus: MemoryEventBus) -> UserService:
    return UserService(users=repo, events=bus, phones=PhonePolicy())


@pytest.fixture
async def admin(users: UserService) -> User:
    return await users.set_role(ADMIN_PHONE, Role.ADMIN)


@pytest.fixture
async def regular(repo: MemoryUserRepo) -> User:
    user, _ = await repo.get_or_create(PHONE, name="Ada", role=Role.USER)
    return user


# --- search ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"offset": -1}, "offset"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": -5}, "limit"),
        ({"after_id": -1}, "after_id"),
        ({"query": "q" * 101}, "query"),
    ],
)
async def test_search_validation_names_the_field(
    users: UserService, admin: User, kwargs: dict, field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        await users.search(admin, **kwargs)
    assert info.value.code == "validation_error"
    assert field in info.value.message


@pytest.mark.parametrize("limit", [1, 10, 100])
async def test_search_limit_bounds_accepted(users: UserService, admin: User, limit: int) -> None:
    page = await users.search(admin, limit=limit)
    assert page.limit == limit


async def test_search_defaults(users: UserService, admin: User, regular: User) -> None:
    page = await users.search(admin)
    assert (page.offset, page.limit) == (0, 10)
    assert page.total == 2
    assert [u.id for u in page.users] == [admin.id, regular.id]


async def test_search_by_non_admin_is_forbidden(users: UserService, regular: User) -> None:
    with pytest.raises(Forbidden) as info:
        await users.search(regular)
    assert info.value.code == "forbidden"
    # Forbidden wins over validation: a non-admin learns nothing about the parameters.
    with pytest.raises(Forbidden):
        await users.search(regular, limit=0)


async def test_search_matches_name_case_insensitively_and_phone_substring(
    users: UserService, repo: MemoryUserRepo, admin: User
) -> None:
    ada, _ = await repo.get_or_create("+14155550123", name="Ada Lovelace", role=Role.USER)
    bob, _ = await repo.get_or_create("+442079460958", name="Bob", role=Role.USER)
    assert [u.id for u in (await users.search(admin, "ada")).users] == [ada.id]
    assert [u.id for u in (await users.search(admin, "LOVE")).users] == [ada.id]
    assert [u.id for u in (await users.search(admin, "7946")).users] == [bob.id]
    page = await users.search(admin, "  bob  ")
    assert [u.id for u in page.users] == [bob.id]


@pytest.mark.parametrize("query", ["%", "_", "\\"])
async def test_search_wildcards_match_themselves(
    users: UserService, repo: MemoryUserRepo, admin: User, query: str
) -> None:
    await repo.get_or_create("+14155550123", name="Ada", role=Role.USER)
    odd, _ = await repo.get_or_create("+14155550124", name=f"50{query} off", role=Role.USER)
    page = await users.search(admin, query)
    assert [u.id for u in page.users] == [odd.id]
    assert page.total == 1


async def test_search_paging(users: UserService, repo: MemoryUserRepo, admin: User) -> None:
    made = [
        (await repo.get_or_create(f"+1415555{n:04d}", name=f"user {n}", role=Role.USER))[0]
        for n in range(200, 225)
    ]
    first = await users.search(admin, "user", limit=10)
    assert first.total == 25
    assert [u.id for u in first.users] == [u.id for u in made[:10]]
    assert first.next_after_id == made[9].id
    second = await users.search(admin, "user", offset=10, limit=10)
    assert [u.id for u in second.users] == [u.id for u in made[10:20]]
    keyset = await users.search(admin, "user", limit=10, after_id=first.next_after_id)
    assert [u.id for u in keyset.users] == [u.id for u in made[10:20]]
    last = await users.search(admin, "user", offset=20, limit=10)
    assert len(last.users) == 5
    assert last.next_after_id is None


# --- set_role --------------------------------------------------------------------------------


async def test_set_role_creates_an_unknown_user(users: UserService, repo: MemoryUserRepo) -> None:
    user = await users.set_role("+1 (415) 555-0123", Role.ADMIN)
    assert user.role is Role.ADMIN
    assert user.phone_number == PHONE
    assert await repo.get_by_phone(PHONE) == user


async def test_set_role_promotes_and_demotes(users: UserService, regular: User, bus: MemoryEventBus) -> None:
    promoted = await users.set_role(PHONE, Role.ADMIN)
    assert promoted.id == regular.id
    assert promoted.role is Role.ADMIN
    assert promoted.name == "Ada"
    updated = [e for e in bus.events if e.event_type == ev.USER_UPDATED]
    assert updated[-1].data == {"user_id": regular.id, "fields": ["role"]}
    demoted = await users.set_role(PHONE, Role.USER)
    assert demoted.role is Role.USER


async def test_set_role_refuses_an_invalid_number(users: UserService) -> None:
    with pytest.raises(InvalidPhoneNumber):
        await users.set_role("4155550123", Role.ADMIN)


# --- rename ----------------------------------------------------------------------------------


async def test_rename_trims(users: UserService, regular: User, bus: MemoryEventBus) -> None:
    user = await users.rename(regular.id, "  Ada King  ")
    assert user.name == "Ada King"
    assert bus.events[-1].event_type == ev.USER_UPDATED
    assert bus.events[-1].data["fields"] == ["name"]


@pytest.mark.parametrize("name", ["", "   ", "\n\t", "x" * 101, "Ada\u202e", "Ada\x1b[31m"])
async def test_rename_requires_1_to_100_clean_characters(
    users: UserService, regular: User, name: str
) -> None:
    with pytest.raises(ValidationError) as info:
        await users.rename(regular.id, name)
    assert "name" in info.value.message
    assert (await users.get(regular.id)).name == "Ada"


async def test_rename_accepts_100_characters(users: UserService, regular: User) -> None:
    assert (await users.rename(regular.id, "y" * 100)).name == "y" * 100
    assert (await users.rename(regular.id, "Z")).name == "Z"


async def test_rename_unknown_user_is_not_found(users: UserService) -> None:
    with pytest.raises(NotFound):
        await users.rename(999, "Ada")


# --- get / administer ------------------------------------------------------------------------


async def test_get_unknown_user_is_not_found(users: UserService) -> None:
    with pytest.raises(NotFound) as info:
        await users.get(12345)
    assert info.value.code == "not_found"


async def test_administer_requires_admin(users: UserService, regular: User) -> None:
    with pytest.raises(Forbidden):
        await users.administer(regular, regular.id, role=Role.ADMIN)
    assert (await users.get(regular.id)).role is Role.USER


async def test_administer_changes_fields(users: UserService, admin: User, regular: User) -> None:
    user = await users.administer(admin, regular.id, is_active=False, name=" Countess ")
    assert user.is_active is False
    assert user.name == "Countess"
    assert user.role is Role.USER
    with pytest.raises(ValidationError):
        await users.administer(admin, regular.id, name="   ")
    with pytest.raises(NotFound):
        await users.administer(admin, 999, role=Role.ADMIN)
