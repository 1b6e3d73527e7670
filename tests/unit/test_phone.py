"""PhonePolicy.normalize: SPEC §4 Phone numbers."""

from __future__ import annotations

import phonenumbers
import pytest

from otpcore.domain.errors import InvalidPhoneNumber
from otpcore.domain.model import PhonePolicy

E164 = "+14155550123"


@pytest.mark.parametrize("raw", ["+1 (415) 555-0123", "+1 415-555-0123", "+14155550123"])
def test_the_three_spec_formats_are_one_number(raw: str) -> None:
    assert PhonePolicy().normalize(raw) == E164


def test_surrounding_whitespace_is_ignored() -> None:
    assert PhonePolicy().normalize("  +1 415 555 0123\t") == E164


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "+",
        "4155550123",  # no +country
        "(415) 555-0123",  # national format, no country
        "0044 20 7946 0958",  # no leading +
        "+0 123",  # no such country code
        "+1 415 555",  # too short
        "+1415555012345678",  # too long for the country
        "+14155550123abc",
        "+1 415 555 0123 hello",
        "hello",
        "'; DROP TABLE users; --",
        "+1" + "5" * 200,  # overly long
        "+14155550123" + " " * 100,  # overly long, even if the number inside is fine
    ],
)
def test_invalid_and_garbage_inputs_are_refused(raw: str) -> None:
    with pytest.raises(InvalidPhoneNumber) as info:
        PhonePolicy().normalize(raw)
    assert info.value.code == "invalid_phone_number"


@pytest.mark.parametrize("raw", [None, 14155550123, b"+14155550123", ["+14155550123"], {}])
def test_non_strings_are_refused(raw: object) -> None:
    with pytest.raises(InvalidPhoneNumber):
        PhonePolicy().normalize(raw)  # type: ignore[arg-type]


def test_fictitious_test_numbers_pass_only_when_configured() -> None:
    fictitious = "+1 555 555 0100"
    with pytest.raises(InvalidPhoneNumber):
        PhonePolicy().normalize(fictitious)
    policy = PhonePolicy(test_numbers=frozenset({"+15555550100"}))
    assert policy.normalize(fictitious) == "+15555550100"
    assert policy.normalize("+15555550100") == "+15555550100"
    # Only the configured one: its neighbour is still refused.
    with pytest.raises(InvalidPhoneNumber):
        policy.normalize("+15555550101")


def test_test_numbers_must_still_be_well_formed() -> None:
    policy = PhonePolicy(test_numbers=frozenset({"+15555550100"}))
    for raw in ("5555550100", "+1555555010x", "garbage"):
        with pytest.raises(InvalidPhoneNumber):
            policy.normalize(raw)


def test_allowed_countries_restrict_where_codes_go() -> None:
    policy = PhonePolicy(allowed_countries=frozenset({"GB"}))
    assert policy.normalize("+44 20 7946 0958") == "+442079460958"
    with pytest.raises(InvalidPhoneNumber):
        policy.normalize(E164)


def test_no_allowed_countries_means_everywhere() -> None:
    policy = PhonePolicy()
    assert policy.normalize("+44 20 7946 0958") == "+442079460958"
    assert policy.normalize("+33 1 23 45 67 89") == "+33123456789"


def test_several_allowed_countries() -> None:
    policy = PhonePolicy(allowed_countries=frozenset({"US", "GB"}))
    assert policy.normalize(E164) == E164
    assert policy.normalize("+44 20 7946 0958") == "+442079460958"
    with pytest.raises(InvalidPhoneNumber):
        policy.normalize("+33 1 23 45 67 89")


def test_country_of() -> None:
    assert PhonePolicy.country_of(E164) == "US"
    assert PhonePolicy.country_of("+442079460958") == "GB"
    assert PhonePolicy.country_of("nonsense") == "ZZ"


def test_parse_finds_the_country_and_judges_validity_as_is_valid_number() -> None:
    # Every region's example numbers of every type, and neighbours of each (some valid, some
    # not): parse must agree with the library's is_valid_number and region_code_for_number.
    policy = PhonePolicy()
    types = [t for t in vars(phonenumbers.PhoneNumberType).values() if isinstance(t, int)]
    checked = set()
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in types:
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
            for candidate in [e164] + [e164[:-2] + a + b for a in "0159" for b in "07"] + [e164 + "1"]:
                if candidate in checked:
                    continue
                checked.add(candidate)
                parsed = phonenumbers.parse(candidate, None)
                if phonenumbers.is_valid_number(parsed):
                    normalised = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
                    expected = (normalised, phonenumbers.region_code_for_number(parsed))
                    assert policy.parse(candidate) == expected, candidate
                else:
                    with pytest.raises(InvalidPhoneNumber):
                        policy.parse(candidate)
    assert len(checked) > 5_000
