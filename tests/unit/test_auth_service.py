"""AuthService with the in-memory adapters: SPEC §4 Codes, failure budget, rate limits, test
numbers, users, tokens, events and code delivery."""

from __future__ import annotations

import asyncio
import logging
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from otpcore import AuthResult, Role, SendResult
from otpcore.container import Core
from otpcore.domain import events as ev
from otpcore.domain.errors import (
    InvalidOtp,
    InvalidPhoneNumber,
    InvalidToken,
    OtpExpired,
    RateLimitExceeded,
    TooManyAttempts,
    UserInactive,
    ValidationError,
)
from otpcore.domain.events import Event
from tests.fakes import FakeClock
from tests.unit.conftest import (
    OTHER_PHONE,
    PHONE,
    TEST_CODE,
    TEST_PHONE,
    send_and_read,
    sender_of,
    settle,
)

# Letters that are not hex digits: a code can't turn up by chance in digests, floats or numbers.
LETTERS = "GHJKLMNPQRSTVWXYZ"

MakeCore = Callable[..., Core]


def types(core: Core) -> list[str]:
    return [e.event_type for e in core.events.events]


def wrong_code(right: str) -> str:
    return "000000" if right != "000000" else "111111"


# --- storage of codes: never in plain text --------------------------------------------------


async def test_send_code_stores_no_plain_code(make_core: MakeCore) -> None:
    core = make_core(otp_code_charset=LETTERS, otp_length=8)
    code = await send_and_read(core)
    assert len(code) == 8
    store = core.container.code_store()
    state = repr(vars(store)) + repr(vars(store.log))
    assert code not in state
    assert code.lower() not in state.lower()
    stored = store._codes[PHONE]
    assert stored.digest != code.encode()
    assert code.encode() not in stored.digest
    assert stored.digest == core.auth.policy.digest(PHONE, code)


async def test_events_never_hold_codes_or_tokens(make_core: MakeCore) -> None:
    core = make_core(otp_code_charset=LETTERS, otp_length=8)
    code = await send_and_read(core)
    await asyncio.sleep(0)
    with pytest.raises(InvalidOtp):
        await core.auth.verify_code(PHONE, "GGGGGGGG" if code != "GGGGGGGG" else "HHHHHHHH")
    result = await core.auth.verify_code(PHONE, code, name="Ada")
    refreshed = await core.auth.refresh(result.refresh_token)
    with pytest.raises(InvalidToken):
        await core.auth.refresh(result.refresh_token)  # reuse: session:revoked
    secrets_ = [
        code,
        result.access_token,
        result.refresh_token,
        refreshed.access_token,
        refreshed.refresh_token,
        *result.access_token.split("."),
        *refreshed.access_token.split("."),
    ]
    assert len(core.events.events) >= 6
    for event in core.events.events:
        blob = msgspec.json.encode(event).decode()
        for secret in secrets_:
            assert secret not in blob, (event.event_type, secret)


