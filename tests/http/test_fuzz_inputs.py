"""Hand-made malformed inputs against every body-taking endpoint and the search query string.

Whatever comes in, no response is a 500 and every error body is the SPEC's shape.
"""

from __future__ import annotations

import json

import pytest

from tests.http.conftest import auth, new_phone

ALLOWED_ERROR_KEYS = {"error", "message", "attempts_remaining", "retry_after"}
LIMIT = 16 * 1024
PHONE = "+14155550177"


def j(value: object) -> bytes:
    return json.dumps(value).encode()


def near_limit(field: str, other: dict | None = None) -> bytes:
    """A body whose one string field fills the 16 KiB limit (just under)."""
    base = j({**(other or {}), field: ""})
    return j({**(other or {}), field: "9" * (LIMIT - len(base) - 1)})


RAW_BODIES: list[bytes] = [
    b"",
    b" ",
    b"{}",
    b"[]",
    b"null",
    b"true",
    b"0",
    b"-1",
    b"1e999",
    b'"string"',
    b"[{}]",
    b"NaN",
    b"Infinity",
    b'{"phone_number": NaN}',
    b'{"phone_number": Infinity}',
    b'{"phone_number": "+14155550123",}',
    b"{'phone_number': '+14155550123'}",
    b'\xef\xbb\xbf{"phone_number": "+14155550123"}',
    b'{"phone_number": "\\ud800"}',
    b'{"phone_number": "\\u0000"}',
    b'{"phone_number": "+14155550123", "phone_number": 5}',
    b"[" * 400 + b"]" * 400,
    b'{"a":' * 400 + b"1" + b"}" * 400,
    b"\x00\x01\x02",
    near_limit("phone_number"),
    near_limit("otp_code", {"phone_number": PHONE}),
    near_limit("name", {"phone_number": PHONE, "otp_code": "123456"}),
    near_limit("refresh_token"),
    near_limit("pad", {"phone_number": PHONE}),
]

VALUES: list[object] = [
    None,
    True,
    0,
    -1,
    2**64,
    1.5,
    "",
    " ",
    "\t\n",
    "null",
    "true",
    "123456",
    "0" * 64,
    "0" * 65,
    "+14155550123",
    "+1 415 555 0123 ext. 5",
    "+" + "".join(chr(0xFF10 + int(d)) for d in "14155550123"),  # full-width digits
    "+١٤١٥٥٥٥٠١٢٣",
    "+14155550123\n",
    "+14155550123\x00",
    "\u202e\u200b",
    "👩‍💻" * 30,
    "Ωμέγα " * 40,
    "x" * 1001,
    "admin",
    "ADMIN",
    "%",
    "' OR 1=1 --",
    "{{7*7}}",
    [],
    ["+14155550123"],
    {},
    {"$ne": ""},
    {"nested": {"deeper": [1, 2, {"x": None}]}},
]

FIELDS = {
    "/api/v1/auth/send-otp": ["phone_number"],
    "/api/v1/auth/verify-otp": ["phone_number", "otp_code", "name"],
    "/api/v1/auth/refresh": ["refresh_token"],
    "/api/v1/auth/logout": ["refresh_token"],
    "PUT /api/v1/users/profile": ["name"],
    "PATCH user": ["role", "is_active", "name"],
}

BASE = {
    "/api/v1/auth/send-otp": {"phone_number": PHONE},
    "/api/v1/auth/verify-otp": {"phone_number": PHONE, "otp_code": "123456"},
    "/api/v1/auth/refresh": {"refresh_token": "x"},
    "/api/v1/auth/logout": {},
    "PUT /api/v1/users/profile": {"name": "ok"},
    "PATCH user": {},
}


def assert_well_formed(response, what: object) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text)
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict), (what, body)
        assert {"error", "message"} <= set(body) <= ALLOWED_ERROR_KEYS, (what, body)
        assert isinstance(body["error"], str) and isinstance(body["message"], str)
        assert "Traceback" not in response.text


@pytest.fixture
async def fuzz_api(make_api, storage):
    api = await make_api(storage, rate_limit_otp_requests=100_000)
    admin = await api.admin()
    victim = await api.login(new_phone(), name="Victim")
    return api, admin, victim


