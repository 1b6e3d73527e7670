"""The fast lane (otp_http/fastlane.py) answers exactly as Litestar does.

Two apps over two cores with identical settings and identical fixed clocks: ``fast`` is
``create_app(core)`` (send-otp, verify-otp and GET profile without an Origin header skip
Litestar), ``slow`` is ``create_app(core, fast_lane=False)`` (every request goes through
Litestar). Each case sends the same request to both -- as raw ASGI messages, so that a body can
arrive in several messages or be cut short by a disconnect -- and compares (``view``) the status,
the parsed JSON body, the header multiset and the ASGI messages sent. Left out: ``date``; the
values of ``X-Request-ID`` (required once) and ``Content-Length`` (must equal the body's length);
tokens and user ids in bodies (random, or drifting once one app created a user the other did not:
each test checks them within its app). Each case also names Litestar's answer, so that no
comparison passes because both apps failed alike.

Building a Litestar app takes about 0.2 s, so the pair is built once for the module; tests stay
independent by each using phone numbers no other test uses (bodies below are written with
``MARK``/``TEST_MARK`` and get a fresh number substituted).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import pytest
import pytest_asyncio

from otp_http import create_app
from otpcore import Core, Role, build_core
from tests.fakes import FakeClock
from tests.http.conftest import ADMIN_PHONE, PEER, new_phone, settings_for

pytestmark = pytest.mark.asyncio(loop_scope="module")

SEND = "/api/v1/auth/send-otp"
VERIFY = "/api/v1/auth/verify-otp"
PROFILE = "/api/v1/users/profile"
LOGOUT = "/api/v1/auth/logout"
NOW = 1_750_000_000.0
LIMIT = 16 * 1024
ORIGIN = "http://localhost:3000"

# Placeholders in the bodies below: a real number (never sent to) and a test number; each test
# substitutes numbers of its own, of the same length.
MARK = "+14155550123"
TEST_MARK = "+15555550100"
TEST_CODE = "123456"
TEST_NUMBERS = [f"+1555555{n:04d}" for n in range(1000, 1500)]
_test_numbers = iter(TEST_NUMBERS)


def fresh_test_number() -> str:
    """A configured test number (fixed code TEST_CODE) no other test uses."""
    return next(_test_numbers)


Side = Literal["fast", "slow"]
SIDES: tuple[Side, Side] = ("fast", "slow")
T = TypeVar("T")
Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class Sides(Generic[T]):
    """A value that differs between the two apps (a token, a delivered code)."""

    fast: T
    slow: T

    def of(self, side: Side) -> T:
        return self.fast if side == "fast" else self.slow

    @classmethod
    def build(cls, make: Callable[[Side], T]) -> Sides[T]:
        return cls(make("fast"), make("slow"))


def j(value: object) -> bytes:
    return json.dumps(value).encode()


def swap(body: bytes, real: str = MARK, test: str = TEST_MARK) -> bytes:
    return body.replace(MARK.encode(), real.encode()).replace(TEST_MARK.encode(), test.encode())


def bearer(token: str) -> Headers:
    return [("authorization", f"Bearer {token}")]


# -- driving an app with raw ASGI messages ------------------------------------------------------


@dataclass
class Reply:
    status: int | None
    headers: Headers
    body: bytes
    raised: str | None = None
    sent: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: Any,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    chunks: list[bytes] | None = None,
    disconnect: bool = False,
    headers: Headers | None = None,
    content_type: str | None = "application/json",
    query: bytes = b"",
) -> Reply:
    """One request as a server hands it over: ``body`` in one message, or ``chunks`` in several
    (``more_body=True`` on all but the last); ``disconnect`` replaces the last chunk with
    ``http.disconnect`` (content-length still announcing every chunk). ``headers`` replace the
    defaults (host, content-type, content-length) of the same name."""
    parts = chunks if chunks is not None else [body or b""]
    raw: list[tuple[bytes, bytes]] = [(b"host", b"testserver")]
    if body is not None or chunks is not None:
        if content_type is not None:
            raw.append((b"content-type", content_type.encode()))
        raw.append((b"content-length", b"%d" % sum(map(len, parts))))
    given = [(name.lower().encode(), value.encode("latin-1")) for name, value in headers or []]
    raw = [header for header in raw if header[0] not in {name for name, _ in given}] + given
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": raw,
        "client": (PEER, 40000),
        "server": ("testserver", 80),
    }
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(parts) - 1}
        for i, chunk in enumerate(parts)
    ]
    if disconnect:
        messages[-1] = {"type": "http.disconnect"}

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    reply = Reply(status=None, headers=[], body=b"")

    async def send(message: dict[str, Any]) -> None:
        reply.sent.append(message["type"])
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = [
                (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in message["headers"]
            ]
        elif message["type"] == "http.response.body":
            reply.body += message.get("body", b"")

    try:
        await app(scope, receive, send)
    except Exception as exc:  # compared like the rest
        reply.raised = type(exc).__name__
    return reply


# -- the one comparison -------------------------------------------------------------------------


# Body fields that differ between the two apps whatever the lane: tokens are random, and ids
# would drift as soon as one app created a user the other did not. Each is checked for presence
# and type, then masked; tests check them within each app instead (a token works on its app).
VOLATILE: tuple[tuple[str, ...], ...] = (("token",), ("refresh_token",), ("id",), ("user", "id"))


def view(reply: Reply) -> dict[str, Any]:
    """What must be equal between the apps: everything but ``date``, the request id's value, the
    content-length value (checked against the body) and the VOLATILE body fields."""
    names = [name for name, _ in reply.headers]
    if reply.status is not None:
        assert names.count("x-request-id") == 1, reply.headers
    if "content-length" in names:
        assert dict(reply.headers)["content-length"] == str(len(reply.body)), reply.headers
    hidden = {"x-request-id", "content-length"}
    headers = Counter(
        (name, "*" if name in hidden else allowed(value) if name == "allow" else value)
        for name, value in reply.headers
        if name != "date"
    )
    body: Any = reply.body
    if dict(reply.headers).get("content-type", "").startswith("application/json") and reply.body:
        body = reply.json()
        for *parents, key in VOLATILE:
            holder = body
            for parent in parents:
                holder = holder.get(parent) if isinstance(holder, dict) else None
            if isinstance(holder, dict) and key in holder:
                assert isinstance(holder[key], int if key == "id" else str) and holder[key], (key, body)
                holder[key] = "<masked>"
    return {
        "status": reply.status,
        "body": body,
        "headers": headers,
        "sent": reply.sent,
        "raised": reply.raised,
    }


def allowed(value: str) -> str:
    """Litestar lists a 405's Allow methods in an order that differs between app instances
    (fast lane or not): compare them as a set."""
    return ", ".join(sorted(method.strip() for method in value.split(",")))


def assert_same(fast: Reply, slow: Reply) -> None:
    assert view(fast) == view(slow)


def expect(reply: Reply, status: int, error: str | None = None) -> None:
    """Litestar's own answer, so that a case cannot pass by both apps failing alike."""
    assert reply.status == status, (reply.status, reply.body)
    if error is not None:
        assert reply.json()["error"] == error, reply.body


