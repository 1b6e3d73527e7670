"""SessionStore contract: refresh-token rotation with reuse detection, for every adapter."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from otpcore.domain.ports import RotationOutcome

NOW = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)
TTL = timedelta(days=30)


async def _create(store, user_id, session_id="s1", token=b"t0"):
    return await store.create(session_id, user_id, token, now=NOW, expires_at=NOW + TTL)


async def test_create_and_get(session_store, user_id):
    session = await _create(session_store, user_id)
    assert (session.id, session.user_id, session.revoked) == ("s1", user_id, False)
    assert (session.created_at, session.expires_at) == (NOW, NOW + TTL)
    assert await session_store.get("s1") == session
    assert await session_store.get("nope") is None


async def test_rotation_and_reuse_detection(session_store, user_id):
    await _create(session_store, user_id)

    rotated = await session_store.rotate(b"t0", b"t1", now=LATER, expires_at=LATER + TTL)
    assert rotated.outcome is RotationOutcome.ROTATED
    assert rotated.session is not None
    assert (rotated.session.id, rotated.session.expires_at) == ("s1", LATER + TTL)
    assert await session_store.get("s1") == rotated.session

    again = await session_store.rotate(b"t1", b"t2", now=LATER, expires_at=LATER + TTL)
    assert again.outcome is RotationOutcome.ROTATED

    reused = await session_store.rotate(b"t0", b"t9", now=LATER, expires_at=LATER + TTL)
    assert reused.outcome is RotationOutcome.REUSED
    assert reused.session is not None and reused.session.revoked
    stored = await session_store.get("s1")
    assert stored is not None and stored.revoked

    # The family is dead: the newest token no longer works either.
    after = await session_store.rotate(b"t2", b"t3", now=LATER, expires_at=LATER + TTL)
    assert after.outcome is RotationOutcome.INVALID
    # Nothing was issued under the reuse attempt's new hash.
    assert await session_store.find(b"t9") is None


async def test_unknown_token_is_invalid(session_store, user_id):
    await _create(session_store, user_id)
    rotation = await session_store.rotate(b"nope", b"t1", now=NOW, expires_at=NOW + TTL)
    assert rotation.outcome is RotationOutcome.INVALID
    assert rotation.session is None


async def test_expired_session_is_invalid(session_store, user_id):
    await session_store.create("s1", user_id, b"t0", now=NOW, expires_at=LATER)
    rotation = await session_store.rotate(b"t0", b"t1", now=LATER, expires_at=LATER + TTL)
    assert rotation.outcome is RotationOutcome.INVALID
    assert await session_store.find(b"t1") is None


async def test_session_alive_until_its_expiry(session_store, user_id):
    await session_store.create("s1", user_id, b"t0", now=NOW, expires_at=LATER)
    just_before = LATER - timedelta(microseconds=1)
    rotation = await session_store.rotate(b"t0", b"t1", now=just_before, expires_at=LATER + TTL)
    assert rotation.outcome is RotationOutcome.ROTATED


async def test_revoked_session_is_invalid(session_store, user_id):
    await _create(session_store, user_id)
    assert await session_store.revoke("s1")
    rotation = await session_store.rotate(b"t0", b"t1", now=LATER, expires_at=LATER + TTL)
    assert rotation.outcome is RotationOutcome.INVALID


async def test_revoke_once(session_store, user_id):
    await _create(session_store, user_id)
    assert await session_store.revoke("s1") is True
    assert await session_store.revoke("s1") is False
    assert await session_store.revoke("nope") is False
    stored = await session_store.get("s1")
    assert stored is not None and stored.revoked


async def test_find_by_current_and_rotated_token(session_store, user_id):
    await _create(session_store, user_id)
    await _create(session_store, user_id, session_id="s2", token=b"u0")
    await session_store.rotate(b"t0", b"t1", now=LATER, expires_at=LATER + TTL)

    for token in (b"t0", b"t1"):
        found = await session_store.find(token)
        assert found is not None and found.id == "s1"
    found = await session_store.find(b"u0")
    assert found is not None and found.id == "s2"
    assert await session_store.find(b"nope") is None


async def test_concurrent_rotations_rotate_once(session_store, user_id):
    await _create(session_store, user_id)
    results = await asyncio.gather(
        *(session_store.rotate(b"t0", f"n{i}".encode(), now=LATER, expires_at=LATER + TTL) for i in range(10))
    )
    outcomes = [r.outcome for r in results]
    assert outcomes.count(RotationOutcome.ROTATED) == 1
    # The next one presented a token that had just been rotated: reuse revokes the session,
    # after which the rest are refused outright.
    assert outcomes.count(RotationOutcome.REUSED) >= 1
    assert set(outcomes) == {
        RotationOutcome.ROTATED,
        RotationOutcome.REUSED,
        RotationOutcome.INVALID,
    }
    stored = await session_store.get("s1")
    assert stored is not None and stored.revoked


async def test_ping(session_store):
    await session_store.ping()
