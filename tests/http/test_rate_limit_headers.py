"""SPEC §4 rate limits: headers, sliding windows, client IP and X-Forwarded-For, request ids."""

from __future__ import annotations

import math
import re
import time

import pytest
from litestar.testing import TestClient

from otp_http import create_app
from otp_http.middleware import ClientIp
from otpcore import build_core
from tests.fakes import FakeClock
from tests.http.conftest import assert_error, auth, new_phone, settings_for

SEND = "/api/v1/auth/send-otp"
VERIFY = "/api/v1/auth/verify-otp"
PROFILE = "/api/v1/users/profile"
HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


def rate(response) -> tuple[int, int, int]:
    values = []
    for name in HEADERS:
        raw = response.headers[name]
        assert re.fullmatch(r"\d+", raw), (name, raw)
        values.append(int(raw))
    return tuple(values)  # type: ignore[return-value]


async def verify_junk(api, **kw):
    return await api.verify(new_phone(), "123456", **kw)


async def test_limited_endpoints_carry_integer_headers(make_api):
    api = await make_api(rate_limit_auth_requests=20, rate_limit_user_requests=50)
    response = await verify_junk(api)
    assert rate(response) == (20, 19, 60)
    body = await api.login()
    profile = await api.get(PROFILE, headers=auth(body["token"]))
    assert profile.status_code == 200
    assert rate(profile) == (50, 49, 60)


async def test_error_responses_carry_the_headers_too(make_api):
    api = await make_api(rate_limit_auth_requests=20)
    response = await api.send("nonsense")
    assert response.status_code == 400
    assert rate(response)[0] == 20


async def test_unlimited_endpoints_have_no_headers(mem_api):
    for path in ("/health", "/health/ready", "/metrics"):
        response = await mem_api.get(path)
        assert response.status_code == 200
        assert "X-RateLimit-Limit" not in response.headers


async def test_send_headers_describe_the_per_phone_limit(make_api):
    api = await make_api(rate_limit_auth_requests=20)
    phone = new_phone()
    expected = [(3, 2), (3, 1), (3, 0)]
    for limit_remaining in expected:
        response = await api.send(phone)
        assert response.status_code == 200
        limit, remaining, reset = rate(response)
        assert (limit, remaining) == limit_remaining
        assert 0 < reset <= 600
    response = await api.send(phone)
    assert_error(response, 429, "rate_limit_exceeded")
    assert rate(response)[:2] == (3, 0)
    assert response.headers["X-RateLimit-Exceeded"] == "true"
    assert 0 < int(response.headers["Retry-After"]) <= 600
    # Another number from the same IP: the auth limit (fewest remaining now 15) is not it.
    other = await api.send(new_phone())
    assert rate(other)[:2] == (3, 2)


async def test_headers_switch_to_auth_limit_when_it_has_fewer_remaining(make_api):
    api = await make_api(rate_limit_auth_requests=4)
    await verify_junk(api)
    await verify_junk(api)
    response = await api.send(new_phone())
    # auth: 4 allowed, 3 used -> 1 remaining, fewer than the per-phone 2.
    assert rate(response)[:2] == (4, 1)


async def test_per_ip_auth_limit(make_api):
    api = await make_api(rate_limit_auth_requests=5)
    for i in range(5):
        response = await verify_junk(api)
        assert response.status_code == 400
        assert rate(response)[:2] == (5, 4 - i)
    response = await verify_junk(api)
    assert_error(response, 429, "rate_limit_exceeded")
    assert rate(response)[:2] == (5, 0)
    assert response.headers["X-RateLimit-Exceeded"] == "true"
    assert int(response.headers["Retry-After"]) == rate(response)[2] > 0
    assert "x-request-id" in response.headers
    # Other endpoint families are not affected by the auth limit.
    assert (await api.get("/api/v1/users/profile")).status_code == 401
    # Another IP has its own budget.
    assert (await verify_junk(api, ip="198.51.100.99")).status_code == 400


async def test_global_limit_applies_to_every_api_route(make_api):
    api = await make_api(rate_limit_global_requests=3)
    await api.get("/api/v1/users/profile")
    await verify_junk(api)
    await api.get("/api/v1/nowhere")
    response = await verify_junk(api)
    assert_error(response, 429, "rate_limit_exceeded")
    assert rate(response)[:2] == (3, 0)


