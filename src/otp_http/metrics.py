"""Metrics through the OpenTelemetry SDK, exposed in Prometheus text by its exporter.

Each app owns its registry, so several apps in one process (tests) never mix their counts.
"""

from __future__ import annotations

import time
from typing import cast

from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

from otp_http.middleware import RATE_LIMITED

# Seconds: the SDK's default buckets are sized for milliseconds.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Routes whose outcome is an OTP operation: template -> operation label.
_OTP_OPERATIONS = {
    "/api/v1/auth/send-otp": "generate",
    "/api/v1/auth/verify-otp": "verify",
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reader = PrometheusMetricReader(disable_target_info=True, registry=self.registry)
        self.provider = MeterProvider(metric_readers=[self.reader])
        meter = self.provider.get_meter("otp-server")
        self.requests = meter.create_counter("http_requests", description="Total number of HTTP requests")
        self.duration = meter.create_histogram(
            "http_request_duration_seconds",
            unit="s",
            description="HTTP request duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.otp_operations = meter.create_counter(
            "otp_operations", description="Total number of OTP operations"
        )
        self.rate_limited = meter.create_counter(
            "rate_limit_exceeded", description="Total number of rate limit violations"
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self.provider.shutdown()


class MetricsMiddleware:
    """Counts every response by method, route template and status (outermost layer)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
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
        self.metrics.requests.add(1, {"method": method, "path": path, "status_code": str(status)})
        self.metrics.duration.record(elapsed, {"method": method, "path": path})
        operation = _OTP_OPERATIONS.get(path)
        if operation and status != 429:
            self.metrics.otp_operations.add(1, {"operation": operation, "success": str(status < 400).lower()})
        limited = scope.get("state", {}).get(RATE_LIMITED)
        if limited:
            self.metrics.rate_limited.add(1, {"endpoint_type": limited})
