"""SPEC §3: every 4xx/5xx is {"error", "message"}; the code -> status table; framework errors."""

from __future__ import annotations

import httpx
import pytest
from litestar import Litestar, get, post

from otp_http.errors import EXCEPTION_HANDLERS, STATUS
from otpcore.domain import errors as e
from otpcore.domain.ports import RateDecision
from tests.http.conftest import assert_error, new_phone

# SPEC §3 "Error codes", verbatim.
SPEC_CODES = {
    "invalid_phone_number": 400,
    "invalid_otp": 400,
    "otp_expired": 400,
    "too_many_attempts": 429,
    "rate_limit_exceeded": 429,
    "authorization_required": 401,
    "invalid_token": 401,
    "forbidden": 403,
    "user_inactive": 403,
    "not_found": 404,
    "validation_error": 400,
    "service_unavailable": 503,
}

SEND = "/api/v1/auth/send-otp"
VERIFY = "/api/v1/auth/verify-otp"


def _raise(cls: type[e.OtpError]) -> e.OtpError:
    if cls is e.RateLimitExceeded:
        decision = RateDecision(allowed=False, limit=3, remaining=0, reset_after=60, name="otp")
        return e.RateLimitExceeded(decision)
    return cls()


def _errors_app() -> Litestar:
    """A test-only app with the production error table and routes that raise."""
    by_name = {cls.__name__: cls for cls in STATUS}

    @get("/raise/{name:str}")
    async def raise_domain(name: str) -> None:
        raise _raise(by_name[name])

    @get("/boom")
    async def boom() -> None:
        raise RuntimeError("db password=hunter2 at /srv/app/secret.py line 42")

    @get("/boom-key")
    async def boom_key() -> None:
        return {}["missing"]  # KeyError

    @post("/echo")
    async def echo(data: dict) -> dict:
        return data

    return Litestar(
        route_handlers=[raise_domain, boom, boom_key, echo],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        debug=False,
        logging_config=None,
    )


@pytest.fixture
async def errors_client():
    transport = httpx.ASGITransport(app=_errors_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


def test_status_table_covers_every_spec_code():
    assert {cls.code: status for cls, status in STATUS.items()} == SPEC_CODES


@pytest.mark.parametrize("cls", list(STATUS), ids=lambda c: c.__name__)
async def test_every_domain_error_maps_to_its_status_and_body(errors_client, cls):
    response = await errors_client.get(f"/raise/{cls.__name__}")
    assert_error(response, SPEC_CODES[cls.code], cls.code)
    assert response.json()["error"] == cls.code


@pytest.mark.parametrize("path", ["/boom", "/boom-key"])
async def test_unhandled_exception_is_internal_error_without_internals(errors_client, path):
    response = await errors_client.get(path)
    body = assert_error(response, 500, "internal_error")
    text = response.text
    for leak in ("Traceback", "RuntimeError", "KeyError", "hunter2", "secret.py", "missing"):
        assert leak not in text
    assert body["message"] == "internal server error"


async def test_internal_error_from_a_failing_store_through_the_real_app(make_api, caplog):
    class ExplodingRepo:
        async def get_or_create(self, *a, **k):
            raise RuntimeError("connection string postgres://u:pw@db/x")

        async def get(self, *a, **k):
            raise RuntimeError("boom")

        async def ping(self):
            return None

    api = await make_api(overrides={"user_repo": ExplodingRepo()})
    phone = new_phone()
    code = await api.send_and_code(phone)
    response = await api.verify(phone, code)
    assert_error(response, 500, "internal_error")
    assert "postgres" not in response.text and "RuntimeError" not in response.text
    assert "x-request-id" in response.headers


async def test_unknown_route_is_not_found(mem_api):
    response = await mem_api.get("/api/v1/nope")
    assert_error(response, 404, "not_found")
    response = await mem_api.post("/definitely/not/here", {"a": 1})
    assert_error(response, 404, "not_found")


async def test_wrong_method_is_method_not_allowed(mem_api):
    assert_error(await mem_api.get(SEND), 405, "method_not_allowed")
    response = await mem_api.client().delete("/api/v1/users/profile")
    assert_error(response, 405, "method_not_allowed")
    response = await mem_api.client().put("/health", json={})
    assert_error(response, 405, "method_not_allowed")


async def test_oversized_body_is_payload_too_large(mem_api):
    body = b'{"phone_number": "' + b"1" * (17 * 1024) + b'"}'
    response = await mem_api.post(SEND, content=body, headers={"content-type": "application/json"})
    assert_error(response, 413, "payload_too_large")


async def test_oversized_chunked_body_without_content_length(mem_api):
    async def chunks():
        yield b'{"phone_number": "'
        for _ in range(20):
            yield b"1" * 1024
        yield b'"}'

    response = await mem_api.post(SEND, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")


async def test_body_just_under_the_limit_is_not_413(mem_api):
    filler = "x" * (16 * 1024 - 100)
    response = await mem_api.post(SEND, {"phone_number": new_phone(), "pad": filler})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "raw",
    [b"{", b'{"phone_number": }', b"not json", b'{"phone_number": "+1"', b"\xff\xfe", b"NaN"],
)
async def test_malformed_json_is_invalid_request(mem_api, raw):
    response = await mem_api.post(SEND, content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize("path", [SEND, VERIFY, "/api/v1/auth/refresh"])
async def test_invalid_utf8_in_a_json_string_is_invalid_request(mem_api, path):
    raw = b'{"phone_number": "\xff\xfe", "otp_code": "1", "refresh_token": "\xff"}'
    response = await mem_api.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize(
    "raw",
    [b'{"phone_number": ' + b"[" * 1000 + b"]" * 1000 + b"}", b"[" * 2000 + b"]" * 2000],
)
async def test_deeply_nested_json_is_a_client_error(mem_api, raw):
    response = await mem_api.post(SEND, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] in {"invalid_request", "validation_error"}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (SEND, {"phone_number": 14155550123}, "phone_number"),
        (SEND, {}, "phone_number"),
        (SEND, {"phone": "+14155550123"}, "phone_number"),
        (VERIFY, {"phone_number": "+14155550123"}, "otp_code"),
        (VERIFY, {"phone_number": "+14155550123", "otp_code": 123456}, "otp_code"),
        (VERIFY, {"phone_number": "+14155550123", "otp_code": "1", "name": 5}, "name"),
        ("/api/v1/auth/refresh", {}, "refresh_token"),
        ("/api/v1/auth/refresh", {"refresh_token": None}, "refresh_token"),
    ],
)
async def test_validation_error_names_the_field(mem_api, path, body, field):
    response = await mem_api.post(path, body)
    body = assert_error(response, 400, "validation_error")
    assert field in body["message"]


@pytest.mark.parametrize("body", [[], ["+14155550123"], "+14155550123", 42, None])
async def test_non_object_body_is_validation_error(mem_api, body):
    response = await mem_api.post(SEND, content=_json(body), headers={"content-type": "application/json"})
    assert_error(response, 400, "validation_error")


def _json(value: object) -> bytes:
    import json

    return json.dumps(value).encode()