async def test_sliding_window_not_fixed_buckets(make_api):
    # Start one second before a minute boundary: a fixed 60 s bucket would reset in 1 s.
    start = (math.floor(time.time() / 60) - 1) * 60 + 59
    clock = FakeClock(start)
    api = await make_api(clock=clock, rate_limit_auth_requests=5, rate_limit_auth_duration=60)
    for _ in range(3):
        assert (await verify_junk(api)).status_code == 400
    clock.advance(0.5)
    for _ in range(2):
        assert (await verify_junk(api)).status_code == 400
    clock.advance(2)  # past the bucket boundary, well inside the 60 s window
    response = await verify_junk(api)
    assert_error(response, 429, "rate_limit_exceeded")
    assert int(response.headers["Retry-After"]) == 58
    clock.advance(57)  # t = 59.5: still inside the window of the first three
    assert (await verify_junk(api)).status_code == 429
    clock.advance(0.6)  # t = 60.1: the first three have left the window, the two others not
    for _ in range(3):
        assert (await verify_junk(api)).status_code == 400
    assert (await verify_junk(api)).status_code == 429


async def test_send_limit_slides_per_phone(make_api):
    clock = FakeClock(time.time())
    api = await make_api(clock=clock)
    phone = new_phone()
    for _ in range(2):
        assert (await api.send(phone)).status_code == 200
    clock.advance(300)
    assert (await api.send(phone)).status_code == 200
    clock.advance(299)
    assert (await api.send(phone)).status_code == 429
    clock.advance(2)  # the first two sends are now more than 10 min old
    assert (await api.send(phone)).status_code == 200
    assert (await api.send(phone)).status_code == 200
    assert (await api.send(phone)).status_code == 429


# -- client IP ------------------------------------------------------------------------------


async def test_xff_ignored_without_trusted_proxies(make_api):
    api = await make_api(rate_limit_auth_requests=2)
    for spoof in ("1.1.1.1", "2.2.2.2"):
        response = await verify_junk(api, headers={"X-Forwarded-For": spoof})
        assert response.status_code == 400
    response = await verify_junk(api, headers={"X-Forwarded-For": "3.3.3.3"})
    assert_error(response, 429, "rate_limit_exceeded")


async def test_xff_ignored_from_an_untrusted_peer(make_api):
    api = await make_api(rate_limit_auth_requests=2, trusted_proxies="10.0.0.0/8")
    for spoof in ("1.1.1.1", "2.2.2.2"):
        assert (await verify_junk(api, headers={"X-Forwarded-For": spoof})).status_code == 400
    response = await verify_junk(api, headers={"X-Forwarded-For": "3.3.3.3"})
    assert response.status_code == 429


async def test_xff_believed_from_a_trusted_proxy(make_api):
    api = await make_api(rate_limit_auth_requests=2, trusted_proxies="10.0.0.0/8")
    proxy = "10.1.2.3"
    for _ in range(2):
        response = await verify_junk(api, ip=proxy, headers={"X-Forwarded-For": "1.1.1.1"})
        assert response.status_code == 400
    limited = await verify_junk(api, ip=proxy, headers={"X-Forwarded-For": "1.1.1.1"})
    assert limited.status_code == 429
    # A different client behind the same proxy has its own budget ...
    fresh = await verify_junk(api, ip=proxy, headers={"X-Forwarded-For": "2.2.2.2"})
    assert fresh.status_code == 400
    # ... but prepending a spoofed hop does not buy one: the proxy appended the real peer.
    spoofed = await verify_junk(api, ip=proxy, headers={"X-Forwarded-For": "9.9.9.9, 1.1.1.1"})
    assert spoofed.status_code == 429


def scope(peer: str | None, *xff: str) -> dict:
    return {
        "type": "http",
        "client": (peer, 1234) if peer else None,
        "headers": [(b"x-forwarded-for", v.encode()) for v in xff],
    }