class Pair:
    """The fast-lane app and the Litestar-only app, over cores built alike."""

    def __init__(self, cores: dict[Side, Core], clocks: dict[Side, FakeClock]) -> None:
        self.cores = cores
        self.clocks = clocks
        self.apps = {"fast": create_app(cores["fast"]), "slow": create_app(cores["slow"], fast_lane=False)}

    async def both(self, method: str, path: str, **kw: Any) -> dict[Side, Reply]:
        """The same request to each app; a ``Sides`` keyword value gives each app its own."""
        return {
            side: await call(
                self.apps[side],
                method,
                path,
                **{k: v.of(side) if isinstance(v, Sides) else v for k, v in kw.items()},
            )
            for side in SIDES
        }

    async def same(self, method: str, path: str, **kw: Any) -> Reply:
        """Both apps must answer alike; returns Litestar's answer."""
        replies = await self.both(method, path, **kw)
        assert_same(replies["fast"], replies["slow"])
        return replies["slow"]

    def advance(self, seconds: float) -> None:
        for clock in self.clocks.values():
            clock.advance(seconds)

    async def codes(self, phone: str) -> Sides[str]:
        """The last code each core delivered to ``phone`` (delivery follows the response)."""

        async def code(side: Side) -> str:
            sender = self.cores[side].container.code_sender()
            for _ in range(200):
                sent = [c for to, c, _ in sender.sent if to == phone]
                if sent:
                    return sent[-1]
                await asyncio.sleep(0.005)
            raise AssertionError(f"{side}: no code was delivered to {phone}")

        return Sides(await code("fast"), await code("slow"))

    async def send(self, phone: str) -> Reply:
        return await self.same("POST", SEND, body=j({"phone_number": phone}))

    async def login(self, phone: str | None = None) -> Sides[dict]:
        """Sign in on both apps (the verify-otp answers compared); each app's token response."""
        phone = phone or fresh_test_number()
        expect(await self.send(phone), 200)  # a test number's fixed code is single use too
        code = Sides(TEST_CODE, TEST_CODE) if phone in TEST_NUMBERS else await self.codes(phone)
        body = Sides.build(lambda side: j({"phone_number": phone, "otp_code": code.of(side)}))
        replies = await self.both("POST", VERIFY, body=body)
        assert_same(replies["fast"], replies["slow"])
        expect(replies["slow"], 200)
        return Sides(replies["fast"].json(), replies["slow"].json())

    async def tokens(self, phone: str | None = None) -> Sides[str]:
        signed_in = await self.login(phone)
        return Sides(signed_in.fast["token"], signed_in.slow["token"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pair(tmp_path_factory):
    cores: dict[Side, Core] = {}
    clocks: dict[Side, FakeClock] = {}
    for side in SIDES:
        clocks[side] = FakeClock(NOW)
        settings = settings_for(
            "sqlite",  # the embedded default
            tmp_path_factory.mktemp(side),
            otp_test_phone_numbers=",".join(f"{n}={TEST_CODE}" for n in TEST_NUMBERS),
            otp_allowed_countries="US,GB",
        )
        cores[side] = build_core(settings, clock=clocks[side])
    yield Pair(cores, clocks)
    for core in cores.values():
        await core.aclose()


# -- malformed bodies: one battery for both body-taking routes of the lane ----------------------

GOOD_SEND = j({"phone_number": MARK})
GOOD_VERIFY = j({"phone_number": TEST_MARK, "otp_code": TEST_CODE})


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def with_extra(good: bytes, raw_key: bytes, raw_value: bytes) -> bytes:
    """``good`` plus one unknown field written as raw JSON."""
    return good[:-1] + b", " + raw_key + b": " + raw_value + b"}"


# (id, send-otp body, verify-otp body, Litestar's status and error). The verify-otp bodies
# name a test number whose code was just sent, so a body taken for valid signs in.
BODIES: list[tuple[str, bytes, bytes, int, str]] = [
    ("empty", b"", b"", 400, "validation_error"),
    ("whitespace", b" \n", b" \n", 400, "invalid_request"),
    ("not-json", b"phone_number=" + MARK.encode(), b"phone_number=1&otp_code=2", 400, "invalid_request"),
    ("truncated", GOOD_SEND[:-3], GOOD_VERIFY[:-3], 400, "invalid_request"),
    ("trailing-comma", GOOD_SEND[:-1] + b",}", GOOD_VERIFY[:-1] + b",}", 400, "invalid_request"),
    ("single-quotes", GOOD_SEND.replace(b'"', b"'"), GOOD_VERIFY.replace(b'"', b"'"), 400, "invalid_request"),
    ("null", b"null", b"null", 400, "validation_error"),
    ("true", b"true", b"true", 400, "validation_error"),
    ("top-level-array", b"[" + GOOD_SEND + b"]", b"[" + GOOD_VERIFY + b"]", 400, "validation_error"),
    ("top-level-string", j(MARK), j(TEST_CODE), 400, "validation_error"),
    ("top-level-number", b"14155550123", b"123456", 400, "validation_error"),
    ("empty-object", b"{}", b"{}", 400, "validation_error"),
    ("bom", b"\xef\xbb\xbf" + GOOD_SEND, b"\xef\xbb\xbf" + GOOD_VERIFY, 400, "invalid_request"),
    ("nan", b'{"phone_number": NaN}', b'{"phone_number": "x", "otp_code": NaN}', 400, "invalid_request"),
    ("nul-bytes", b"\x00\x01\x02", b"\x00\x01\x02", 400, "invalid_request"),
    (
        "invalid-utf8-in-field",
        GOOD_SEND.replace(b"555", b"5\xff5"),
        GOOD_VERIFY.replace(b"123", b"1\xff3"),
        400,
        "invalid_request",
    ),
    (
        "lone-surrogate",
        b'{"phone_number": "\\ud800"}',
        b'{"phone_number": "' + TEST_MARK.encode() + b'", "otp_code": "\\ud800"}',
        400,
        "invalid_request",
    ),
    ("deep-8000", deep(8_000), deep(8_000), 400, "invalid_request"),
    ("deep-10000-over-16-KiB", deep(10_000), deep(10_000), 413, "payload_too_large"),
    (
        "deep-8000-in-extra-field",
        with_extra(GOOD_SEND, b'"x"', deep(8_000)),
        with_extra(GOOD_VERIFY, b'"x"', deep(8_000)),
        400,
        "invalid_request",
    ),
    (
        "over-16-KiB",
        with_extra(GOOD_SEND, b'"pad"', j("x" * LIMIT)),
        with_extra(GOOD_VERIFY, b'"pad"', j("x" * LIMIT)),
        413,
        "payload_too_large",
    ),
    # Unknown fields whose content Litestar's decoder refuses (it decodes the whole document to
    # Any first) but the fast lane's typed decoder skips without validating.
    (
        "invalid-utf8-in-extra-field",
        with_extra(GOOD_SEND, b'"x"', b'"\xff\xfe"'),
        with_extra(GOOD_VERIFY, b'"x"', b'"\xff\xfe"'),
        400,
        "invalid_request",
    ),
    (
        "invalid-utf8-in-extra-key",
        with_extra(GOOD_SEND, b'"\xff"', b"1"),
        with_extra(GOOD_VERIFY, b'"\xff"', b"1"),
        400,
        "invalid_request",
    ),
    (
        "float-out-of-range-in-extra-field",
        with_extra(GOOD_SEND, b'"x"', b"1e999"),
        with_extra(GOOD_VERIFY, b'"x"', b"1e999"),
        400,
        "invalid_request",
    ),
    (
        "int-out-of-range-in-extra-field",
        with_extra(GOOD_SEND, b'"x"', b"9" * 5000),
        with_extra(GOOD_VERIFY, b'"x"', b"9" * 5000),
        400,
        "invalid_request",
    ),
]


@pytest.mark.parametrize("path", [SEND, VERIFY], ids=["send", "verify"])
@pytest.mark.parametrize(
    ("send_body", "verify_body", "status", "error"), [pytest.param(*case[1:], id=case[0]) for case in BODIES]
)
async def test_malformed_bodies(pair, path, send_body, verify_body, status, error):
    number = fresh_test_number()
    expect(await pair.send(number), 200)
    body = swap(send_body if path == SEND else verify_body, new_phone(), number)
    reply = await pair.same("POST", path, body=body)
    expect(reply, status, error)


# -- how a good body arrives -------------------------------------------------------------------


def split(body: bytes) -> list[bytes]:
    """``body`` in four ASGI messages, one of them empty."""
    return [body[:5], body[5:9], b"", body[9:]]


def arrivals() -> list[Any]:
    """(call() keywords for a good body, whether it is taken, Litestar's error when not)."""
    ok = (True, None)
    return [
        pytest.param(lambda b: {"body": b}, *ok, id="one-message"),
        pytest.param(lambda b: {"chunks": split(b)}, *ok, id="chunked"),
        pytest.param(lambda b: {"chunks": [b[:5], b[5:], b""]}, *ok, id="chunked-empty-last"),
        pytest.param(
            lambda b: {"chunks": [*split(b), b""], "disconnect": True},
            False,
            "invalid_request",
            id="disconnect",
        ),
        pytest.param(
            lambda b: {"chunks": [b""], "disconnect": True}, False, "invalid_request", id="disconnect-at-once"
        ),
        pytest.param(
            lambda b: {"chunks": [b" " * 9000, b" " * 9000, b]},
            False,
            "payload_too_large",
            id="chunked-over-16-KiB",
        ),
        pytest.param(lambda b: {"body": b, "content_type": "text/plain"}, *ok, id="text-plain"),
        pytest.param(lambda b: {"body": b, "content_type": None}, *ok, id="no-content-type"),
        pytest.param(
            lambda b: {"body": b, "content_type": "application/x-www-form-urlencoded"},
            *ok,
            id="form-content-type",
        ),
        pytest.param(lambda b: {"body": b, "query": b"phone_number=%2B1&otp_code=1"}, *ok, id="query-string"),
        pytest.param(lambda b: {"body": b, "query": b"a=%ZZ&b=\xff%fe"}, *ok, id="query-string-bad-encoding"),
        pytest.param(lambda b: {"body": b, "headers": [("accept", "text/html")]}, *ok, id="accept-html"),
        pytest.param(lambda b: {"body": b, "headers": [("cookie", "=;;a")]}, *ok, id="junk-cookie"),
        pytest.param(
            lambda b: {"body": b, "headers": [("x-request-id", "abc-123")]}, *ok, id="request-id-in"
        ),
        pytest.param(lambda b: {"body": b" \n" + b + b"  \n"}, *ok, id="surrounding-whitespace"),
        pytest.param(
            lambda b: {"body": with_extra(b, b'"extra"', b'{"a": [1, 2.5, null, true, "\\u00e9"]}')},
            *ok,
            id="extra",
        ),
    ]


@pytest.mark.parametrize("path", [SEND, VERIFY], ids=["send", "verify"])
@pytest.mark.parametrize(("arrival", "counts", "error"), arrivals())
async def test_body_arrival(pair, path, arrival, counts, error):
    number = fresh_test_number()
    expect(await pair.send(number), 200)
    kw = arrival(swap(GOOD_SEND if path == SEND else GOOD_VERIFY, new_phone(), number))
    reply = await pair.same("POST", path, **kw)
    if counts:
        expect(reply, 200)
    else:
        expect(reply, 413 if error == "payload_too_large" else 400, error)
    if ("x-request-id", "abc-123") in kw.get("headers", []):
        assert ("x-request-id", "abc-123") in reply.headers  # echoed by both (compared above)


@pytest.mark.parametrize("path", [SEND, VERIFY], ids=["send", "verify"])
@pytest.mark.parametrize(
    ("announced", "status", "error"),
    [
        pytest.param("5", 200, None, id="smaller-than-body"),
        pytest.param("-1", 200, None, id="negative"),
        # Litestar refuses these from the header alone, before reading the body. A conforming
        # HTTP/1.1 server (uvicorn's h11) never hands an app such a header with a body of
        # another length, but the ASGI app itself answers differently.
        pytest.param(str(LIMIT + 1), 413, "payload_too_large", id="over-16-KiB"),
        pytest.param("abc", 400, "invalid_request", id="not-a-number"),
    ],
)
async def test_announced_content_length(pair, path, announced, status, error):
    number = fresh_test_number()
    expect(await pair.send(number), 200)
    body = swap(GOOD_SEND if path == SEND else GOOD_VERIFY, new_phone(), number)
    reply = await pair.same("POST", path, body=body, headers=[("content-length", announced)])
    expect(reply, status, error)


# -- send-otp ------------------------------------------------------------------------------------


def spaced(phone: str) -> str:
    return f"+1 ({phone[2:5]}) {phone[5:8]}-{phone[8:]}"


def dashed(phone: str) -> str:
    return f"+1 {phone[2:5]}-{phone[5:8]}-{phone[8:]}"


# (payload from a fresh real number, Litestar's status and error)
SEND_CASES: list[Any] = [
    pytest.param(lambda p: {"phone_number": p}, 200, None, id="e164"),
    pytest.param(lambda p: {"phone_number": spaced(p)}, 200, None, id="parentheses"),
    pytest.param(lambda p: {"phone_number": dashed(p)}, 200, None, id="dashes"),
    pytest.param(lambda p: {"phone_number": f"  {p}\t"}, 200, None, id="padded"),
    pytest.param(lambda p: {"phone_number": "+44 20 7946 0958"}, 200, None, id="other-allowed-country"),
    pytest.param(
        lambda p: {"phone_number": "+33 6 12 34 56 78"}, 400, "invalid_phone_number", id="disallowed-country"
    ),
    pytest.param(lambda p: {"phone_number": p[2:]}, 400, "invalid_phone_number", id="no-country-code"),
    pytest.param(lambda p: {"phone_number": p[:6]}, 400, "invalid_phone_number", id="too-short"),
    pytest.param(lambda p: {"phone_number": p[:-1] + "x"}, 400, "invalid_phone_number", id="letter"),
    pytest.param(lambda p: {"phone_number": "+1555 555 0199"}, 400, "invalid_phone_number", id="fictitious"),
    pytest.param(lambda p: {"phone_number": ""}, 400, "invalid_phone_number", id="empty"),
    pytest.param(lambda p: {"phone_number": "9" * 64}, 400, "invalid_phone_number", id="64-chars"),
    pytest.param(lambda p: {"phone_number": "9" * 65}, 400, "validation_error", id="65-chars"),
    pytest.param(lambda p: {"phone_number": fresh_test_number()}, 200, None, id="test-number"),
    pytest.param(lambda p: {"phone_number": int(p[1:])}, 400, "validation_error", id="int"),
    pytest.param(lambda p: {"phone_number": None}, 400, "validation_error", id="null"),
    pytest.param(lambda p: {"phone_number": True}, 400, "validation_error", id="bool"),
    pytest.param(lambda p: {"phone_number": [p]}, 400, "validation_error", id="list"),
    pytest.param(lambda p: {"phone_number": {"e164": p}}, 400, "validation_error", id="object"),
    pytest.param(lambda p: {"phone": p}, 400, "validation_error", id="missing-field"),
    pytest.param(lambda p: {"phone_number": p, "otp_code": 1, "role": "admin"}, 200, None, id="extra-fields"),
]


@pytest.mark.parametrize(("payload", "status", "error"), SEND_CASES)
async def test_send_otp_payloads(pair, payload, status, error):
    reply = await pair.same("POST", SEND, body=j(payload(new_phone())))
    expect(reply, status, error)


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    [
        pytest.param(
            b'{"phone_number": "nonsense", "phone_number": "+14155550123"}', 200, None, id="last-wins"
        ),
        pytest.param(
            b'{"phone_number": "+14155550123", "phone_number": "nonsense"}',
            400,
            "invalid_phone_number",
            id="last-bad",
        ),
        pytest.param(
            b'{"phone_number": 5, "phone_number": "+14155550123"}', 200, None, id="first-wrong-type"
        ),
        pytest.param(
            b'{"phone_number": "+14155550123", "phone_number": 5}',
            400,
            "validation_error",
            id="last-wrong-type",
        ),
        pytest.param(
            b'{"phone_number": "' + b"9" * 65 + b'", "phone_number": "+14155550123"}',
            200,
            None,
            id="first-too-long",
        ),
    ],
)
async def test_send_otp_duplicate_keys(pair, raw, status, error):
    reply = await pair.same("POST", SEND, body=swap(raw, new_phone()))
    expect(reply, status, error)


async def test_send_otp_spellings_share_the_per_number_limit(pair):
    phone = new_phone()
    for spelling in (phone, spaced(phone), dashed(phone)):
        reply = await pair.send(spelling)
        expect(reply, 200)
        assert reply.json()["phone_number"] == phone
        pair.advance(10)
    reply = await pair.send(dashed(phone))
    expect(reply, 429, "rate_limit_exceeded")
    limit_headers = {"retry-after", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"}
    assert limit_headers | {"x-ratelimit-exceeded"} <= dict(reply.headers).keys()
    assert dict(reply.headers)["x-ratelimit-remaining"] == "0"


async def test_send_otp_test_number_is_not_limited(pair):
    number = fresh_test_number()
    for _ in range(5):
        expect(await pair.send(number), 200)


# -- verify-otp ----------------------------------------------------------------------------------

USER_FIELDS = {"id", "phone_number", "name", "role", "is_active", "created_at", "updated_at"}


async def test_verify_right_code_signs_in_on_both(pair):
    phone = new_phone()
    await pair.send(phone)
    codes = await pair.codes(phone)
    body = Sides.build(
        lambda side: j({"phone_number": dashed(phone), "otp_code": codes.of(side), "name": " Ada "})
    )
    replies = await pair.both("POST", VERIFY, body=body)
    fast, slow = replies["fast"].json(), replies["slow"].json()
    assert set(fast) == set(slow) == {"user", "token", "refresh_token", "token_type", "expires_in"}
    assert set(fast["user"]) == set(slow["user"]) == USER_FIELDS
    # Same clocks: the timestamps agree too (ids are masked, and checked within each app below).
    assert_same(replies["fast"], replies["slow"])
    assert fast["user"]["name"] == "Ada" and fast["user"]["phone_number"] == phone
    assert fast["token"] != slow["token"]
    # Each app's token is good on that app, and the profiles agree with the sign-in.
    profiles = await pair.both("GET", PROFILE, headers=Sides(bearer(fast["token"]), bearer(slow["token"])))
    assert_same(profiles["fast"], profiles["slow"])
    for side, signed_in in (("fast", fast), ("slow", slow)):
        expect(profiles[side], 200)
        assert profiles[side].json() == signed_in["user"], side  # ids included
    # A code is single use on both.
    expect(await pair.same("POST", VERIFY, body=body), 400, "otp_expired")


async def test_verify_returning_user(pair):
    number = fresh_test_number()
    first = await pair.login(number)
    second = await pair.login(number)
    assert first.fast["user"] == second.fast["user"] and first.slow["user"] == second.slow["user"]


async def test_verify_wrong_code_until_burned(pair):
    phone = new_phone()
    await pair.send(phone)
    codes = await pair.codes(phone)
    wrong = Sides.build(
        lambda side: j({"phone_number": phone, "otp_code": "0" * 5 + str(9 - int(codes.of(side)[-1]))})
    )
    for remaining in (4, 3, 2, 1):
        reply = await pair.same("POST", VERIFY, body=wrong)
        expect(reply, 400, "invalid_otp")
        assert reply.json()["attempts_remaining"] == remaining
    expect(await pair.same("POST", VERIFY, body=wrong), 429, "too_many_attempts")
    right = Sides.build(lambda side: j({"phone_number": phone, "otp_code": codes.of(side)}))
    expect(await pair.same("POST", VERIFY, body=right), 429, "too_many_attempts")


async def test_verify_per_number_failure_budget_carries_retry_after(pair):
    """Past OTP_MAX_FAILED_PER_PHONE failures across resends the number is locked: the error body
    carries retry_after and the response a Retry-After header (the lane's own error headers)."""
    number = fresh_test_number()
    wrong = j({"phone_number": number, "otp_code": "000000"})
    for _ in range(2):
        expect(await pair.send(number), 200)
        for _ in range(5):
            reply = await pair.same("POST", VERIFY, body=wrong)
    expect(reply, 429, "too_many_attempts")
    retry_after = reply.json()["retry_after"]
    assert isinstance(retry_after, int) and retry_after > 0, reply.body
    assert dict(reply.headers)["retry-after"] == str(retry_after), reply.headers
    expect(await pair.send(number), 200)
    expect(await pair.same("POST", VERIFY, body=j({"phone_number": number, "otp_code": TEST_CODE})), 429)


# (payload from a fresh test number whose code was just sent, Litestar's status and error)
VERIFY_CASES: list[Any] = [
    pytest.param(lambda n: {"phone_number": n, "otp_code": TEST_CODE}, 200, None, id="right"),
    pytest.param(lambda n: {"phone_number": n, "otp_code": f" {TEST_CODE} "}, 200, None, id="right-padded"),
    pytest.param(
        lambda n: {"phone_number": new_phone(), "otp_code": TEST_CODE}, 400, "otp_expired", id="no-code-sent"
    ),
    pytest.param(lambda n: {"phone_number": n, "otp_code": "654321"}, 400, "invalid_otp", id="wrong"),
    pytest.param(
        lambda n: {"phone_number": "nonsense", "otp_code": TEST_CODE},
        400,
        "invalid_phone_number",
        id="bad-phone",
    ),
    pytest.param(
        lambda n: {"phone_number": "+33612345678", "otp_code": TEST_CODE},
        400,
        "invalid_phone_number",
        id="disallowed-country",
    ),
    pytest.param(lambda n: {"phone_number": n, "otp_code": ""}, 400, "validation_error", id="code-empty"),
    pytest.param(lambda n: {"phone_number": n, "otp_code": "   "}, 400, "validation_error", id="code-blank"),
    pytest.param(lambda n: {"phone_number": n, "otp_code": "1" * 64}, 400, "invalid_otp", id="code-64"),
    pytest.param(lambda n: {"phone_number": n, "otp_code": "1" * 65}, 400, "validation_error", id="code-65"),
    pytest.param(
        lambda n: {"phone_number": n, "otp_code": int(TEST_CODE)}, 400, "validation_error", id="code-int"
    ),
    pytest.param(lambda n: {"phone_number": n, "otp_code": None}, 400, "validation_error", id="code-null"),
    pytest.param(
        lambda n: {"phone_number": n, "otp_code": [TEST_CODE]}, 400, "validation_error", id="code-list"
    ),
    pytest.param(
        lambda n: {"phone_number": n, "otp_code": {"c": 1}}, 400, "validation_error", id="code-object"
    ),
    pytest.param(lambda n: {"phone_number": n}, 400, "validation_error", id="code-missing"),
    pytest.param(lambda n: {"otp_code": TEST_CODE}, 400, "validation_error", id="phone-missing"),
    pytest.param(
        lambda n: {"phone_number": int(n[1:]), "otp_code": TEST_CODE}, 400, "validation_error", id="phone-int"
    ),
    pytest.param(lambda n: {"name": "Ada"}, 400, "validation_error", id="both-missing"),
    pytest.param(lambda n: {"phone_number": n, "otp_code": TEST_CODE, "name": "Ada"}, 200, None, id="name"),
    pytest.param(
        lambda n: {"phone_number": n, "otp_code": TEST_CODE, "name": "x" * 100}, 200, None, id="name-100"
    ),
    pytest.param(
        lambda n: {"phone_number": n, "otp_code": TEST_CODE, "name": "x" * 101},
        400,
        "validation_error",
        id="name-101",
    ),
    pytest.param(
        lambda n: {"phone_number": n, "otp_code": TEST_CODE, "name": "x" * 1001},
        400,
        "validation_error",
        id="name-1001",
    ),
    pytest.param(
        lambda n: {"phone_number": n, "otp_code": TEST_CODE, "name": "a\x07b"},
        400,
        "validation_error",
        id="name-bell",
    ),
    pytest.param(
        lambda n: {"phone_number": n, "otp_code": TEST_CODE, "name": "a\nb"},
        400,
        "validation_error",
        id="name-newline",
    ),
    pytest.param(
        lambda n: {"phone_number": n, "otp_code": TEST_CODE, "name": 5},
        400,
        "validation_error",
        id="name-int",
    ),
    pytest.param(
        lambda n: {"phone_number": n, "otp_code": TEST_CODE, "name": None}, 200, None, id="name-null"
    ),
    pytest.param(
        lambda n: {"phone_number": n, "otp_code": TEST_CODE, "name": "   "}, 200, None, id="name-blank"
    ),
    pytest.param(
        lambda n: {"phone_number": n, "otp_code": TEST_CODE, "role": "admin"}, 200, None, id="extra-fields"
    ),
]


@pytest.mark.parametrize(("payload", "status", "error"), VERIFY_CASES)
async def test_verify_otp_payloads(pair, payload, status, error):
    number = fresh_test_number()
    expect(await pair.send(number), 200)
    reply = await pair.same("POST", VERIFY, body=j(payload(number)))
    expect(reply, status, error)
    if status == 200:
        assert reply.json()["user"]["role"] == "user"


# -- GET profile ---------------------------------------------------------------------------------


def alg_none(token: str) -> str:
    header = base64.urlsafe_b64encode(j({"alg": "none", "typ": "at+jwt"})).rstrip(b"=").decode()
    return f"{header}.{token.split('.')[1]}."


# (Authorization headers from the app's own token, Litestar's status and error)
PROFILE_CASES: list[Any] = [
    pytest.param(lambda t: bearer(t), 200, None, id="valid"),
    pytest.param(lambda t: [], 401, "authorization_required", id="no-header"),
    pytest.param(lambda t: [("authorization", "")], 401, "authorization_required", id="empty"),
    pytest.param(lambda t: [("authorization", "Bearer")], 401, "authorization_required", id="bearer-alone"),
    pytest.param(lambda t: [("authorization", "Bearer ")], 401, "authorization_required", id="bearer-space"),
    pytest.param(lambda t: [("authorization", "Basic xyz")], 401, "authorization_required", id="basic"),
    pytest.param(lambda t: [("authorization", t)], 401, "authorization_required", id="no-scheme"),
    pytest.param(
        lambda t: [("authorization", f"Token {t}")], 401, "authorization_required", id="other-scheme"
    ),
    pytest.param(lambda t: [("authorization", f"bearer {t}")], 200, None, id="lowercase-scheme"),
    pytest.param(lambda t: [("authorization", f"BEARER {t}")], 200, None, id="uppercase-scheme"),
    pytest.param(lambda t: [("authorization", f"Bearer  {t}")], 200, None, id="two-spaces"),
    pytest.param(lambda t: [("authorization", f"Bearer {t}  ")], 200, None, id="trailing-spaces"),
    pytest.param(lambda t: [("authorization", f"Bearer\t{t}")], 401, "authorization_required", id="tab"),
    pytest.param(
        lambda t: [("authorization", f"Bearer {t[:20]} {t[20:]}")],
        401,
        "authorization_required",
        id="space-in-token",
    ),
    pytest.param(lambda t: bearer("garbage"), 401, "invalid_token", id="garbage"),
    pytest.param(lambda t: bearer(t[:-2]), 401, "invalid_token", id="truncated"),
    pytest.param(lambda t: bearer(t + "x"), 401, "invalid_token", id="appended"),
    pytest.param(lambda t: bearer("é" * 10), 401, "invalid_token", id="latin-1"),
    pytest.param(lambda t: bearer(alg_none(t)), 401, "invalid_token", id="alg-none"),
    pytest.param(lambda t: [*bearer(t), *bearer("garbage")], 200, None, id="two-headers-good-first"),
    pytest.param(
        lambda t: [*bearer("garbage"), *bearer(t)], 401, "invalid_token", id="two-headers-good-last"
    ),
    pytest.param(lambda t: [*bearer(t), ("cookie", "token=x")], 200, None, id="with-cookie"),
]


@pytest.mark.parametrize(("headers", "status", "error"), PROFILE_CASES)
async def test_profile_authorization(pair, headers, status, error):
    own = await pair.tokens()
    reply = await pair.same("GET", PROFILE, headers=Sides.build(lambda side: headers(own.of(side))))
    expect(reply, status, error)


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        pytest.param("GET", PROFILE + "/", 200, None, id="trailing-slash"),
        pytest.param("GET", PROFILE + "s", 404, "not_found", id="other-path"),
        pytest.param("GET", PROFILE.upper(), 404, "not_found", id="upper-case-path"),
        pytest.param("HEAD", PROFILE, 405, "method_not_allowed", id="head"),
        pytest.param("POST", PROFILE, 405, "method_not_allowed", id="post"),
        pytest.param("DELETE", PROFILE, 405, "method_not_allowed", id="delete"),
        pytest.param("GET", SEND, 405, "method_not_allowed", id="get-send-otp"),
        pytest.param("PUT", VERIFY, 405, "method_not_allowed", id="put-verify-otp"),
        pytest.param("POST", SEND + "/", 200, None, id="send-otp-trailing-slash"),
    ],
)
async def test_other_methods_and_paths(pair, method, path, status, error):
    own = await pair.tokens()
    body = j({"phone_number": new_phone()}) if method == "POST" else None
    reply = await pair.same(method, path, headers=Sides(bearer(own.fast), bearer(own.slow)), body=body)
    expect(reply, status, error)


