"""Property-based fuzzing of a real server from its own OpenAPI document (schemathesis), in both
deployments: no 500, every response as documented, every error in the error body."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi import checks as openapi_checks

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

# A schema-valid body may still break a domain rule (an invalid phone number, a wrong code, a
# name of blanks): those 400s are correct, so "positive data accepted" does not apply here.
DOMAIN_RULES_BEYOND_SCHEMA = [openapi_checks.positive_data_acceptance]
FUZZ_ENV = {
    "RATE_LIMIT_GLOBAL_REQUESTS": "100000",
    "RATE_LIMIT_AUTH_REQUESTS": "100000",
    "RATE_LIMIT_USER_REQUESTS": "100000",
    "OTP_TEST_PHONE_NUMBERS": "+15555550100=123456",
    "OTP_ADMIN_PHONE_NUMBERS": "+15555550100",
}


@pytest.fixture
def fuzzed(workdir: Path, mode_env: dict[str, str]) -> Iterator[tuple[Server, str]]:
    server = Server(workdir, "fuzzed", {**mode_env, **FUZZ_ENV})
    try:
        phone = {"phone_number": "+15555550100"}
        assert httpx.post(f"{server.base}/api/v1/auth/send-otp", json=phone).status_code == 200
        login = httpx.post(f"{server.base}/api/v1/auth/verify-otp", json={**phone, "otp_code": "123456"})
        yield server, login.json()["token"]
    finally:
        server.stop()


def test_every_operation_answers_as_documented(fuzzed: tuple[Server, str]) -> None:
    server, token = fuzzed
    schema = schemathesis.openapi.from_url(f"{server.base}/schema/openapi.json")
    headers = {"Authorization": f"Bearer {token}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def answers_as_documented(case) -> None:
            response = case.call_and_validate(
                base_url=server.base, headers=headers, excluded_checks=DOMAIN_RULES_BEYOND_SCHEMA
            )
            assert response.status_code < 500 or response.status_code == 503
            if response.status_code >= 400:
                body = response.json()
                assert {"error", "message"} <= set(body)
                assert set(body) <= {"error", "message", "attempts_remaining", "retry_after", "checks"}

        answers_as_documented()