async def test_codes_are_not_logged(make_core: MakeCore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    core = make_core(otp_code_charset=LETTERS, otp_length=8)
    code = await send_and_read(core)
    result = await core.auth.verify_code(PHONE, code)
    for record in caplog.records:
        text = record.getMessage()
        assert code not in text
        assert result.refresh_token not in text
        assert result.access_token not in text


# --- happy path and events ------------------------------------------------------------------


async def test_send_code_result(core: Core) -> None:
    result = await core.auth.send_code("+1 (415) 555-0123")
    assert isinstance(result, SendResult)
    assert result.phone_number == PHONE
    assert result.expires_in == 120
    assert result.test_number is False
    assert result.decision is not None and result.decision.allowed
    await settle()
    phone, code, message = sender_of(core).sent[-1]
    assert phone == PHONE
    assert len(code) == 6 and code.isdigit()
    assert code in message


async def test_verify_happy_path(core: Core, clock: FakeClock) -> None:
    code = await send_and_read(core, "+1 415-555-0123")
    result = await core.auth.verify_code("+1 (415) 555-0123", code, name="Ada")
    assert isinstance(result, AuthResult)
    assert result.created is True
    assert result.user.phone_number == PHONE
    assert result.user.name == "Ada"
    assert result.user.role is Role.USER
    assert result.user.is_active is True
    assert result.token_type == "Bearer"
    assert result.expires_in == 15 * 60
    assert result.access_token and result.refresh_token
    claims = core.tokens.decode_access(result.access_token)
    assert claims.user_id == result.user.id
    assert claims.iat == int(clock())
    principal = await core.auth.authenticate(result.access_token)
    assert principal.user.id == result.user.id
    assert types(core) == [
        ev.OTP_GENERATED,
        ev.OTP_VERIFIED,
        ev.USER_CREATED,
        ev.USER_AUTHENTICATED,
    ]


async def test_event_shape(core: Core) -> None:
    code = await send_and_read(core)
    await core.auth.verify_code(PHONE, code)
    ids = set()
    for event in core.events.events:
        assert isinstance(event, Event)
        body = msgspec.to_builtins(event)
        assert set(body) == {"event_id", "event_type", "timestamp", "data"}
        assert isinstance(body["event_id"], str) and body["event_id"]
        assert isinstance(body["data"], dict)
        assert isinstance(event.timestamp, datetime)
        assert event.timestamp.utcoffset() == timedelta(0)
        # JSON-encodable as is, timestamps as RFC 3339.
        decoded = msgspec.json.decode(msgspec.json.encode(event))
        datetime.fromisoformat(decoded["timestamp"])
        ids.add(event.event_id)
    assert len(ids) == len(core.events.events)
    by_type = {e.event_type: e.data for e in core.events.events}
    assert by_type[ev.OTP_GENERATED]["phone_number"] == PHONE
    assert by_type[ev.OTP_GENERATED]["test_number"] is False
    assert by_type[ev.OTP_VERIFIED]["phone_number"] == PHONE
    assert by_type[ev.USER_CREATED]["role"] == "user"
    assert by_type[ev.USER_AUTHENTICATED]["user_id"] == by_type[ev.USER_CREATED]["user_id"]


async def test_second_login_same_user_no_user_created(core: Core) -> None:
    first = await core.auth.verify_code(PHONE, await send_and_read(core), name="Ada")
    core.events.events.clear()
    second = await core.auth.verify_code(PHONE, await send_and_read(core), name="Someone Else")
    assert second.created is False
    assert second.user.id == first.user.id
    assert second.user.name == "Ada"  # the name is taken at the first login only
    assert second.refresh_token != first.refresh_token
    assert core.tokens.decode_access(second.access_token).sid != (
        core.tokens.decode_access(first.access_token).sid
    )
    assert ev.USER_CREATED not in types(core)
    assert types(core) == [ev.OTP_GENERATED, ev.OTP_VERIFIED, ev.USER_AUTHENTICATED]


async def test_other_numbers_get_other_users(core: Core) -> None:
    a = await core.auth.verify_code(PHONE, await send_and_read(core, PHONE))
    b = await core.auth.verify_code(OTHER_PHONE, await send_and_read(core, OTHER_PHONE))
    assert a.user.id != b.user.id


async def test_code_of_one_number_does_not_work_for_another(core: Core) -> None:
    code = await send_and_read(core, PHONE)
    await core.auth.send_code(OTHER_PHONE)
    await settle()
    if sender_of(core).last_code(OTHER_PHONE) != code:
        with pytest.raises(InvalidOtp):
            await core.auth.verify_code(OTHER_PHONE, code)


async def test_invalid_phone_is_refused_before_anything(core: Core) -> None:
    with pytest.raises(InvalidPhoneNumber):
        await core.auth.send_code("4155550123")
    with pytest.raises(InvalidPhoneNumber):
        await core.auth.verify_code("not a phone", "123456")
    await settle()
    assert sender_of(core).sent == []
    assert list(core.events.events) == []


@pytest.mark.parametrize("code", ["", "   ", "1" * 65, None])
async def test_verify_refuses_empty_or_oversized_code(core: Core, code: str | None) -> None:
    await send_and_read(core)
    with pytest.raises(ValidationError, match="otp_code"):
        await core.auth.verify_code(PHONE, code)  # type: ignore[arg-type]


async def test_verify_without_a_send_is_otp_expired(core: Core) -> None:
    with pytest.raises(OtpExpired) as info:
        await core.auth.verify_code(PHONE, "123456")
    assert info.value.code == "otp_expired"
    assert ev.OTP_EXPIRED in types(core)


# --- wrong codes, attempts, burn -------------------------------------------------------------


async def test_wrong_code_counts_down_then_burns(core: Core) -> None:
    code = await send_and_read(core)
    bad = wrong_code(code)
    remaining = []
    for _ in range(4):
        with pytest.raises(InvalidOtp) as info:
            await core.auth.verify_code(PHONE, bad)
        assert info.value.code == "invalid_otp"
        remaining.append(info.value.details["attempts_remaining"])
    assert remaining == [4, 3, 2, 1]
    with pytest.raises(TooManyAttempts) as burned:
        await core.auth.verify_code(PHONE, bad)
    assert burned.value.code == "too_many_attempts"
    # Burned: even the right code fails, again and again, until a new send.
    for _ in range(2):
        with pytest.raises(TooManyAttempts):
            await core.auth.verify_code(PHONE, code)
    assert types(core).count(ev.AUTH_FAILED) >= 5
    fresh = await send_and_read(core)
    result = await core.auth.verify_code(PHONE, fresh)
    assert result.user.phone_number == PHONE


async def test_max_attempts_setting(make_core: MakeCore) -> None:
    core = make_core(otp_max_attempts=2)
    code = await send_and_read(core)
    with pytest.raises(InvalidOtp) as info:
        await core.auth.verify_code(PHONE, wrong_code(code))
    assert info.value.details["attempts_remaining"] == 1
    with pytest.raises(TooManyAttempts):
        await core.auth.verify_code(PHONE, wrong_code(code))
    with pytest.raises(TooManyAttempts):
        await core.auth.verify_code(PHONE, code)


async def test_a_new_send_replaces_the_previous_code(make_core: MakeCore) -> None:
    core = make_core(otp_length=10)  # 10 digits: the two codes differ
    first = await send_and_read(core)
    with pytest.raises(InvalidOtp):
        await core.auth.verify_code(PHONE, wrong_code(first))
    second = await send_and_read(core)
    assert first != second
    with pytest.raises(InvalidOtp) as info:
        await core.auth.verify_code(PHONE, first)
    # The new code has a fresh attempt count (the first code's failure is not carried over).
    assert info.value.details["attempts_remaining"] == 4
    assert (await core.auth.verify_code(PHONE, second)).user.phone_number == PHONE


async def test_codes_are_single_use(core: Core) -> None:
    code = await send_and_read(core)
    await core.auth.verify_code(PHONE, code)
    with pytest.raises(OtpExpired):
        await core.auth.verify_code(PHONE, code)


async def test_code_input_is_trimmed(core: Core) -> None:
    code = await send_and_read(core)
    assert (await core.auth.verify_code(PHONE, f" {code}\n")).user.phone_number == PHONE


# --- per-number failure budget ---------------------------------------------------------------


async def test_failure_budget_across_resends_locks_then_unlocks(core: Core, clock: FakeClock) -> None:
    start = clock()
    # Code 1: five wrong guesses (4 invalid, then burned) -> 5 failures.
    code = await send_and_read(core)
    for _ in range(4):
        with pytest.raises(InvalidOtp):
            await core.auth.verify_code(PHONE, wrong_code(code))
    with pytest.raises(TooManyAttempts):
        await core.auth.verify_code(PHONE, wrong_code(code))
    # Code 2: five more -> 10 failures: the number is locked.
    code = await send_and_read(core)
    for _ in range(4):
        with pytest.raises(InvalidOtp):
            await core.auth.verify_code(PHONE, wrong_code(code))
    with pytest.raises(TooManyAttempts) as locked:
        await core.auth.verify_code(PHONE, wrong_code(code))
    assert 0 < locked.value.details["retry_after"] <= 3600
    # Resending buys no guesses: even the right code of a new send fails.
    code = await send_and_read(core)
    with pytest.raises(TooManyAttempts) as still:
        await core.auth.verify_code(PHONE, code)
    assert 0 < still.value.details["retry_after"] <= 3600
    clock.advance(1800)
    code = await send_and_read(core)
    with pytest.raises(TooManyAttempts) as later:
        await core.auth.verify_code(PHONE, code)
    assert later.value.details["retry_after"] <= 1800
    # After the window the number is free again.
    clock.now = start + 3600 + 1
    code = await send_and_read(core)
    assert (await core.auth.verify_code(PHONE, code)).user.phone_number == PHONE


async def test_failure_budget_is_per_number(make_core: MakeCore) -> None:
    core = make_core(otp_max_failed_per_phone=2)
    code = await send_and_read(core, PHONE)
    with pytest.raises(InvalidOtp):
        await core.auth.verify_code(PHONE, wrong_code(code))
    with pytest.raises(TooManyAttempts):
        await core.auth.verify_code(PHONE, wrong_code(code))
    other = await send_and_read(core, OTHER_PHONE)
    assert (await core.auth.verify_code(OTHER_PHONE, other)).user.phone_number == OTHER_PHONE


async def test_failure_budget_configurable_window(make_core: MakeCore, clock: FakeClock) -> None:
    core = make_core(otp_max_failed_per_phone=2, otp_failed_window=300)
    code = await send_and_read(core)
    for _ in range(2):
        with pytest.raises((InvalidOtp, TooManyAttempts)):
            await core.auth.verify_code(PHONE, wrong_code(code))
    with pytest.raises(TooManyAttempts):
        await core.auth.verify_code(PHONE, code)
    clock.advance(301)
    code = await send_and_read(core)
    assert (await core.auth.verify_code(PHONE, code)).user.phone_number == PHONE


async def test_attempts_remaining_never_overstates_the_failure_budget(core: Core) -> None:
    code = await send_and_read(core)
    for _ in range(5):  # 5 failures, code burned
        with pytest.raises((InvalidOtp, TooManyAttempts)):
            await core.auth.verify_code(PHONE, wrong_code(code))
    code = await send_and_read(core)
    for _ in range(3):  # 8 failures
        with pytest.raises(InvalidOtp):
            await core.auth.verify_code(PHONE, wrong_code(code))
    code = await send_and_read(core)
    with pytest.raises(InvalidOtp) as info:  # 9 failures: one left for the number
        await core.auth.verify_code(PHONE, wrong_code(code))
    assert info.value.details["attempts_remaining"] == 1


# --- expiry ----------------------------------------------------------------------------------


async def test_code_expires_after_otp_expiry(core: Core, clock: FakeClock) -> None:
    code = await send_and_read(core)
    clock.advance(121)
    with pytest.raises(OtpExpired):
        await core.auth.verify_code(PHONE, code)
    assert ev.OTP_EXPIRED in types(core)
    # Expired is gone, not merely refused: still expired afterwards.
    with pytest.raises(OtpExpired):
        await core.auth.verify_code(PHONE, code)


async def test_code_works_until_expiry(core: Core, clock: FakeClock) -> None:
    code = await send_and_read(core)
    clock.advance(119)
    assert (await core.auth.verify_code(PHONE, code)).user.phone_number == PHONE


async def test_configured_expiry(make_core: MakeCore, clock: FakeClock) -> None:
    core = make_core(otp_expiry=600)
    result = await core.auth.send_code(PHONE)
    assert result.expires_in == 600
    await settle()
    code = sender_of(core).last_code(PHONE)
    clock.advance(599)
    assert (await core.auth.verify_code(PHONE, code)).created
    code = await send_and_read(core)
    clock.advance(601)
    with pytest.raises(OtpExpired):
        await core.auth.verify_code(PHONE, code)


# --- concurrency -----------------------------------------------------------------------------


async def test_concurrent_verifications_exactly_one_succeeds(core: Core) -> None:
    code = await send_and_read(core)
    results = await asyncio.gather(
        *(core.auth.verify_code(PHONE, code) for _ in range(10)), return_exceptions=True
    )
    wins = [r for r in results if isinstance(r, AuthResult)]
    assert len(wins) == 1
    losses = [r for r in results if not isinstance(r, AuthResult)]
    assert all(isinstance(r, OtpExpired) for r in losses), losses
    assert types(core).count(ev.USER_CREATED) == 1


async def test_concurrent_sends_exactly_three_accepted(core: Core) -> None:
    results = await asyncio.gather(*(core.auth.send_code(PHONE) for _ in range(20)), return_exceptions=True)
    accepted = [r for r in results if isinstance(r, SendResult)]
    refused = [r for r in results if isinstance(r, RateLimitExceeded)]
    assert len(accepted) == 3
    assert len(refused) == 17
    await settle()
    assert len(sender_of(core).sent) == 3
    assert types(core).count(ev.OTP_GENERATED) == 3
    assert types(core).count(ev.AUTH_RATE_LIMITED) == 17


# --- send rate limit -------------------------------------------------------------------------


async def test_send_limit_is_a_sliding_window(core: Core, clock: FakeClock) -> None:
    start = clock()
    for t in (0, 300, 599):
        clock.now = start + t
        result = await core.auth.send_code(PHONE)
        assert result.decision is not None and result.decision.allowed
    clock.now = start + 599.5
    with pytest.raises(RateLimitExceeded) as info:
        await core.auth.send_code(PHONE)
    assert info.value.code == "rate_limit_exceeded"
    decision = info.value.decision
    assert decision.allowed is False
    assert decision.limit == 3
    assert decision.remaining == 0
    assert 0 < decision.reset_after <= 1
    clock.now = start + 600.5
    assert (await core.auth.send_code(PHONE)).decision.allowed
    # The slots of t=300 and t=599 are still taken.
    clock.now = start + 601
    with pytest.raises(RateLimitExceeded):
        await core.auth.send_code(PHONE)


async def test_send_limit_is_per_number_and_counts_every_format(core: Core) -> None:
    for raw in ("+1 (415) 555-0123", "+1 415-555-0123", "+14155550123"):
        await core.auth.send_code(raw)
    with pytest.raises(RateLimitExceeded):
        await core.auth.send_code("+1 415 555 0123")
    assert (await core.auth.send_code(OTHER_PHONE)).phone_number == OTHER_PHONE


async def test_refused_send_keeps_the_previous_code(core: Core) -> None:
    for _ in range(3):
        await core.auth.send_code(PHONE)
    await settle()
    code = sender_of(core).last_code(PHONE)
    with pytest.raises(RateLimitExceeded):
        await core.auth.send_code(PHONE)
    await settle()
    assert len(sender_of(core).sent) == 3
    assert (await core.auth.verify_code(PHONE, code)).user.phone_number == PHONE


async def test_send_decision_counts_down(core: Core) -> None:
    remaining = [(await core.auth.send_code(PHONE)).decision.remaining for _ in range(3)]
    assert remaining == [2, 1, 0]


# --- test numbers ----------------------------------------------------------------------------


@pytest.fixture
def test_core(make_core: MakeCore) -> Core:
    return make_core(otp_test_phone_numbers=f"{TEST_PHONE}={TEST_CODE}")


async def test_test_number_fixed_code_nothing_sent(test_core: Core) -> None:
    result = await test_core.auth.send_code("+1 555 555 0100")
    assert result.phone_number == TEST_PHONE
    assert result.test_number is True
    assert result.decision is None
    await settle()
    assert sender_of(test_core).sent == []
    generated = [e for e in test_core.events.events if e.event_type == ev.OTP_GENERATED]
    assert generated[-1].data["test_number"] is True
    auth = await test_core.auth.verify_code(TEST_PHONE, TEST_CODE, name="Reviewer")
    assert auth.user.phone_number == TEST_PHONE


async def test_test_number_is_exempt_from_the_send_limit(test_core: Core) -> None:
    for _ in range(10):
        assert (await test_core.auth.send_code(TEST_PHONE)).test_number
    assert ev.AUTH_RATE_LIMITED not in types(test_core)


async def test_test_number_is_still_single_use(test_core: Core) -> None:
    await test_core.auth.send_code(TEST_PHONE)
    await test_core.auth.verify_code(TEST_PHONE, TEST_CODE)
    with pytest.raises(OtpExpired):
        await test_core.auth.verify_code(TEST_PHONE, TEST_CODE)
    await test_core.auth.send_code(TEST_PHONE)
    assert (await test_core.auth.verify_code(TEST_PHONE, TEST_CODE)).created is False


async def test_test_number_needs_a_send_first(test_core: Core) -> None:
    with pytest.raises(OtpExpired):
        await test_core.auth.verify_code(TEST_PHONE, TEST_CODE)


async def test_test_number_wrong_code_and_failure_budget_apply(test_core: Core) -> None:
    await test_core.auth.send_code(TEST_PHONE)
    with pytest.raises(InvalidOtp):
        await test_core.auth.verify_code(TEST_PHONE, "654321")


async def test_other_numbers_are_unaffected_by_test_numbers(test_core: Core) -> None:
    code = await send_and_read(test_core, PHONE)
    assert len(sender_of(test_core).sent) == 1
    if code != TEST_CODE:
        with pytest.raises(InvalidOtp):
            await test_core.auth.verify_code(PHONE, TEST_CODE)


async def test_test_number_stops_working_after_valid_until_in_a_running_process(
    make_core: MakeCore, clock: FakeClock
) -> None:
    today = datetime.fromtimestamp(clock(), UTC).date()
    core = make_core(
        otp_test_phone_numbers=f"{TEST_PHONE}={TEST_CODE}",
        otp_test_phone_numbers_valid_until=today.isoformat(),
    )
    await core.auth.send_code(TEST_PHONE)
    assert (await core.auth.verify_code(TEST_PHONE, TEST_CODE)).created
    clock.advance(2 * 86400)  # two days later, same process
    with pytest.raises((InvalidPhoneNumber, InvalidOtp, OtpExpired)):
        await core.auth.send_code(TEST_PHONE)
        await core.auth.verify_code(TEST_PHONE, TEST_CODE)


# --- admins ----------------------------------------------------------------------------------


async def test_admin_numbers_get_the_admin_role(make_core: MakeCore) -> None:
    core = make_core(otp_admin_phone_numbers="+1 (415) 555-0123")
    result = await core.auth.verify_code(PHONE, await send_and_read(core))
    assert result.user.role is Role.ADMIN
    assert core.tokens.decode_access(result.access_token).role is Role.ADMIN
    created = [e for e in core.events.events if e.event_type == ev.USER_CREATED]
    assert created[0].data["role"] == "admin"
    other = await core.auth.verify_code(OTHER_PHONE, await send_and_read(core, OTHER_PHONE))
    assert other.user.role is Role.USER


async def test_existing_user_on_admin_list_is_promoted(make_core: MakeCore) -> None:
    core = make_core(otp_admin_phone_numbers=PHONE)
    await core.container.user_repo().get_or_create(PHONE, name="Ada", role=Role.USER)
    result = await core.auth.verify_code(PHONE, await send_and_read(core))
    assert result.created is False
    assert result.user.role is Role.ADMIN


# --- names on first login --------------------------------------------------------------------


async def test_name_is_trimmed(core: Core) -> None:
    result = await core.auth.verify_code(PHONE, await send_and_read(core), name="  Ada Lovelace \n")
    assert result.user.name == "Ada Lovelace"


@pytest.mark.parametrize("name", [None, "", "   "])
async def test_no_name_gives_empty_name(core: Core, name: str | None) -> None:
    result = await core.auth.verify_code(PHONE, await send_and_read(core), name=name)
    assert result.user.name == ""


@pytest.mark.parametrize(
    "name",
    [
        "a" * 100,
        "José Müller",
        "Zoë O'Brien-Smith",
        "👩‍💻 Ada",  # woman technologist: emoji joined with U+200D
        "👨‍👩‍👧‍👦",
        "محمد",
        "नमस्ते",
        "李小龍",
        "e\u0301cole",  # combining accent
    ],
)
async def test_valid_names(core: Core, name: str) -> None:
    result = await core.auth.verify_code(PHONE, await send_and_read(core), name=name)
    assert result.user.name == unicodedata.normalize("NFC", name)


@pytest.mark.parametrize(
    "name",
    [
        "a" * 101,
        "  " + "b" * 101 + "  ",
        "Ada\x07",
        "Ada\nLovelace",
        "Ada\x00",
        "Ada\tLovelace",
        "\u202eevil",  # right-to-left override
        "admin\u200b",  # zero-width space
        "\u2066Ada\u2069",  # isolates
        "Ada\ufeff",  # BOM / zero-width no-break space
        "Ada\u2028Lovelace",  # line separator
    ],
)
async def test_invalid_names_are_refused_and_the_code_survives(core: Core, name: str) -> None:
    code = await send_and_read(core)
    with pytest.raises(ValidationError) as info:
        await core.auth.verify_code(PHONE, code, name=name)
    assert info.value.code == "validation_error"
    assert "name" in info.value.message
    # The refusal did not use up the code.
    assert (await core.auth.verify_code(PHONE, code, name="Ada")).user.name == "Ada"


async def test_name_of_100_characters_after_trimming(core: Core) -> None:
    name = "  " + "x" * 100 + "  "
    result = await core.auth.verify_code(PHONE, await send_and_read(core), name=name)
    assert result.user.name == "x" * 100


# --- inactive users --------------------------------------------------------------------------


async def deactivate(core: Core, user_id: int) -> None:
    admin = await core.users.set_role("+14155550199", Role.ADMIN)
    await core.users.administer(admin, user_id, is_active=False)


async def test_inactive_user_cannot_log_in_and_tokens_stop(core: Core) -> None:
    result = await core.auth.verify_code(PHONE, await send_and_read(core))
    await core.auth.authenticate(result.access_token)
    await deactivate(core, result.user.id)
    with pytest.raises(UserInactive) as info:
        await core.auth.authenticate(result.access_token)
    assert info.value.code == "user_inactive"
    with pytest.raises(UserInactive):
        await core.auth.refresh(result.refresh_token)
    with pytest.raises(UserInactive):
        await core.auth.verify_code(PHONE, await send_and_read(core))
    assert ev.USER_AUTHENTICATED not in types(core)[-3:]


# --- sessions: refresh, reuse detection, logout ----------------------------------------------


async def test_refresh_rotates(core: Core) -> None:
    first = await core.auth.verify_code(PHONE, await send_and_read(core))
    second = await core.auth.refresh(first.refresh_token)
    assert second.refresh_token != first.refresh_token
    assert second.user.id == first.user.id
    assert second.token_type == "Bearer"
    sid = core.tokens.decode_access(first.access_token).sid
    assert core.tokens.decode_access(second.access_token).sid == sid
    assert (await core.auth.authenticate(second.access_token)).user.id == first.user.id
    third = await core.auth.refresh(second.refresh_token)
    assert (await core.auth.authenticate(third.access_token)).claims.sid == sid


async def test_reused_refresh_token_revokes_the_session(core: Core) -> None:
    first = await core.auth.verify_code(PHONE, await send_and_read(core))
    second = await core.auth.refresh(first.refresh_token)
    with pytest.raises(InvalidToken):
        await core.auth.refresh(first.refresh_token)
    revoked = [e for e in core.events.events if e.event_type == ev.SESSION_REVOKED]
    assert revoked and revoked[-1].data["reason"] == "refresh_token_reuse"
    # The whole session is gone: its access tokens and its current refresh token.
    for token in (first.access_token, second.access_token):
        with pytest.raises(InvalidToken):
            await core.auth.authenticate(token)
    with pytest.raises(InvalidToken):
        await core.auth.refresh(second.refresh_token)


async def test_reuse_revokes_only_that_session(core: Core) -> None:
    a = await core.auth.verify_code(PHONE, await send_and_read(core))
    b = await core.auth.verify_code(PHONE, await send_and_read(core))
    await core.auth.refresh(a.refresh_token)
    with pytest.raises(InvalidToken):
        await core.auth.refresh(a.refresh_token)
    assert (await core.auth.authenticate(b.access_token)).user.id == b.user.id


async def test_logout_revokes_the_session(core: Core) -> None:
    result = await core.auth.verify_code(PHONE, await send_and_read(core))
    principal = await core.auth.authenticate(result.access_token)
    await core.auth.logout(principal)
    with pytest.raises(InvalidToken):
        await core.auth.authenticate(result.access_token)
    with pytest.raises(InvalidToken):
        await core.auth.refresh(result.refresh_token)
    revoked = [e for e in core.events.events if e.event_type == ev.SESSION_REVOKED]
    assert revoked[-1].data["reason"] == "logout"


async def test_logout_with_refresh_token_revokes_that_session_of_the_same_user(
    core: Core,
) -> None:
    a = await core.auth.verify_code(PHONE, await send_and_read(core))
    b = await core.auth.verify_code(PHONE, await send_and_read(core))
    c = await core.auth.verify_code(OTHER_PHONE, await send_and_read(core, OTHER_PHONE))
    principal = await core.auth.authenticate(a.access_token)
    await core.auth.logout(principal, b.refresh_token)
    with pytest.raises(InvalidToken):
        await core.auth.authenticate(b.access_token)
    # Another user's session cannot be revoked this way.
    await core.auth.logout(principal, c.refresh_token)
    assert (await core.auth.authenticate(c.access_token)).user.id == c.user.id


@pytest.mark.parametrize("token", ["", "garbage", "x" * 1000, "é", "a.b.c"])
async def test_refresh_with_garbage_is_invalid_token(core: Core, token: str) -> None:
    with pytest.raises(InvalidToken) as info:
        await core.auth.refresh(token)
    assert info.value.code == "invalid_token"


async def test_refresh_token_is_not_an_access_token(core: Core) -> None:
    result = await core.auth.verify_code(PHONE, await send_and_read(core))
    with pytest.raises(InvalidToken):
        await core.auth.refresh(result.access_token)
    with pytest.raises(InvalidToken):
        await core.auth.authenticate(result.refresh_token)


async def test_session_store_holds_no_raw_refresh_token(core: Core) -> None:
    result = await core.auth.verify_code(PHONE, await send_and_read(core))
    store = core.container.session_store()
    assert result.refresh_token not in repr(vars(store))
    assert result.refresh_token.encode() not in b"".join(store._tokens)


async def test_refresh_session_expires(make_core: MakeCore, clock: FakeClock) -> None:
    core = make_core(jwt_refresh_expiry=3600)
    result = await core.auth.verify_code(PHONE, await send_and_read(core))
    clock.advance(3601)
    with pytest.raises(InvalidToken):
        await core.auth.refresh(result.refresh_token)


# --- delivery --------------------------------------------------------------------------------


class FailingSender:
    def __init__(self) -> None:
        self.calls = 0

    async def send(self, phone: str, code: str, message: str) -> None:
        self.calls += 1
        raise ConnectionError(f"provider down while sending {code}")


async def test_delivery_failure_is_an_event_and_send_still_succeeds(
    make_core: MakeCore, caplog: pytest.LogCaptureFixture
) -> None:
    sender = FailingSender()
    core = make_core(code_sender=sender)
    result = await core.auth.send_code(PHONE)
    assert result.phone_number == PHONE
    await settle()
    assert sender.calls == 1
    failed = [e for e in core.events.events if e.event_type == ev.OTP_DELIVERY_FAILED]
    assert len(failed) == 1
    assert failed[0].data["phone_number"] == PHONE
    # The exception text held the code; neither the event nor the log repeats it.
    for record in caplog.records:
        assert "provider down" not in record.getMessage()
    assert "provider down" not in msgspec.json.encode(failed[0]).decode()


async def test_send_does_not_wait_for_delivery(make_core: MakeCore) -> None:
    gate = asyncio.Event()

    class SlowSender:
        sent: list[str] = []

        async def send(self, phone: str, code: str, message: str) -> None:
            await gate.wait()
            self.sent.append(code)

    sender = SlowSender()
    core = make_core(code_sender=sender)
    await asyncio.wait_for(core.auth.send_code(PHONE), timeout=1)
    assert sender.sent == []
    gate.set()
    await core.auth.drain()
    assert len(sender.sent) == 1


async def test_sms_text_uses_the_template(make_core: MakeCore) -> None:
    core = make_core(otp_sms_template="{code} is your code\n\n@example.com #{code}")
    code = await send_and_read(core)
    _, _, message = sender_of(core).sent[-1]
    assert message == f"{code} is your code\n\n@example.com #{code}"