async def test_profile_ignores_query_string_and_body(pair):
    own = await pair.tokens()
    headers = Sides(bearer(own.fast), bearer(own.slow))
    expect(await pair.same("GET", PROFILE, headers=headers, query=b"id=1", body=b"not json"), 200)


async def test_profile_expired_token(pair):
    signed_in = await pair.login()

    async def expired(side: Side) -> str:
        core = pair.cores[side]
        claims = core.tokens.decode_access(signed_in.of(side)["token"])
        user = await core.users.get(claims.user_id)
        return core.tokens.issue_access(user, claims.sid, now=int(core.tokens.clock()) - 10_000)

    tokens = Sides(await expired("fast"), await expired("slow"))
    reply = await pair.same("GET", PROFILE, headers=Sides(bearer(tokens.fast), bearer(tokens.slow)))
    expect(reply, 401, "invalid_token")


async def test_profile_token_expired_by_the_clock(pair):
    own = await pair.tokens()
    headers = Sides(bearer(own.fast), bearer(own.slow))
    expect(await pair.same("GET", PROFILE, headers=headers), 200)  # now verified and cached
    pair.advance(16 * 60)
    expect(await pair.same("GET", PROFILE, headers=headers), 401, "invalid_token")


async def test_profile_token_of_a_logged_out_session(pair):
    own = await pair.tokens()
    headers = Sides(bearer(own.fast), bearer(own.slow))
    expect(await pair.same("GET", PROFILE, headers=headers), 200)
    expect(await pair.same("POST", LOGOUT, headers=headers, body=b""), 204)  # not in the lane
    expect(await pair.same("GET", PROFILE, headers=headers), 401, "invalid_token")


