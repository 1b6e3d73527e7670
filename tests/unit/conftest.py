"""Service-layer fixtures: the real library wired with in-memory adapters and a fake clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from otpcore import Settings, build_core
from otpcore.adapters.memory import MemoryCodeSender
from otpcore.container import Core
from tests.fakes import FakeClock

SECRET = "t" * 40
PHONE = "+14155550123"
OTHER_PHONE = "+14155550124"
TEST_PHONE = "+15555550100"
TEST_CODE = "123456"


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "db_provider": "memory",
        "otp_sender": "memory",
        "jwt_secret": SECRET,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def clock() -> FakeClock:
    # Wall-clock "now": access tokens' exp is checked by the JWT library against real time.
    return FakeClock(now=float(int(time.time())))


@pytest.fixture
async def make_core(clock: FakeClock) -> AsyncIterator[Callable[..., Core]]:
    built: list[Core] = []

    def factory(**overrides: Any) -> Core:
        providers = {k: overrides.pop(k) for k in ("code_sender",) if k in overrides}
        core = build_core(make_settings(**overrides), clock=clock, **providers)
        built.append(core)
        return core

    yield factory
    for core in built:
        await core.aclose()


@pytest.fixture
def core(make_core: Callable[..., Core]) -> Core:
    return make_core()


def sender_of(core: Core) -> MemoryCodeSender:
    sender = core.container.code_sender()
    assert isinstance(sender, MemoryCodeSender)
    return sender


async def settle() -> None:
    """Let background deliveries run."""
    for _ in range(3):
        await asyncio.sleep(0)


async def send_and_read(core: Core, phone: str = PHONE) -> str:
    """Send a code and read it back from the memory sender."""
    result = await core.auth.send_code(phone)
    await settle()
    return sender_of(core).last_code(result.phone_number)
