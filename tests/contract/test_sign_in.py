"""SignInStore contract: the user of a number (created once) and a session for them, or none
for an inactive user. Runs against the two-step store over memory and SQLite, and Postgres's
one-statement store."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from otpcore.adapters.memory import MemorySessionStore, MemoryUserRepo
from otpcore.adapters.postgres import PostgresSessionStore, PostgresSignIn, PostgresUserRepo
from otpcore.adapters.sqlite import SqliteSessionStore, SqliteUserRepo
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.model import Role
from otpcore.domain.ports import NewSession
from otpcore.domain.services import StepwiseSignIn

NOW = datetime(2026, 5, 1, tzinfo=UTC)
PHONE = "+14155550123"


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def stores(request, clock):
    """(sign-in store, user repo, session store) over the same data."""
    if request.param == "memory":
        users, sessions = MemoryUserRepo(clock=clock), MemorySessionStore()
        return StepwiseSignIn(users=users, sessions=sessions), users, sessions
    if request.param == "sqlite":
        db = request.getfixturevalue("sqlite_db")
        users, sessions = SqliteUserRepo(db, clock=clock), SqliteSessionStore(db)
        return StepwiseSignIn(users=users, sessions=sessions), users, sessions
    pg = request.getfixturevalue("pg_database")
    pg_users, pg_sessions = PostgresUserRepo(pg, clock=clock), PostgresSessionStore(pg)
    return PostgresSignIn(pg_users, pg_sessions), pg_users, pg_sessions


def new_session(at: datetime = NOW) -> NewSession:
    return NewSession(
        id=uuid.uuid4().hex,
        token_hash=secrets.token_bytes(32),
        created_at=at,
        expires_at=at + timedelta(days=30),
    )


async def test_a_new_number_gets_a_user_and_a_session(stores) -> None:
    store, users, sessions = stores
    opening = new_session()
    signed = await store.sign_in(PHONE, name="Ada", role=Role.ADMIN, session=opening)

    assert signed.created
    assert (signed.user.phone_number, signed.user.name, signed.user.role) == (PHONE, "Ada", Role.ADMIN)
    assert await users.get_by_phone(PHONE) == signed.user
    assert signed.session is not None
    assert (signed.session.id, signed.session.user_id) == (opening.id, signed.user.id)
    stored = await sessions.find(opening.token_hash)
    assert stored is not None and stored.id == opening.id and stored.user_id == signed.user.id
    assert stored.expires_at == opening.expires_at and not stored.revoked
    assert await sessions.get(opening.id) == stored


async def test_a_known_number_keeps_its_user_and_gets_another_session(stores) -> None:
    store, _, sessions = stores
    first = await store.sign_in(PHONE, name="Ada", role=Role.USER, session=new_session())
    opening = new_session()
    again = await store.sign_in(PHONE, name="Someone Else", role=Role.USER, session=opening)

    assert not again.created
    assert again.user == first.user  # the name given later does not rename the user
    assert again.session is not None and again.session.id == opening.id
    assert first.session is not None
    assert await sessions.get(first.session.id) is not None  # the earlier session stays open
    assert (await sessions.find(opening.token_hash)).id == opening.id  # type: ignore[union-attr]


async def test_an_inactive_user_gets_no_session(stores) -> None:
    store, users, sessions = stores
    first = await store.sign_in(PHONE, name="", role=Role.USER, session=new_session())
    await users.update(first.user.id, is_active=False)
    opening = new_session()

    signed = await store.sign_in(PHONE, name="", role=Role.USER, session=opening)

    assert signed.session is None and not signed.created
    assert signed.user.id == first.user.id and not signed.user.is_active
    assert await sessions.get(opening.id) is None
    assert await sessions.find(opening.token_hash) is None


async def test_concurrent_first_sign_ins_create_one_user(stores) -> None:
    store, _, sessions = stores
    openings = [new_session() for _ in range(12)]
    signed = await asyncio.gather(
        *(store.sign_in(PHONE, name=f"n{i}", role=Role.USER, session=s) for i, s in enumerate(openings))
    )

    assert sum(s.created for s in signed) == 1
    assert len({s.user.id for s in signed}) == 1
    for opening in openings:  # every one of them still got its session
        stored = await sessions.get(opening.id)
        assert stored is not None and stored.user_id == signed[0].user.id


async def test_postgres_sign_in_racing_an_uncommitted_first_login(pg_database, pg_dsn) -> None:
    """The one statement finds no row and inserts none: the store falls back to two steps."""
    users, sessions = PostgresUserRepo(pg_database), PostgresSessionStore(pg_database)
    store = PostgresSignIn(users, sessions)
    opening = new_session()
    with psycopg.connect(pg_dsn) as other:  # a transaction left open
        other.execute(
            "INSERT INTO users (phone_number, name, name_folded, role, created_at, updated_at)"
            " VALUES (%s, 'First', 'first', 'user', now(), now())",
            (PHONE,),
        )
        racing = asyncio.create_task(store.sign_in(PHONE, name="Second", role=Role.USER, session=opening))
        await asyncio.sleep(0.3)  # the insert now waits on the uncommitted row
        assert not racing.done()
        other.commit()
        signed = await racing
    assert (signed.user.name, signed.created) == ("First", False)
    assert signed.session is not None
    assert (await sessions.find(opening.token_hash)).user_id == signed.user.id  # type: ignore[union-attr]


async def test_postgres_sign_in_sweeps_long_expired_sessions(pg_database) -> None:
    users, sessions = PostgresUserRepo(pg_database), PostgresSessionStore(pg_database)
    store = PostgresSignIn(users, sessions)
    sessions.SWEEP_EVERY = 2
    old = new_session(NOW - timedelta(days=40))
    await store.sign_in(PHONE, name="", role=Role.USER, session=old)
    await store.sign_in(PHONE, name="", role=Role.USER, session=new_session())
    await store.drain()  # the sweep runs apart from the sign-ins

    assert await sessions.get(old.id) is None  # expired ten days before the second sign-in


async def test_postgres_a_failing_sweep_fails_no_sign_in(pg_database, caplog) -> None:
    users, sessions = PostgresUserRepo(pg_database), PostgresSessionStore(pg_database)
    store = PostgresSignIn(users, sessions)
    sessions.SWEEP_EVERY = 2
    async with pg_database.connection() as conn:  # every DELETE of sessions now fails
        await conn.execute(
            "CREATE FUNCTION refuse_delete() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'no deletes'; END $$"
        )
        await conn.execute(
            "CREATE TRIGGER refuse_delete BEFORE DELETE ON sessions"
            " FOR EACH STATEMENT EXECUTE FUNCTION refuse_delete()"
        )
    try:
        await store.sign_in(PHONE, name="", role=Role.USER, session=new_session())
        openings = [new_session() for _ in range(4)]
        signed = await asyncio.gather(
            *(
                store.sign_in(PHONE if n == 0 else f"+1415555{n:04d}", name="", role=Role.USER, session=s)
                for n, s in enumerate(openings)
            )
        )
        await store.drain()
    finally:
        async with pg_database.connection() as conn:  # the next test's cleanup deletes sessions
            await conn.execute("DROP TRIGGER refuse_delete ON sessions")

    assert all(s.session is not None for s in signed)
    assert all([await sessions.get(s.id) is not None for s in openings])
    assert "sweeping expired sessions failed" in caplog.text


async def test_truncating_users_takes_their_sessions_along(pg_database) -> None:
    """Sessions hold no foreign key to users: a trigger stands in for the cascade, so that ids
    restarted by RESTART IDENTITY cannot hand old sessions to new users."""
    users, sessions = PostgresUserRepo(pg_database), PostgresSessionStore(pg_database)
    opening = new_session()
    await PostgresSignIn(users, sessions).sign_in(PHONE, name="", role=Role.USER, session=opening)
    async with pg_database.connection() as conn:
        await conn.execute("TRUNCATE users RESTART IDENTITY")
    assert await sessions.get(opening.id) is None
    assert await sessions.find(opening.token_hash) is None


def _counting_statements(store: PostgresSignIn) -> list[list[str]]:
    """The numbers of each statement that signs existing users in, as the store runs them."""
    batches: list[list[str]] = []
    run = store._known.store

    async def counted(openings):
        batches.append([opening.phone for opening, _ in openings])
        return await run(openings)

    store._known.store = counted
    return batches


async def test_postgres_sign_ins_arriving_together_share_a_statement(pg_database) -> None:
    users, sessions = PostgresUserRepo(pg_database), PostgresSessionStore(pg_database)
    store = PostgresSignIn(users, sessions)
    phones = [f"+1415555{n:04d}" for n in range(20)]
    known = {
        p: (await store.sign_in(p, name=p[-4:], role=Role.USER, session=new_session())).user for p in phones
    }
    batches = _counting_statements(store)
    openings = [new_session() for _ in phones]

    signed = await asyncio.gather(
        *(store.sign_in(p, name="", role=Role.USER, session=s) for p, s in zip(phones, openings, strict=True))
    )

    assert [len(b) for b in batches] == [20]  # all arrived before the statement went: one for all
    for phone, opening, sign_in in zip(phones, openings, signed, strict=True):
        assert sign_in.user == known[phone] and not sign_in.created
        assert sign_in.session is not None and (sign_in.session.id, sign_in.session.user_id) == (
            opening.id,
            known[phone].id,
        )
        stored = await sessions.find(opening.token_hash)  # each its own token, to its own user
        assert stored is not None and (stored.id, stored.user_id) == (opening.id, known[phone].id)
        assert stored.created_at == opening.created_at and stored.expires_at == opening.expires_at


async def test_postgres_batch_of_known_new_inactive_and_repeated_numbers(pg_database) -> None:
    users, sessions = PostgresUserRepo(pg_database), PostgresSessionStore(pg_database)
    store = PostgresSignIn(users, sessions)
    active, inactive, new = "+14155550001", "+14155550002", "+14155550003"
    for phone in (active, inactive):
        await store.sign_in(phone, name="", role=Role.USER, session=new_session())
    sleeper = await users.get_by_phone(inactive)
    assert sleeper is not None
    await users.update(sleeper.id, is_active=False)
    batches = _counting_statements(store)
    calls = [(active, "a1"), (new, "New"), (inactive, ""), (active, "a2"), (new, "Other"), (active, "a3")]
    openings = [new_session() for _ in calls]

    signed = await asyncio.gather(
        *(
            store.sign_in(p, name=n, role=Role.USER, session=s)
            for (p, n), s in zip(calls, openings, strict=True)
        )
    )

    assert all(len(set(batch)) == len(batch) for batch in batches)  # no number twice in one
    by_phone = {
        phone: [s for (p, _), s in zip(calls, signed, strict=True) if p == phone] for phone in (active, new)
    }
    assert len({s.user.id for s in by_phone[active]}) == 1 and not any(s.created for s in by_phone[active])
    assert len({s.user.id for s in by_phone[new]}) == 1 and sum(s.created for s in by_phone[new]) == 1
    assert by_phone[new][0].user.name == "New"  # the first to create it named it
    assert signed[2].user.id == sleeper.id and signed[2].session is None
    assert await sessions.find(openings[2].token_hash) is None
    for (phone, _), opening, sign_in in zip(calls, openings, signed, strict=True):
        if phone != inactive:
            stored = await sessions.find(opening.token_hash)
            assert sign_in.session is not None and stored is not None
            assert stored.user_id == sign_in.user.id


async def test_postgres_sign_ins_waiting_on_a_failing_statement_each_hear_it(pg_database) -> None:
    users, sessions = PostgresUserRepo(pg_database), PostgresSessionStore(pg_database)
    store = PostgresSignIn(users, sessions)
    await store.sign_in(PHONE, name="", role=Role.USER, session=new_session())
    async with pg_database.connection() as conn:  # every insert of a session now fails
        await conn.execute("ALTER TABLE sessions ADD CONSTRAINT refuse_all CHECK (false) NOT VALID")

    results = await asyncio.gather(
        *(
            store.sign_in(
                PHONE if n == 0 else f"+1415555{n:04d}", name="", role=Role.USER, session=new_session()
            )
            for n in range(6)
        ),
        return_exceptions=True,
    )

    assert all(isinstance(r, ServiceUnavailable) for r in results), results
    assert len({id(r) for r in results}) == 6  # each request raises an exception of its own
    async with pg_database.connection() as conn:
        await conn.execute("ALTER TABLE sessions DROP CONSTRAINT refuse_all")
    signed = await store.sign_in(PHONE, name="", role=Role.USER, session=(opening := new_session()))
    assert signed.session is not None and await sessions.get(opening.id) is not None
