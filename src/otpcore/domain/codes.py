"""One-time codes: generation, keyed digests and the limits around them."""

from __future__ import annotations

import hashlib
import hmac
import secrets

import msgspec

from otpcore.domain.ports import Limit

DEFAULT_SMS_TEMPLATE = "Your sign-in code is {code}. It expires in {minutes} min."


class CodePolicy(msgspec.Struct, frozen=True, kw_only=True):
    # Key of the HMAC that codes are stored under; never stored beside them.
    secret: bytes
    length: int = 6
    charset: str = "0123456789"
    ttl: int = 120
    max_attempts: int = 5
    sends_per_window: int = 3
    send_window: int = 600
    failures_per_window: int = 10
    failure_window: int = 3600
    # E.164 number -> fixed code: nothing is sent and the send limit does not apply,
    # until the epoch second ``test_codes_until`` (None: no end).
    test_codes: dict[str, str] = msgspec.field(default_factory=dict)
    test_codes_until: float | None = None
    sms_template: str = DEFAULT_SMS_TEMPLATE

    def __post_init__(self) -> None:
        if not 4 <= self.length <= 10:
            raise ValueError("OTP_LENGTH must be between 4 and 10")
        if len(set(self.charset)) < 2:
            raise ValueError("OTP_CODE_CHARSET needs at least two distinct characters")
        if len(self.secret) < 16:
            raise ValueError("the code HMAC key must be at least 16 bytes")

    def generate(self) -> str:
        # One draw from the OS's CSPRNG for the whole code, read as ``length`` base-n digits:
        # the same uniform distribution as a ``secrets.choice`` per character, one syscall.
        n = len(self.charset)
        value = secrets.randbelow(n**self.length)
        chars = []
        for _ in range(self.length):
            value, index = divmod(value, n)
            chars.append(self.charset[index])
        return "".join(chars)

    def active_test_codes(self, now: float) -> dict[str, str]:
        if self.test_codes_until is not None and now >= self.test_codes_until:
            return {}
        return self.test_codes

    def test_code(self, phone: str, now: float) -> str | None:
        return self.active_test_codes(now).get(phone)

    def digest(self, phone: str, code: str) -> bytes:
        # Binding the number in means a digest is worthless for any other number.
        return hmac.new(self.secret, f"{phone}\x00{code}".encode(), hashlib.sha256).digest()

    def send_limit(self, phone: str) -> Limit:
        return Limit(name="otp", subject=phone, requests=self.sends_per_window, window=self.send_window)

    def failure_budget(self, phone: str) -> Limit:
        return Limit(
            name="otp_failures", subject=phone, requests=self.failures_per_window, window=self.failure_window
        )

    def message(self, code: str) -> str:
        # Plain replacement, not str.format: the template is text, never a format program.
        minutes = str(max(1, self.ttl // 60))
        return self.sms_template.replace("{code}", code).replace("{minutes}", minutes)