@pytest.mark.parametrize(
    ("trusted", "sc", "expected"),
    [
        ((), scope("203.0.113.9", "1.1.1.1"), "203.0.113.9"),
        (("10.0.0.0/8",), scope("203.0.113.9", "1.1.1.1"), "203.0.113.9"),
        (("10.0.0.0/8",), scope("10.0.0.1", "1.1.1.1"), "1.1.1.1"),
        (("10.0.0.0/8",), scope("10.0.0.1", "6.6.6.6, 1.1.1.1"), "1.1.1.1"),
        (("10.0.0.0/8",), scope("10.0.0.1", "6.6.6.6", "1.1.1.1, 10.0.0.2"), "1.1.1.1"),
        (("10.0.0.0/8",), scope("10.0.0.1", "not-an-ip"), "10.0.0.1"),
        (("10.0.0.0/8",), scope("10.0.0.1"), "10.0.0.1"),
        (("10.0.0.0/8", "2001:db8::/32"), scope("2001:db8::1", "2001:db8::2, 1.1.1.1"), "1.1.1.1"),
        (("0.0.0.0/0",), scope("testclient", "1.1.1.1"), "testclient"),
    ],
)
def test_client_ip_rules(trusted, sc, expected):
    assert ClientIp(trusted)(sc) == expected


def test_litestar_testclient_peer_is_not_an_ip(tmp_path):
    """Through the sync TestClient (peer "testclient"): XFF is never believed from it."""
    settings = settings_for(rate_limit_auth_requests=1, trusted_proxies="0.0.0.0/0,::/0")
    app = create_app(build_core(settings))
    with TestClient(app) as client:
        body = {"phone_number": new_phone(), "otp_code": "123456"}
        first = client.post(VERIFY, json=body, headers={"X-Forwarded-For": "1.1.1.1"})
        assert first.status_code == 400
        second = client.post(VERIFY, json=body, headers={"X-Forwarded-For": "2.2.2.2"})
        assert second.status_code == 429
        assert second.json()["error"] == "rate_limit_exceeded"


# -- request id -----------------------------------------------------------------------------


async def test_request_id_echoed(mem_api):
    response = await mem_api.get("/health", headers={"X-Request-ID": "abc-123.XYZ:9_z"})
    assert response.headers["X-Request-ID"] == "abc-123.XYZ:9_z"


async def test_request_id_generated_when_absent(mem_api):
    one = (await mem_api.get("/health")).headers["X-Request-ID"]
    two = (await mem_api.get("/health")).headers["X-Request-ID"]
    assert one != two
    assert re.fullmatch(r"[A-Za-z0-9._:-]{8,128}", one)


@pytest.mark.parametrize("bad", ["x" * 500, "a b", "<script>", "abc;def", "é"])
async def test_unsafe_request_id_is_replaced(mem_api, bad):
    response = await mem_api.get("/health", headers={"X-Request-ID": bad.encode("utf-8")})
    echoed = response.headers["X-Request-ID"]
    assert echoed != bad
    assert re.fullmatch(r"[A-Za-z0-9._:-]{8,128}", echoed)


async def test_request_id_on_errors_and_429(make_api):
    api = await make_api(rate_limit_auth_requests=1)
    assert "X-Request-ID" in (await api.get("/nowhere")).headers
    await verify_junk(api)
    limited = await verify_junk(api, headers={"X-Request-ID": "trace-1"})
    assert limited.status_code == 429
    assert limited.headers["X-Request-ID"] == "trace-1"


async def _raw_call(app, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Call the ASGI app with a hand-made scope (headers a real client could not send)."""
    messages: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        messages.append(message)

    await app(
        {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/health",
            "raw_path": b"/health",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"t"), *headers],
            "client": ("198.51.100.1", 1),
            "server": ("t", 80),
        },
        receive,
        send,
    )
    return messages[0]["headers"]


@pytest.mark.parametrize("bad", [b"abc\r\nSet-Cookie: x=1", b"abc\r", b"\nabc"])
async def test_request_id_with_crlf_is_replaced(mem_api, bad):
    headers = dict(await _raw_call(mem_api.app, [(b"x-request-id", bad)]))
    assert headers[b"x-request-id"] != bad
    assert b"\n" not in headers[b"x-request-id"] and b"\r" not in headers[b"x-request-id"]


async def test_request_id_with_trailing_newline_is_replaced(mem_api):
    headers = dict(await _raw_call(mem_api.app, [(b"x-request-id", b"abc\n")]))
    assert b"\n" not in headers[b"x-request-id"]
