"""Events and metrics an operator relies on, after real traffic through the HTTP layer."""

from __future__ import annotations

import re

import msgspec

from tests.http.conftest import PEER, Api, auth, new_phone


def events_of(api: Api, event_type: str) -> list[dict]:
    return [msgspec.to_builtins(e) for e in api.core.events.events if e.event_type == event_type]


async def test_a_per_ip_auth_limit_emits_auth_rate_limited(make_api) -> None:
    api: Api = await make_api(rate_limit_auth_requests=2)
    for _ in range(2):
        assert (await api.send(new_phone())).status_code == 200
    refused = await api.send(new_phone())
    assert refused.status_code == 429
    [event] = events_of(api, "auth:rate_limited")
    assert event["data"] == {"client_ip": PEER, "limit": "auth"}
    assert set(event) == {"event_id", "event_type", "timestamp", "data"}


async def test_metrics_name_every_spec_series_after_traffic(mem_api: Api) -> None:
    user = await mem_api.login(name="Ada")
    await mem_api.get("/api/v1/users/profile", headers=auth(user["token"]))
    phone = new_phone()
    for _ in range(4):
        await mem_api.send(phone)
    text = (await mem_api.get("/metrics")).text

    def series(name: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith(name + "{")]

    requests = series("http_requests_total")
    assert any(
        'method="GET"' in s and 'path="/api/v1/users/profile"' in s and 'status_code="200"' in s
        for s in requests
    )
    assert series("http_request_duration_seconds_bucket")
    assert any('operation="generate"' in s and 'success="true"' in s for s in series("otp_operations_total"))
    assert any('operation="verify"' in s for s in series("otp_operations_total"))
    assert any('endpoint_type="otp"' in s for s in series("rate_limit_exceeded_total"))
    sent = series("otp_sent_total")
    assert any('country="US"' in s and 'test_number="false"' in s for s in sent)
    assert any('country="US"' in s for s in series("otp_verified_total"))
    assert any('result="delivered"' in s for s in series("otp_deliveries_total"))
    # Route templates only: no raw ids or phone numbers become label values.
    assert not re.search(r'path="[^"]*\+\d', text)
