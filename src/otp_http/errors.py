"""Every failure becomes ``{"error": code, "message": text}``: one table, one place.

Domain errors map by class; framework errors (404, 405, 413, bad JSON, validation) by kind;
anything else is a 500 ``internal_error`` with nothing of the cause in the body.
"""

from __future__ import annotations

import logging
import re

from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    ValidationException,
)
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from otp_http.schemas import ErrorBody
from otpcore.domain import errors as e

log = logging.getLogger("otp_http.errors")

STATUS: dict[type[e.OtpError], int] = {
    e.InvalidPhoneNumber: 400,
    e.InvalidOtp: 400,
    e.OtpExpired: 400,
    e.ValidationError: 400,
    e.AuthorizationRequired: 401,
    e.InvalidToken: 401,
    e.Forbidden: 403,
    e.UserInactive: 403,
    e.NotFound: 404,
    e.TooManyAttempts: 429,
    e.RateLimitExceeded: 429,
    e.ServiceUnavailable: 503,
}

# What Litestar says when the client hangs up while sending its body.
CLIENT_GONE = "client disconnected prematurely"
_MISSING_FIELD = re.compile(r"missing required field `(\w+)`")


def error_response(status: int, code: str, message: str, **extra: object) -> Response[ErrorBody]:
    body = ErrorBody(error=code, message=message, **extra)  # type: ignore[arg-type]
    return Response(body, status_code=status, headers=error_headers(body))


def error_headers(body: ErrorBody) -> dict[str, str] | None:
    return {"Retry-After": str(body.retry_after)} if body.retry_after else None


def status_of(exc: e.OtpError) -> int:
    """The HTTP status of a domain error; 500 for one the table does not know."""
    return next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 500)


def domain_error(_: Request, exc: e.OtpError) -> Response[ErrorBody]:
    status = status_of(exc)
    if status == 500:
        return internal_error(_, exc)
    return error_response(status, exc.code, exc.message, **exc.details)


def http_error(_: Request, exc: HTTPException) -> Response[ErrorBody]:
    if isinstance(exc, ValidationException):
        return error_response(400, "validation_error", _validation_message(exc))
    if isinstance(exc, NotFoundException):
        return error_response(404, "not_found", "no such resource")
    if isinstance(exc, MethodNotAllowedException):
        response = error_response(405, "method_not_allowed", "method not allowed on this resource")
        response.headers.update(exc.headers or {})  # Allow: the methods the resource has
        return response
    if isinstance(exc, RequestEntityTooLarge):
        return error_response(413, "payload_too_large", "request body is larger than 16 KiB")
    if exc.status_code == 400:
        # A plain 400 from the framework is a body it could not decode.
        return error_response(400, "invalid_request", "request body is not valid JSON")
    if exc.status_code >= 500:
        if exc.detail == CLIENT_GONE:
            # Nobody is left to read the answer; not a failure of ours.
            log.info("client disconnected before its request body arrived")
            return error_response(400, "invalid_request", "request body incomplete")
        return internal_error(_, exc)
    return error_response(exc.status_code, "invalid_request", str(exc.detail))


def undecodable_body(_: Request, exc: Exception) -> Response[ErrorBody]:
    # Raised while the framework decodes a body: invalid UTF-8 in a string, or nesting deeper
    # than the decoder follows. Both are the client's bad JSON, not our failure.
    return error_response(400, "invalid_request", "request body is not valid JSON")


def internal_error(request: Request, exc: Exception) -> Response[ErrorBody]:
    log_internal_error(request.method, request.url.path, exc)
    return error_response(500, "internal_error", "internal server error")


def log_internal_error(method: str, path: str, exc: Exception) -> None:
    log.error("unhandled error on %s %s", method, path, exc_info=exc)


def _validation_message(exc: ValidationException) -> str:
    """Name the field: "phone_number: Expected `str`, got `int`"."""
    problems = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    for problem in problems:
        if not isinstance(problem, dict):
            continue
        message = str(problem.get("message", "invalid value"))
        missing = _MISSING_FIELD.search(message)
        if missing:
            parts.append(f"{missing.group(1)}: is required")
        else:
            key = problem.get("key") or "body"
            parts.append(f"{'body' if key == 'data' else key}: {message}")
    return "; ".join(parts) or str(exc.detail)


EXCEPTION_HANDLERS = {
    e.OtpError: domain_error,
    HTTPException: http_error,
    UnicodeDecodeError: undecodable_body,
    RecursionError: undecodable_body,
    Exception: internal_error,
}
