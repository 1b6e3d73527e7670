"""HTTP metrics: every response counted by method, route template and status."""

from __future__ import annotations

import time
from typing import cast

from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send

from otp_http.middleware import RATE_LIMITED
from otpcore.telemetry import Telemetry

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Routes whose outcome is an OTP operation: template -> operation label.
_OTP_OPERATIONS = {
    "/api/v1/auth/send-otp": "generate",
    "/api/v1/auth/verify-otp": "verify",
}


class MetricsMiddleware:
    """Counts every response by method, route template and status (outermost layer)."""

    def __init__(self, app: ASGIApp, metrics: Telemetry) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            self._record(cast("HTTPScope", scope), status, time.perf_counter() - started)

    def _record(self, scope: HTTPScope, status: int, elapsed: float) -> None:
        # Unmatched paths and unknown methods share one label each, so scanners cannot blow up
        # the cardinality.
        path = scope.get("path_template") or "unmatched"
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        self.metrics.add("http_requests", method=method, path=path, status_code=str(status))
        self.metrics.duration.record(elapsed, {"method": method, "path": path})
        operation = _OTP_OPERATIONS.get(path)
        if operation and status != 429:
            self.metrics.add("otp_operations", operation=operation, success=str(status < 400).lower())
        limited = scope.get("state", {}).get(RATE_LIMITED)
        if limited:
            self.metrics.add("rate_limit_exceeded", endpoint_type=limited)
