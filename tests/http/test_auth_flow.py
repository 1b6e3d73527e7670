"""SPEC §3 auth endpoints and §4 phone numbers, codes, failure budget, test numbers, tokens."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from datetime import UTC, datetime

import pytest

from tests.http.conftest import (
    ADMIN_PHONE,
    TEST_CODE,
    TEST_PHONE,
    assert_error,
    auth,
    new_phone,
)

REFRESH = "/api/v1/auth/refresh"
LOGOUT = "/api/v1/auth/logout"
PROFILE = "/api/v1/users/profile"
USER_FIELDS = {"id", "phone_number", "name", "role", "is_active", "created_at", "updated_at"}
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")


def _b64(part: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def jwt_parts(token: str) -> tuple[dict, dict]:
    header, payload, _ = token.split(".")
    return _b64(header), _b64(payload)


def assert_user(user: dict, phone: str, *, name: str = "", role: str = "user") -> None:
    assert set(user) == USER_FIELDS
    assert isinstance(user["id"], int)
    assert user["phone_number"] == phone
    assert user["name"] == name
    assert user["role"] == role
    assert user["is_active"] is True
    for field in ("created_at", "updated_at"):
        assert RFC3339_UTC.match(user[field]), user[field]
        datetime.fromisoformat(user[field].replace("Z", "+00:00"))


def assert_token_response(body: dict, phone: str, **user) -> None:
    assert set(body) == {"user", "token", "refresh_token", "token_type", "expires_in"}
    assert_user(body["user"], phone, **user)
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900  # JWT_EXPIRY default 15m
    assert isinstance(body["refresh_token"], str) and len(body["refresh_token"]) >= 43
    assert body["refresh_token"] != body["token"]


# -- send-otp -------------------------------------------------------------------------------


async def test_send_otp_body(api):
    response = await api.send("+1 (415) 555-0123")
    assert response.status_code == 200
    assert response.json() == {
        "message": "OTP sent successfully",
        "phone_number": "+14155550123",
        "expires_in": 120,
    }
    code = await api.code("+14155550123")
    assert re.fullmatch(r"\d{6}", code)


@pytest.mark.parametrize("raw", ["+1 415 555 012", "hello", "", "   ", "+999123", "4155550123", "+"])
async def test_invalid_numbers_are_refused(mem_api, raw):
    response = await mem_api.send(raw)
    assert_error(response, 400, "invalid_phone_number")
    assert mem_api.sender.sent == []


async def test_invalid_number_on_verify(mem_api):
    assert_error(await mem_api.verify("hello", "123456"), 400, "invalid_phone_number")


async def test_allowed_countries_refuses_other_countries(make_api):
    api = await make_api(otp_allowed_countries="GB")
    assert_error(await api.send(new_phone()), 400, "invalid_phone_number")
    response = await api.send("+44 20 7946 0000")
    assert response.status_code == 200
    assert response.json()["phone_number"] == "+442079460000"


async def test_normalisation_shares_the_send_limit_and_the_user(api):
    formats = ["+1 (415) 555-0133", "+1 415-555-0133", "+14155550133"]
    for raw in formats:
        response = await api.send(raw)
        assert response.status_code == 200
        assert response.json()["phone_number"] == "+14155550133"
    for raw in formats:
        assert_error(await api.send(raw), 429, "rate_limit_exceeded")

    # One code for all three spellings; one user for all of them.
    code = await api.code("+14155550133")
    first = await api.verify("+1 (415) 555-0133", code)
    assert first.status_code == 200, first.text
    api.clock.advance(601)
    code = await api.send_and_code("+1 415-555-0133")
    second = await api.verify("+14155550133", code)
    assert second.status_code == 200
    assert first.json()["user"]["id"] == second.json()["user"]["id"]
    assert second.json()["user"]["phone_number"] == "+14155550133"


# -- verify-otp -----------------------------------------------------------------------------


async def test_verify_body_and_jwt_claims(api):
    phone = new_phone()
    code = await api.send_and_code(phone)
    response = await api.verify(phone, code, name="  Ada Lovelace ")
    assert response.status_code == 200, response.text
    body = response.json()
    assert_token_response(body, phone, name="Ada Lovelace")

    header, claims = jwt_parts(body["token"])
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "HS256"
    assert {"iss", "aud", "sub", "role", "sid", "iat", "exp", "jti"} <= set(claims)
    assert claims["iss"] == "otp-server" and claims["aud"] == "otp-server"
    assert claims["sub"] == str(body["user"]["id"])
    assert claims["role"] == "user"
    assert claims["exp"] - claims["iat"] == 900
    assert abs(claims["iat"] - time.time()) < 60

    # The token works.
    profile = await api.get(PROFILE, headers=auth(body["token"]))
    assert profile.status_code == 200
    assert profile.json() == body["user"]


async def test_wrong_code_is_invalid_otp_with_attempts_remaining(api):
    phone = new_phone()
    code = await api.send_and_code(phone)
    wrong = "000000" if code != "000000" else "111111"
    body = assert_error(await api.verify(phone, wrong), 400, "invalid_otp", "attempts_remaining")
    assert body["attempts_remaining"] == 4
    body = assert_error(await api.verify(phone, wrong), 400, "invalid_otp", "attempts_remaining")
    assert body["attempts_remaining"] == 3
    # Still usable with the right one.
    assert (await api.verify(phone, code)).status_code == 200


async def test_no_code_is_otp_expired(api):
    assert_error(await api.verify(new_phone(), "123456"), 400, "otp_expired")


async def test_expired_code_is_otp_expired(mem_api):
    phone = new_phone()
    code = await mem_api.send_and_code(phone)
    mem_api.clock.advance(121)
    assert_error(await mem_api.verify(phone, code), 400, "otp_expired")


async def test_code_is_burned_after_max_attempts(api):
    phone = new_phone()
    code = await api.send_and_code(phone)
    wrong = "000000" if code != "000000" else "111111"
    for remaining in (4, 3, 2, 1):
        body = assert_error(await api.verify(phone, wrong), 400, "invalid_otp", "attempts_remaining")
        assert body["attempts_remaining"] == remaining
    assert_error(await api.verify(phone, wrong), 429, "too_many_attempts")
    # Even the right code fails now.
    assert_error(await api.verify(phone, code), 429, "too_many_attempts")
    # A new code works again.
    code = await api.send_and_code(phone)
    assert (await api.verify(phone, code)).status_code == 200


async def test_per_number_failure_budget_across_resends(mem_api):
    api = mem_api
    phone = new_phone()
    failures = 0
    code = ""
    for _ in range(3):  # three sends (the per-number send limit) x up to four wrong guesses
        code = await api.send_and_code(phone)
        wrong = "000000" if code != "000000" else "111111"
        for _ in range(4):
            if failures == 9:
                break
            body = assert_error(await api.verify(phone, wrong), 400, "invalid_otp", "attempts_remaining")
            failures += 1
            # Never more than the number's budget allows (10 per hour).
            assert body["attempts_remaining"] <= 10 - failures
    assert body["attempts_remaining"] == 1
    # The tenth failure locks the number for the rest of the hour.
    wrong = "000000" if code != "000000" else "111111"
    response = await api.verify(phone, wrong)
    body = assert_error(response, 429, "too_many_attempts", "retry_after")
    assert 0 < body["retry_after"] <= 3600
    assert int(response.headers["Retry-After"]) == body["retry_after"]
    # The right code of the live code fails too ...
    assert_error(await api.verify(phone, code), 429, "too_many_attempts", "retry_after")
    # ... and a resend later in the window buys no more guesses.
    api.clock.advance(601)
    code = await api.send_and_code(phone)
    assert_error(await api.verify(phone, code), 429, "too_many_attempts", "retry_after")
    # After the window the number is free again.
    api.clock.advance(3600)
    code = await api.send_and_code(phone)
    assert (await api.verify(phone, code)).status_code == 200


async def test_code_is_single_use(api):
    phone = new_phone()
    code = await api.send_and_code(phone)
    assert (await api.verify(phone, code)).status_code == 200
    assert_error(await api.verify(phone, code), 400, "otp_expired")


async def test_new_send_replaces_previous_code(api):
    phone = new_phone()
    old = await api.send_and_code(phone)
    new = await api.send_and_code(phone)
    if old == new:  # one in a million: the check below would be meaningless
        pytest.skip("the two random codes collided")
    assert_error(await api.verify(phone, old), 400, "invalid_otp", "attempts_remaining")
    assert (await api.verify(phone, new)).status_code == 200


async def test_codes_are_bound_to_their_number(api):
    a, b = new_phone(), new_phone()
    code_a = await api.send_and_code(a)
    await api.send_and_code(b)
    response = await api.verify(b, code_a)
    # Unless the random codes collide, a's code is wrong for b.
    if response.status_code != 200:
        assert_error(response, 400, "invalid_otp", "attempts_remaining")


async def test_name_given_at_first_login_is_trimmed_and_kept(api):
    phone = new_phone()
    body = await api.login(phone, name="  Grace  ")
    assert body["user"]["name"] == "Grace"
    # A later login without a name keeps the user as it is.
    again = await api.login(phone)
    assert again["user"]["id"] == body["user"]["id"]
    assert again["user"]["name"] == "Grace"


async def test_name_over_100_chars_at_login_is_validation_error(api):
    phone = new_phone()
    code = await api.send_and_code(phone)
    body = assert_error(await api.verify(phone, code, name="x" * 101), 400, "validation_error")
    assert "name" in body["message"]


# -- test numbers and admins ----------------------------------------------------------------


async def test_test_phone_number_fixed_code_no_send_no_limit(make_api, storage):
    api = await make_api(storage, otp_test_phone_numbers=f"{TEST_PHONE}={TEST_CODE}")
    for _ in range(6):  # past the per-number limit of 3
        response = await api.send("+1 555-555-0100")
        assert response.status_code == 200, response.text
        assert response.json()["phone_number"] == TEST_PHONE
    response = await api.verify(TEST_PHONE, TEST_CODE)
    assert response.status_code == 200, response.text
    assert response.json()["user"]["phone_number"] == TEST_PHONE
    assert api.sender.sent == []
    # The fixed code is still single use per send.
    assert_error(await api.verify(TEST_PHONE, TEST_CODE), 400, "otp_expired")


async def test_fictitious_number_not_configured_is_invalid(mem_api):
    assert_error(await mem_api.send(TEST_PHONE), 400, "invalid_phone_number")


async def test_admin_numbers_get_role_admin(api):
    body = await api.login("+1 415 555 0100")
    assert body["user"]["role"] == "admin"
    assert body["user"]["phone_number"] == ADMIN_PHONE
    assert jwt_parts(body["token"])[1]["role"] == "admin"
    plain = await api.login()
    assert plain["user"]["role"] == "user"


# -- refresh and logout ---------------------------------------------------------------------


async def test_refresh_rotates(api):
    phone = new_phone()
    first = await api.login(phone)
    response = await api.post(REFRESH, {"refresh_token": first["refresh_token"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert_token_response(body, phone)
    assert body["refresh_token"] != first["refresh_token"]
    assert body["user"]["id"] == first["user"]["id"]
    assert jwt_parts(body["token"])[1]["sid"] == jwt_parts(first["token"])[1]["sid"]
    assert (await api.get(PROFILE, headers=auth(body["token"]))).status_code == 200
    # And the rotated one rotates again.
    again = await api.post(REFRESH, {"refresh_token": body["refresh_token"]})
    assert again.status_code == 200


async def test_reusing_a_rotated_refresh_token_revokes_the_session(api):
    first = await api.login()
    rotated = (await api.post(REFRESH, {"refresh_token": first["refresh_token"]})).json()
    reuse = await api.post(REFRESH, {"refresh_token": first["refresh_token"]})
    assert_error(reuse, 401, "invalid_token")
    # The whole family is gone: both access tokens and the newest refresh token.
    for token in (first["token"], rotated["token"]):
        assert_error(await api.get(PROFILE, headers=auth(token)), 401, "invalid_token")
    assert_error(await api.post(REFRESH, {"refresh_token": rotated["refresh_token"]}), 401, "invalid_token")


async def test_unknown_refresh_token_is_invalid_token(api):
    assert_error(await api.post(REFRESH, {"refresh_token": "nope"}), 401, "invalid_token")
    assert_error(await api.post(REFRESH, {"refresh_token": ""}), 401, "invalid_token")


async def test_logout_revokes_the_session(api):
    body = await api.login()
    response = await api.post(LOGOUT, headers=auth(body["token"]))
    assert response.status_code == 204
    assert response.content == b""
    assert_error(await api.get(PROFILE, headers=auth(body["token"])), 401, "invalid_token")
    assert_error(await api.post(REFRESH, {"refresh_token": body["refresh_token"]}), 401, "invalid_token")
    # Logging out again with the same token is refused too.
    assert_error(await api.post(LOGOUT, headers=auth(body["token"])), 401, "invalid_token")


async def test_logout_with_refresh_token_body(api):
    phone = new_phone()
    one = await api.login(phone)
    two = await api.login(phone)
    response = await api.post(LOGOUT, {"refresh_token": two["refresh_token"]}, headers=auth(one["token"]))
    assert response.status_code == 204
    for body in (one, two):
        assert_error(await api.get(PROFILE, headers=auth(body["token"])), 401, "invalid_token")


async def test_logout_leaves_other_sessions_alone(api):
    phone = new_phone()
    one = await api.login(phone)
    two = await api.login(phone)
    assert (await api.post(LOGOUT, headers=auth(one["token"]))).status_code == 204
    assert (await api.get(PROFILE, headers=auth(two["token"]))).status_code == 200


async def test_logout_cannot_revoke_another_users_session(api):
    mine, theirs = await api.login(), await api.login()
    response = await api.post(LOGOUT, {"refresh_token": theirs["refresh_token"]}, headers=auth(mine["token"]))
    assert response.status_code == 204
    assert (await api.get(PROFILE, headers=auth(theirs["token"]))).status_code == 200


async def test_logout_without_header_is_authorization_required(api):
    assert_error(await api.post(LOGOUT), 401, "authorization_required")
    assert_error(await api.post(LOGOUT, {}), 401, "authorization_required")


async def test_token_from_a_peer_with_a_slightly_fast_clock_is_accepted(api):
    body = await api.login()
    claims = jwt_parts(body["token"])[1]
    user = await api.core.users.get(body["user"]["id"])
    skewed = api.core.tokens.issue_access(user, claims["sid"], int(time.time()) + 2)
    assert (await api.get(PROFILE, headers=auth(skewed))).status_code == 200


async def test_events_never_hold_codes_or_tokens(api):
    phone = new_phone()
    code = await api.send_and_code(phone)
    await api.verify(phone, "000000" if code != "000000" else "111111")
    body = (await api.verify(phone, code, name="Ada")).json()
    refreshed = (await api.post(REFRESH, {"refresh_token": body["refresh_token"]})).json()
    events = list(api.core.events.events)
    kinds = {e.event_type for e in events}
    assert {"otp:generated", "otp:verified", "auth:failed", "user:created"} <= kinds, kinds
    dumped = json.dumps([e.data for e in events], default=str)
    for secret in (code, body["token"], body["refresh_token"], refreshed["refresh_token"]):
        assert secret not in dumped


async def test_refresh_token_expires_after_its_lifetime(make_api):
    api = await make_api(jwt_refresh_expiry=3600)
    body = await api.login()
    api.clock.advance(3601)
    assert_error(await api.post(REFRESH, {"refresh_token": body["refresh_token"]}), 401, "invalid_token")


async def test_otp_length_setting(make_api):
    api = await make_api(otp_length=8)
    phone = new_phone()
    code = await api.send_and_code(phone)
    assert re.fullmatch(r"\d{8}", code)
    assert (await api.verify(phone, code)).status_code == 200


async def test_test_numbers_stop_working_after_their_date_in_a_running_process(make_api):
    today = datetime.now(UTC).date().isoformat()
    api = await make_api(
        otp_test_phone_numbers=f"{TEST_PHONE}={TEST_CODE}",
        otp_test_phone_numbers_valid_until=today,
    )
    assert (await api.send(TEST_PHONE)).status_code == 200
    assert (await api.verify(TEST_PHONE, TEST_CODE)).status_code == 200
    api.clock.advance(2 * 86400)
    await api.send(TEST_PHONE)
    response = await api.verify(TEST_PHONE, TEST_CODE)
    assert response.status_code in (400, 429), response.text
    assert response.json()["error"] in {"invalid_otp", "otp_expired", "invalid_phone_number"}


async def test_fixed_code_of_an_expired_test_number_does_not_sign_in(make_api):
    api = await make_api(
        otp_test_phone_numbers=f"{TEST_PHONE}={TEST_CODE}",
        otp_test_phone_numbers_valid_until="2020-01-01",
    )
    await api.send(TEST_PHONE)
    response = await api.verify(TEST_PHONE, TEST_CODE)
    assert response.status_code in (400, 429), response.text


async def test_expired_test_number_is_an_ordinary_invalid_number(make_api):
    api = await make_api(
        otp_test_phone_numbers=f"{TEST_PHONE}={TEST_CODE}",
        otp_test_phone_numbers_valid_until="2020-01-01",
    )
    assert_error(await api.send(TEST_PHONE), 400, "invalid_phone_number")
    await asyncio.sleep(0.01)
    assert api.sender.sent == []
