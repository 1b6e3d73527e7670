"""CodePolicy: generation, keyed digests and the SMS text (SPEC §4 Codes, Code delivery)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from otpcore.domain.codes import CodePolicy

KEY = b"k" * 32
PHONE = "+14155550123"


def test_default_codes_are_six_digits() -> None:
    policy = CodePolicy(secret=KEY)
    for _ in range(200):
        code = policy.generate()
        assert len(code) == 6
        assert code.isdigit() and code.isascii()


@pytest.mark.parametrize("length", [4, 7, 10])
def test_codes_have_the_configured_length_and_charset(length: int) -> None:
    policy = CodePolicy(secret=KEY, length=length, charset="ABC")
    codes = [policy.generate() for _ in range(300)]
    for code in codes:
        assert len(code) == length
        assert set(code) <= set("ABC")
    # Every character of the charset gets used.
    assert set("".join(codes)) == set("ABC")


def test_codes_are_not_constant() -> None:
    policy = CodePolicy(secret=KEY)
    codes = {policy.generate() for _ in range(100)}
    # 100 draws out of 10^6: collisions are possible but a handful at most.
    assert len(codes) > 90


def test_digit_distribution_is_roughly_uniform() -> None:
    policy = CodePolicy(secret=KEY)
    text = "".join(policy.generate() for _ in range(2000))  # 12000 digits
    counts = [text.count(d) for d in "0123456789"]
    assert all(900 < c < 1500 for c in counts), counts


@pytest.mark.parametrize("length", [0, 3, 11, 20, -1])
def test_length_bounds_are_enforced(length: int) -> None:
    with pytest.raises(ValueError, match="OTP_LENGTH"):
        CodePolicy(secret=KEY, length=length)


@pytest.mark.parametrize("charset", ["", "0", "000"])
def test_charset_needs_two_distinct_characters(charset: str) -> None:
    with pytest.raises(ValueError, match="OTP_CODE_CHARSET"):
        CodePolicy(secret=KEY, charset=charset)


def test_short_hmac_key_is_refused() -> None:
    with pytest.raises(ValueError):
        CodePolicy(secret=b"short")


def test_digest_is_hmac_sha256_keyed_by_the_secret_and_bound_to_the_phone() -> None:
    policy = CodePolicy(secret=KEY)
    digest = policy.digest(PHONE, "123456")
    assert len(digest) == 32
    expected = hmac.new(KEY, f"{PHONE}\x00123456".encode(), hashlib.sha256).digest()
    assert digest == expected
    # Deterministic: the store compares digests.
    assert policy.digest(PHONE, "123456") == digest


def test_digest_differs_for_another_phone_code_or_key() -> None:
    policy = CodePolicy(secret=KEY)
    digest = policy.digest(PHONE, "123456")
    assert policy.digest("+14155550124", "123456") != digest
    assert policy.digest(PHONE, "123457") != digest
    assert CodePolicy(secret=b"x" * 32).digest(PHONE, "123456") != digest


def test_digest_is_not_a_plain_hash_and_never_holds_the_code() -> None:
    policy = CodePolicy(secret=KEY)
    code = "123456"
    digest = policy.digest(PHONE, code)
    assert digest != code.encode()
    assert code.encode() not in digest
    assert code not in digest.hex()
    # Unkeyed hashes of the code (with or without the phone) are not what is stored.
    assert digest != hashlib.sha256(code.encode()).digest()
    assert digest != hashlib.sha256(f"{PHONE}\x00{code}".encode()).digest()


def test_digest_separates_phone_and_code() -> None:
    # "+1415555012" + "31234" must not collide with "+14155550123" + "1234".
    policy = CodePolicy(secret=KEY)
    assert policy.digest("+1415555012", "31234") != policy.digest("+14155550123", "1234")


def test_message_substitutes_code_and_minutes() -> None:
    policy = CodePolicy(secret=KEY, ttl=300, sms_template="Code {code}, valid {minutes} min")
    assert policy.message("654321") == "Code 654321, valid 5 min"


def test_default_template_holds_the_code_and_the_expiry() -> None:
    text = CodePolicy(secret=KEY, ttl=120).message("654321")
    assert "654321" in text
    assert "2 min" in text


def test_minutes_never_reads_zero() -> None:
    policy = CodePolicy(secret=KEY, ttl=30, sms_template="{minutes}")
    assert policy.message("1234") == "1"


def test_template_may_repeat_placeholders_and_end_with_webotp_line() -> None:
    policy = CodePolicy(secret=KEY, sms_template="{code} is your code\n\n@example.com #{code}")
    assert policy.message("4242") == "4242 is your code\n\n@example.com #4242"


@pytest.mark.parametrize(
    "template",
    [
        "{code.__class__}",
        "{code.__class__.__mro__}",
        "{0}",
        "{}",
        "{minutes!r}",
        "{code:>20}",
        "{secret}",
        "{{code}}",
    ],
)
def test_template_is_not_a_format_program(template: str) -> None:
    policy = CodePolicy(secret=KEY, sms_template=template)
    text = policy.message("1234")
    assert "class" not in text.replace("__class__", "")
    assert "kkkk" not in text
    # Anything but the exact placeholders stays literal.
    if "{code}" not in template and "{minutes}" not in template:
        assert text == template


def test_format_like_text_in_template_is_literal() -> None:
    policy = CodePolicy(secret=KEY, sms_template="{code.__class__} {code} {minutes}", ttl=120)
    assert policy.message("1234") == "{code.__class__} 1234 2"


def test_send_limit_and_failure_budget_are_per_phone() -> None:
    policy = CodePolicy(
        secret=KEY, sends_per_window=3, send_window=600, failures_per_window=10, failure_window=3600
    )
    send = policy.send_limit(PHONE)
    assert (send.requests, send.window) == (3, 600)
    assert PHONE in send.key
    assert policy.send_limit("+14155550124").key != send.key
    budget = policy.failure_budget(PHONE)
    assert (budget.requests, budget.window) == (10, 3600)
    assert budget.key != send.key
