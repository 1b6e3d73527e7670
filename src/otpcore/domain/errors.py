"""One error hierarchy for the domain: each error carries the stable code of SPEC §3.

Services raise only these; the HTTP layer maps them to statuses in one table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from otpcore.domain.ports import RateDecision


class OtpError(Exception):
    """Base of every domain error; ``code`` is the stable machine-readable name."""

    code = "internal_error"
    default_message = "internal error"

    def __init__(self, message: str | None = None, **details: int | str) -> None:
        self.message = message or self.default_message
        # Extra fields for the error body, e.g. attempts_remaining / retry_after.
        self.details = details
        super().__init__(self.message)


class InvalidPhoneNumber(OtpError):
    code = "invalid_phone_number"
    default_message = "invalid phone number"


class InvalidOtp(OtpError):
    code = "invalid_otp"
    default_message = "invalid OTP code"


class OtpExpired(OtpError):
    code = "otp_expired"
    default_message = "OTP not found or expired"


class TooManyAttempts(OtpError):
    code = "too_many_attempts"
    default_message = "too many failed attempts; request a new code later"


class RateLimitExceeded(OtpError):
    code = "rate_limit_exceeded"
    default_message = "too many requests, please try again later"

    def __init__(self, decision: RateDecision, message: str | None = None) -> None:
        self.decision = decision
        super().__init__(message)


class AdmissionRefused(RateLimitExceeded):
    """One of the caller's own limits (AuthService.send_code's ``admission``) refused: the caller
    answers it as it answers its own refusals."""


class AuthorizationRequired(OtpError):
    code = "authorization_required"
    default_message = "please provide a valid authorization header"


class InvalidToken(OtpError):
    code = "invalid_token"
    default_message = "invalid or expired token"


class Forbidden(OtpError):
    code = "forbidden"
    default_message = "you are not allowed to do this"


class UserInactive(OtpError):
    code = "user_inactive"
    default_message = "this user is deactivated"


class NotFound(OtpError):
    code = "not_found"
    default_message = "not found"


class ValidationError(OtpError):
    code = "validation_error"
    default_message = "invalid input"


class ServiceUnavailable(OtpError):
    code = "service_unavailable"
    default_message = "a backing store is unavailable, please retry"