def targets(admin: dict, victim: dict):
    """(label, method, path, headers) of every endpoint that takes a body."""
    admin_h = auth(admin["token"])
    yield "/api/v1/auth/send-otp", "POST", "/api/v1/auth/send-otp", {}
    yield "/api/v1/auth/verify-otp", "POST", "/api/v1/auth/verify-otp", {}
    yield "/api/v1/auth/refresh", "POST", "/api/v1/auth/refresh", {}
    yield "/api/v1/auth/logout", "POST", "/api/v1/auth/logout", auth(victim["token"])
    yield "PUT /api/v1/users/profile", "PUT", "/api/v1/users/profile", admin_h
    yield "PATCH user", "PATCH", f"/api/v1/users/{victim['user']['id']}", admin_h


async def test_raw_bodies_never_500(fuzz_api):
    api, admin, victim = fuzz_api
    for label, method, path, headers in targets(admin, victim):
        if label == "/api/v1/auth/logout":
            continue  # it may revoke the victim's session; covered separately below
        for raw in RAW_BODIES:
            response = await api.client().request(
                method, path, content=raw, headers={**headers, "content-type": "application/json"}
            )
            assert_well_formed(response, (label, raw[:60]))


async def test_field_values_never_500(fuzz_api):
    api, admin, victim = fuzz_api
    for label, method, path, headers in targets(admin, victim):
        if label == "/api/v1/auth/logout":
            continue
        for field in FIELDS[label]:
            for value in VALUES:
                body = {**BASE[label], field: value}
                response = await api.client().request(method, path, json=body, headers=headers)
                assert_well_formed(response, (label, field, value))


async def test_logout_bodies_never_500(fuzz_api):
    api, _, _ = fuzz_api
    for value in [*VALUES, *RAW_BODIES]:
        session = await api.login()
        kwargs = {"content": value} if isinstance(value, bytes) else {"json": {"refresh_token": value}}
        response = await api.client().post(
            "/api/v1/auth/logout",
            headers={**auth(session["token"]), "content-type": "application/json"},
            **kwargs,
        )
        assert_well_formed(response, value)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/xml", ""],
)
async def test_other_content_types_never_500(mem_api, content_type):
    for path in ("/api/v1/auth/send-otp", "/api/v1/auth/verify-otp", "/api/v1/auth/refresh"):
        response = await mem_api.client().post(
            path, content=b"phone_number=%2B14155550123", headers={"content-type": content_type}
        )
        assert_well_formed(response, (path, content_type))


QUERY_STRINGS = [
    "query=%00",
    "query=%FF%FE",
    "query=%",
    "query=%25%5F%5C",
    "query=" + "%F0%9F%98%80" * 100,
    "query=' OR 1=1 --",
    "query=a&query=b",
    "query=",
    "offset=",
    "limit=",
    "offset=1e10",
    "offset=99999999999999999999999",
    "offset=1000000001",
    "offset=-0",
    "limit=NaN",
    "limit=1.0",
    "limit=%201",
    "limit=0x10",
    "limit=10&limit=20",
    "after_id=99999999999999999999999",
    "after_id=9223372036854775807",
    "after_id=9223372036854775808",
    "after_id=",
    "after_id=null",
    "offset[]=1",
    "query[$ne]=x",
    "&&&==&",
    "query=" + "a" * 5000,
    "unknown=1",
]


async def test_search_odd_query_strings_never_500(fuzz_api):
    api, admin, _ = fuzz_api
    for qs in QUERY_STRINGS:
        response = await api.get(f"/api/v1/users/search?{qs}", headers=auth(admin["token"]))
        assert_well_formed(response, qs)
        if response.status_code == 200:
            body = response.json()
            assert 1 <= body["limit"] <= 100 and body["offset"] >= 0, (qs, body)


async def test_odd_paths_and_headers_never_500(mem_api):
    client = mem_api.client()
    for path in ("/api/v1/users/%00", "/api/v1/users/..%2F..%2Fetc", "/api/v1/users/1%0A",
                 "/api/v1/auth/send-otp/", "//api/v1/auth/send-otp", "/api/v1/users/search/"):  # fmt: skip
        assert_well_formed(await client.get(path), path)
    for value in ("Bearer " + "a" * 8000, "Bearer \x7f", "Bearer a.b", "Bearer ....", "Bearer =="):
        response = await client.get("/api/v1/users/profile", headers={"Authorization": value})
        assert_well_formed(response, value)
        assert response.status_code == 401
