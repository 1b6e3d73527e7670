"""HTTP metrics: every response counted by method, route template and status, and timed.

EdgeMiddleware (the outermost layer) calls ``record_response`` once per HTTP request.
"""

from __future__ import annotations

from otpcore.telemetry import Telemetry

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Routes whose outcome is an OTP operation: template -> operation label.
_OTP_OPERATIONS = {
    "/api/v1/auth/send-otp": "generate",
    "/api/v1/auth/verify-otp": "verify",
}


def record_response(
    telemetry: Telemetry,
    method: str,
    path_template: str | None,
    status: int,
    elapsed: float,
    limited: str | None,
) -> None:
    """``limited``: the name of the rate limit that refused the request, if one did."""
    # Unmatched paths and unknown methods share one label each, so scanners cannot blow up
    # the cardinality.
    path = path_template or "unmatched"
    method = method if method in _METHODS else "OTHER"
    telemetry.add("http_requests", method=method, path=path, status_code=str(status))
    telemetry.duration.record(elapsed, method, path)
    operation = _OTP_OPERATIONS.get(path)
    if operation and status != 429:
        telemetry.add("otp_operations", operation=operation, success=str(status < 400).lower())
    if limited:
        telemetry.add("rate_limit_exceeded", endpoint_type=limited)
