"""SPEC §3 system endpoints: health, readiness, metrics, JWKS, OpenAPI, CORS."""

from __future__ import annotations

import re

import pytest

from otpcore.domain.errors import ServiceUnavailable
from tests.http.conftest import assert_error, auth, new_phone


async def test_health(api):
    response = await api.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"status", "service", "version"}
    assert body["status"] == "ok" and body["service"] == "otp-server"
    assert isinstance(body["version"], str) and body["version"]


async def test_ready_when_every_store_answers(api):
    response = await api.get("/health/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert isinstance(body["checks"], dict) and body["checks"]
    assert all(value == "ok" for value in body["checks"].values()), body


class BrokenCodeStore:
    """A code store whose backend is down: every call raises ServiceUnavailable."""

    async def issue(self, *a, **k):
        raise ServiceUnavailable()

    async def check(self, *a, **k):
        raise ServiceUnavailable()

    async def ping(self):
        raise ServiceUnavailable()


class BrokenLimiter:
    async def hit(self, *a, **k):
        raise ServiceUnavailable()

    async def ping(self):
        raise ServiceUnavailable()


async def test_ready_503_names_the_failed_store(make_api, storage):
    api = await make_api(storage, overrides={"code_store": BrokenCodeStore()})
    response = await api.get("/health/ready")
    body = assert_error(response, 503, "service_unavailable", "checks")
    failed = [name for name, status in body["checks"].items() if status != "ok"]
    assert len(failed) == 1, body
    assert failed[0] in body["message"]
    if storage == "sqlite":  # the healthy database is reported as such
        assert body["checks"].get("sqlite") == "ok", body


async def test_backing_store_down_is_503_not_500(make_api):
    api = await make_api(overrides={"code_store": BrokenCodeStore()})
    assert_error(await api.send(new_phone()), 503, "service_unavailable")
    assert_error(await api.verify(new_phone(), "123456"), 503, "service_unavailable")
    assert api.sender.sent == []


async def test_rate_limiter_down_fails_closed(make_api):
    api = await make_api(overrides={"rate_limiter": BrokenLimiter()})
    assert_error(await api.send(new_phone()), 503, "service_unavailable")
    assert api.sender.sent == []
    assert (await api.get("/health")).status_code == 200


class FaultyLimiter:
    async def hit(self, *a, **k):
        raise RuntimeError("an error reply no one foresaw")

    async def ping(self):
        return None


async def test_an_unforeseen_limiter_failure_is_the_json_500(make_api, caplog):
    api = await make_api(overrides={"rate_limiter": FaultyLimiter()})
    response = await api.send(new_phone())
    assert_error(response, 500, "internal_error")
    assert "no one foresaw" not in response.text
    assert response.headers.get("x-request-id")
    assert api.sender.sent == []
    assert any(record.levelname == "ERROR" for record in caplog.records)


async def test_database_closed_is_503(make_api):
    api = await make_api("sqlite")
    body = await api.login()
    await api.core.container.sqlite().close()
    assert_error(await api.get("/api/v1/users/profile", headers=auth(body["token"])), 503,
                 "service_unavailable")  # fmt: skip
    ready = await api.get("/health/ready")
    body = assert_error(ready, 503, "service_unavailable", "checks")
    assert [name for name, status in body["checks"].items() if status != "ok"] == ["sqlite"]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the one sample of ``name`` whose labels include ``labels``."""
    found = []
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if not match:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            found.append(float(match.group(2)))
    assert len(found) == 1, (name, labels, found)
    return found[0]


async def test_metrics_requests_by_route_template(api):
    admin = await api.admin()
    for user_id in (1, 2, 3):
        await api.get(f"/api/v1/users/{user_id}", headers=auth(admin["token"]))
    await api.get("/no/such/path/123")
    response = await api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "http_requests_total", method="GET", path="/api/v1/users/{user_id}",
                  status_code="200") == 1  # fmt: skip
    assert metric(text, "http_requests_total", method="GET", path="/api/v1/users/{user_id}",
                  status_code="404") == 2  # fmt: skip
    assert metric(text, "http_requests_total", method="POST", path="/api/v1/auth/verify-otp",
                  status_code="200") == 1  # fmt: skip
    # Concrete ids and unknown paths never become labels.
    assert "/api/v1/users/2" not in text
    assert "/no/such/path/123" not in text
    assert "http_request_duration_seconds" in text


async def test_metrics_otp_operations_and_rate_limits(make_api):
    api = await make_api(rate_limit_auth_requests=HIGH_AUTH)
    phone = new_phone()
    code = await api.send_and_code(phone)
    assert (await api.verify(phone, "000000" if code != "000000" else "111111")).status_code == 400
    assert (await api.verify(phone, code)).status_code == 200
    await api.send(phone)
    await api.send(phone)
    assert (await api.send(phone)).status_code == 429
    text = (await api.get("/metrics")).text
    assert metric(text, "otp_operations_total", operation="verify", success="true") == 1
    assert metric(text, "otp_operations_total", operation="verify", success="false") == 1
    assert metric(text, "otp_operations_total", operation="generate", success="true") == 3


async def test_metrics_count_the_per_number_send_limit(make_api):
    api = await make_api()
    phone = new_phone()
    for _ in range(3):
        await api.send(phone)
    assert (await api.send(phone)).status_code == 429
    text = (await api.get("/metrics")).text
    assert re.search(r'^rate_limit_exceeded_total\{[^}]*endpoint_type="[^"]+"', text, re.M), text


HIGH_AUTH = 1000


async def test_metrics_per_ip_rate_limit_by_endpoint_type(make_api):
    api = await make_api(rate_limit_auth_requests=1)
    await api.verify(new_phone(), "123456")
    assert (await api.verify(new_phone(), "123456")).status_code == 429
    text = (await api.get("/metrics")).text
    assert metric(text, "rate_limit_exceeded_total", endpoint_type="auth") == 1


async def test_metrics_can_be_disabled(make_api):
    api = await make_api(metrics_enabled=False)
    assert_error(await api.get("/metrics"), 404, "not_found")


async def test_jwks_empty_under_hs256(api):
    response = await api.get("/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.json() == {"keys": []}


SPEC_PATHS = {
    ("post", "/api/v1/auth/send-otp"),
    ("post", "/api/v1/auth/verify-otp"),
    ("post", "/api/v1/auth/refresh"),
    ("post", "/api/v1/auth/logout"),
    ("get", "/api/v1/users/search"),
    ("get", "/api/v1/users/profile"),
    ("put", "/api/v1/users/profile"),
    ("get", "/api/v1/users/{user_id}"),
    ("patch", "/api/v1/users/{user_id}"),
    ("get", "/health"),
    ("get", "/health/ready"),
    ("get", "/metrics"),
    ("get", "/.well-known/jwks.json"),
}


async def test_openapi_lists_every_spec_path(mem_api):
    response = await mem_api.get("/schema/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.1")
    listed = {(method, path) for path, ops in schema["paths"].items() for method in ops}
    missing = SPEC_PATHS - listed
    assert not missing, missing


async def test_openapi_documents_request_bodies(mem_api):
    schema = (await mem_api.get("/schema/openapi.json")).json()
    send = schema["paths"]["/api/v1/auth/send-otp"]["post"]
    assert "requestBody" in send
    search = schema["paths"]["/api/v1/users/search"]["get"]
    names = {p["name"] for p in search.get("parameters", [])}
    assert {"query", "offset", "limit", "after_id"} <= names


async def test_schema_root_answers(mem_api):
    response = await mem_api.get("/schema")
    assert response.status_code == 200


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://localhost:8080"])
async def test_cors_preflight_from_an_allowed_origin(mem_api, origin):
    response = await mem_api.client().options(
        "/api/v1/auth/send-otp",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Content-Type, Authorization",
        },
    )
    assert response.status_code in (200, 204), response.text
    assert response.headers["access-control-allow-origin"] == origin
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


async def test_cors_headers_on_a_simple_request(mem_api):
    response = await mem_api.get("/health", headers={"Origin": "http://localhost:3000"})
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    exposed = response.headers.get("access-control-expose-headers", "").lower()
    assert "x-request-id" in exposed and "x-ratelimit-remaining" in exposed


async def test_cors_other_origin_not_allowed(mem_api):
    response = await mem_api.client().options(
        "/api/v1/auth/send-otp",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert response.headers.get("access-control-allow-origin") != "https://evil.example"
    assert response.headers.get("access-control-allow-origin") != "*"


async def test_cors_preflight_of_a_method_not_allowed_is_refused(mem_api):
    response = await mem_api.client().options(
        "/api/v1/auth/send-otp",
        headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "CONNECT"},
    )
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    assert response.headers["x-request-id"]


async def test_cors_headers_on_router_errors_and_edge_headers_on_preflights(mem_api):
    origin = {"Origin": "http://localhost:3000"}
    missing = await mem_api.get("/no/such/path", headers=origin)
    assert missing.status_code == 404
    assert missing.headers["access-control-allow-origin"] == "http://localhost:3000"
    preflight = await mem_api.client().options(
        "/api/v1/auth/send-otp", headers={**origin, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 204
    assert preflight.headers["x-request-id"] and preflight.headers["x-ratelimit-limit"]


async def test_edge_refusals_of_cross_origin_requests_carry_cors_headers(make_api):
    # Without them a browser hides the 429 from the page, which sees a network error instead.
    api = await make_api(rate_limit_global_requests=1)
    origin = {"Origin": "http://localhost:3000"}
    assert (await api.get("/api/v1/users/profile", headers=origin)).status_code == 401
    refused = await api.post("/api/v1/auth/send-otp", {"phone_number": new_phone()}, headers=origin)
    assert_error(refused, 429, "rate_limit_exceeded")
    assert refused.headers["access-control-allow-origin"] == "http://localhost:3000"
    exposed = refused.headers["access-control-expose-headers"].lower()
    assert "retry-after" in exposed and "x-ratelimit-exceeded" in exposed
    assert refused.headers["x-ratelimit-exceeded"] == "true" and refused.headers["x-request-id"]
    assert api.sender.sent == []
    other = await api.get("/api/v1/users/profile", headers={"Origin": "https://evil.example"})
    assert_error(other, 429, "rate_limit_exceeded")
    assert "access-control-allow-origin" not in other.headers
    # A preflight past the limit is refused, not answered as allowed.
    preflight = await api.client().options(
        "/api/v1/auth/send-otp", headers={**origin, "Access-Control-Request-Method": "POST"}
    )
    assert_error(preflight, 429, "rate_limit_exceeded")
    assert "access-control-allow-origin" not in preflight.headers


FAILING_LIMITERS = [(BrokenLimiter, 503, "service_unavailable"), (FaultyLimiter, 500, "internal_error")]


@pytest.mark.parametrize(("limiter", "status", "code"), FAILING_LIMITERS)
async def test_a_failing_limiter_answers_cross_origin_requests_with_cors(make_api, limiter, status, code):
    api = await make_api(overrides={"rate_limiter": limiter()})
    body = {"phone_number": new_phone(), "otp_code": "1"}
    response = await api.post("/api/v1/auth/verify-otp", body, headers={"Origin": "http://localhost:8080"})
    assert_error(response, status, code)
    assert response.headers["access-control-allow-origin"] == "http://localhost:8080"


async def test_no_cors_headers_without_an_origin(mem_api):
    for response in (
        await mem_api.get("/health"),
        await mem_api.post("/api/v1/auth/send-otp", {"phone_number": new_phone()}),
        await mem_api.client().options("/api/v1/auth/send-otp"),
    ):
        assert not [name for name in response.headers if name.startswith("access-control-")], response.headers
    # Without an Origin, OPTIONS is the router's answer, not a CORS preflight.
    assert response.status_code == 204 and response.headers["allow"] == "OPTIONS, POST"


async def test_duration_histogram_has_sub_second_buckets(mem_api):
    await mem_api.get("/api/v1/users/profile")
    text = (await mem_api.get("/metrics")).text
    bounds = {
        float(b) for b in re.findall(r'^http_request_duration_seconds_bucket\{.*\ble="([0-9.]+)"', text, re.M)
    }
    assert bounds and min(b for b in bounds if b > 0) <= 0.1, sorted(bounds)