async def test_profile_of_a_deactivated_user(pair):
    number = fresh_test_number()
    signed_in = await pair.login(number)
    own = Sides(signed_in.fast["token"], signed_in.slow["token"])
    headers = Sides(bearer(own.fast), bearer(own.slow))
    expect(await pair.same("GET", PROFILE, headers=headers), 200)
    for side in SIDES:
        core = pair.cores[side]
        admin = await core.users.set_role(ADMIN_PHONE, Role.ADMIN)
        await core.users.administer(admin, signed_in.of(side)["user"]["id"], is_active=False)
    expect(await pair.same("GET", PROFILE, headers=headers), 403, "user_inactive")
    expect(await pair.send(number), 200)
    reply = await pair.same("POST", VERIFY, body=j({"phone_number": number, "otp_code": TEST_CODE}))
    expect(reply, 403, "user_inactive")


# -- a failure inside the service ----------------------------------------------------------------


async def boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("secret internals")


@pytest.mark.parametrize(
    ("service", "method", "path"),
    [
        pytest.param("send_code", "POST", SEND, id="send-otp"),
        pytest.param("verify_code", "POST", VERIFY, id="verify-otp"),
        pytest.param("authenticate", "GET", PROFILE, id="profile"),
    ],
)
async def test_internal_error_is_the_same_logged_500(pair, monkeypatch, caplog, service, method, path):
    for core in pair.cores.values():
        monkeypatch.setattr(core.auth, service, boom)
    body = (
        swap(GOOD_VERIFY if path == VERIFY else GOOD_SEND, new_phone(), fresh_test_number())
        if method == "POST"
        else None
    )
    replies: dict[Side, Reply] = {}
    for side in SIDES:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            replies[side] = await call(pair.apps[side], method, path, body=body, headers=bearer("a.b.c"))
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [(r.name, r.levelname, r.getMessage()) for r in errors] == [
            ("otp_http.errors", "ERROR", f"unhandled error on {method} {path}")
        ], side
        assert errors[0].exc_info is not None and errors[0].exc_info[0] is RuntimeError, side
    assert_same(replies["fast"], replies["slow"])
    expect(replies["slow"], 500, "internal_error")
    assert replies["slow"].json() == {"error": "internal_error", "message": "internal server error"}


