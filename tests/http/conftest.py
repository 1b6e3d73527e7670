"""Fixtures for the HTTP suite: an app per test, a client per peer IP, and sign-in helpers.

The app is driven through ``httpx.ASGITransport`` on the test's own event loop, so
``asyncio.gather`` really interleaves requests (Litestar's AsyncTestClient runs the app
through a blocking portal, one request at a time) and the peer IP can be chosen.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from otp_http import create_app
from otpcore import Core, Settings, build_core
from tests.fakes import FakeClock

SECRET = "t" * 40
ADMIN_PHONE = "+14155550100"
TEST_PHONE = "+15555550100"
TEST_CODE = "123456"
PEER = "198.51.100.7"
HIGH = 100_000

_numbers = itertools.count(2000)


def new_phone() -> str:
    """A valid US number no other test uses."""
    return f"+1415555{next(_numbers):04d}"


def settings_for(storage: str = "memory", tmp_path: Any = None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "db_provider": storage,
        "otp_sender": "memory",
        "jwt_secret": SECRET,
        "otp_admin_phone_numbers": ADMIN_PHONE,
        # Per-IP limits out of the way unless a test sets them.
        "rate_limit_global_requests": HIGH,
        "rate_limit_auth_requests": HIGH,
        "rate_limit_user_requests": HIGH,
    }
    if storage == "sqlite":
        values["sqlite_path"] = str(tmp_path / "otp.db")
    values.update(overrides)
    return Settings(**values)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int, code: str, *extra: str) -> dict:
    """The SPEC's error body: exactly error and message (plus the named optional fields)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    assert set(body) == {"error", "message", *extra}, body
    return body


class Api:
    """One app (one Core) and helpers that speak to it over HTTP."""

    def __init__(self, core: Core, clock: FakeClock) -> None:
        self.core = core
        self.clock = clock
        self.app = create_app(core)
        self.sender = core.container.code_sender()
        self._clients: dict[str, httpx.AsyncClient] = {}

    def client(self, ip: str = PEER) -> httpx.AsyncClient:
        if ip not in self._clients:
            transport = httpx.ASGITransport(app=self.app, client=(ip, 40000))
            self._clients[ip] = httpx.AsyncClient(transport=transport, base_url="http://testserver")
        return self._clients[ip]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        await self.core.aclose()

    # -- requests ---------------------------------------------------------------------------
    async def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        ip = kw.pop("ip", PEER)
        if body is not None:
            kw["json"] = body
        return await self.client(ip).post(path, **kw)

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        ip = kw.pop("ip", PEER)
        return await self.client(ip).get(path, **kw)

    async def send(self, phone: str, **kw: Any) -> httpx.Response:
        return await self.post("/api/v1/auth/send-otp", {"phone_number": phone}, **kw)

    async def verify(self, phone: str, code: str, name: str | None = None, **kw: Any):
        body: dict[str, Any] = {"phone_number": phone, "otp_code": code}
        if name is not None:
            body["name"] = name
        return await self.post("/api/v1/auth/verify-otp", body, **kw)

    async def code(self, phone: str, *, after: int = 0) -> str:
        """The last code delivered to ``phone`` (delivery runs after the response)."""
        for _ in range(200):
            sent = [c for to, c, _ in self.sender.sent[after:] if to == phone]
            if sent:
                return sent[-1]
            await asyncio.sleep(0.005)
        raise AssertionError(f"no code was delivered to {phone}")

    async def send_and_code(self, phone: str) -> str:
        before = len(self.sender.sent)
        response = await self.send(phone)
        assert response.status_code == 200, response.text
        return await self.code(response.json()["phone_number"], after=before)

    async def login(self, phone: str | None = None, name: str | None = None) -> dict:
        phone = phone or new_phone()
        code = await self.send_and_code(phone)
        response = await self.verify(phone, code, name)
        assert response.status_code == 200, response.text
        return response.json()

    async def admin(self) -> dict:
        return await self.login(ADMIN_PHONE)


MakeApi = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api(tmp_path) -> AsyncIterator[MakeApi]:
    """``await make_api(storage="memory", clock=None, overrides={...}, **settings)``."""
    made: list[Api] = []
    counter = itertools.count()

    async def make(
        storage: str = "memory",
        *,
        clock: FakeClock | None = None,
        overrides: dict[str, object] | None = None,
        **settings: Any,
    ) -> Api:
        clock = clock or FakeClock(time.time())
        directory = tmp_path / f"app{next(counter)}"
        directory.mkdir()
        settings.setdefault("sqlite_path", str(directory / "otp.db"))
        core = build_core(settings_for(storage, directory, **settings), clock=clock, **(overrides or {}))
        api = Api(core, clock)
        made.append(api)
        return api

    yield make
    for api in made:
        await api.aclose()


@pytest.fixture(params=["memory", "sqlite"])
def storage(request) -> str:
    return request.param


@pytest.fixture
async def api(make_api, storage) -> Api:
    """An app on each embedded storage (memory, and the SQLite default)."""
    return await make_api(storage)


@pytest.fixture
async def mem_api(make_api) -> Api:
    return await make_api("memory")