# -- metrics and CORS ----------------------------------------------------------------------------

_SAMPLE = re.compile(r"^((?:http_requests|otp_operations|rate_limit_exceeded)_total)\{([^}]*)\} (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')
Sample = tuple[str, tuple[tuple[str, str], ...]]


async def counters(pair: Pair, side: Side) -> Counter[Sample]:
    """The request, operation and rate-limit counters of one app: (name, labels) -> value."""
    reply = await call(pair.apps[side], "GET", "/metrics")
    expect(reply, 200)
    found: Counter[Sample] = Counter()
    for name, labels, value in _SAMPLE.findall(reply.body.decode()):
        pairs = tuple(sorted((k, v) for k, v in _LABEL.findall(labels) if not k.startswith("otel_")))
        found[(name, pairs)] = int(float(value))
    return found


async def test_metrics_label_lane_requests_by_route_template(pair):
    before = {side: await counters(pair, side) for side in SIDES}
    own = await pair.tokens()
    headers = Sides(bearer(own.fast), bearer(own.slow))
    phone = new_phone()
    for _ in range(4):  # the 4th is refused by the per-number limit
        await pair.send(phone)
    await pair.same("POST", SEND, body=b"not json")
    await pair.same("POST", VERIFY, body=j({"phone_number": phone, "otp_code": "x"}))
    await pair.same("GET", PROFILE, headers=headers)
    await pair.same("GET", PROFILE)
    await pair.same("GET", PROFILE + "/", headers=headers)
    after = {side: await counters(pair, side) for side in SIDES}
    fast, slow = (after[side] - before[side] for side in SIDES)
    assert fast == slow
    expected = [
        (VERIFY, "200"),
        (SEND, "200"),
        (SEND, "429"),
        (SEND, "400"),
        (VERIFY, "400"),
        (PROFILE, "200"),
        (PROFILE, "401"),
    ]
    for path, status in expected:
        labels = (("method", "GET" if path == PROFILE else "POST"), ("path", path), ("status_code", status))
        assert fast[("http_requests_total", labels)] >= 1, (path, status, fast)
    assert fast[("rate_limit_exceeded_total", (("endpoint_type", "otp"),))] == 1, fast
    assert not any(("path", "unmatched") in labels for _, labels in fast), fast


# (method, path, body: "good" | "bad" | None, extra headers)
CORS_CASES: list[Any] = [
    pytest.param("POST", SEND, "good", [], id="send-otp"),
    pytest.param("POST", SEND, "bad", [], id="send-otp-bad-json"),
    pytest.param("POST", VERIFY, "good", [], id="verify-otp"),
    pytest.param("GET", PROFILE, None, [], id="profile"),
    pytest.param("GET", PROFILE, None, [("authorization", "Basic x")], id="profile-no-token"),
    pytest.param("OPTIONS", SEND, None, [("access-control-request-method", "POST")], id="preflight"),
]


@pytest.mark.parametrize(("method", "path", "body", "extra"), CORS_CASES)
@pytest.mark.parametrize("origin", [ORIGIN, "https://evil.example"], ids=["allowed-origin", "other-origin"])
async def test_requests_with_an_origin_go_through_cors_on_both(pair, method, path, body, extra, origin):
    """With an Origin header the lane's routes go through CORS and Litestar on both apps."""
    number = fresh_test_number()
    expect(await pair.send(number), 200)
    own = await pair.tokens()
    if body is not None:
        body = (
            swap(GOOD_VERIFY if path == VERIFY else GOOD_SEND, new_phone(), number)
            if body == "good"
            else b"{"
        )
    if path == PROFILE and not extra:
        extra = Sides(bearer(own.fast), bearer(own.slow))
    headers = Sides.build(
        lambda side: [("origin", origin), *(extra.of(side) if isinstance(extra, Sides) else extra)]
    )
    reply = await pair.same(method, path, body=body, headers=headers)
    if method == "POST":
        expect(reply, 200 if body != b"{" else 400)
    found = dict(reply.headers)
    if origin == ORIGIN:
        assert found.get("access-control-allow-origin") == ORIGIN, reply.headers
        if method != "OPTIONS":
            assert "x-request-id" in found.get("access-control-expose-headers", "").lower(), reply.headers
    else:
        assert "access-control-allow-origin" not in found, reply.headers


async def test_the_lane_leaves_no_reference_cycles(pair):
    """A sign-in and a profile read on the lane are freed by reference counting. One cycle per
    request (as the per-IP admission once made) costs a pass of the cycle collector every few
    dozen requests under load."""
    fast = pair.apps["fast"]

    async def sign_in_and_read_profile() -> None:
        number = fresh_test_number()
        expect(await call(fast, "POST", SEND, body=j({"phone_number": number})), 200)
        signed_in = await call(fast, "POST", VERIFY, body=j({"phone_number": number, "otp_code": TEST_CODE}))
        expect(signed_in, 200)
        expect(await call(fast, "GET", PROFILE, headers=bearer(signed_in.json()["token"])), 200)

    await sign_in_and_read_profile()  # what is built once, on first use
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # whatever a collection finds unreachable stays in gc.garbage
    try:
        await sign_in_and_read_profile()
        gc.collect()
        cyclic = sorted(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert cyclic == []
