"""Metrics through the OpenTelemetry SDK, exposed in Prometheus text by its exporter.

``Telemetry`` is the production ``Counters`` adapter and also holds the HTTP layer's
instruments. Each Core owns its registry, so several in one process (tests) never mix counts.
"""

from __future__ import annotations

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Counter
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

# Seconds: the SDK's default buckets are sized for milliseconds.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Counters the domain and adapters add to, by name (exported with a "_total" suffix).
DESCRIPTIONS = {
    "http_requests": "Total number of HTTP requests",
    "otp_operations": "Total number of OTP operations",
    "rate_limit_exceeded": "Total number of rate limit violations",
    "otp_sent": "Codes sent, by country (test numbers tagged)",
    "otp_verified": "Codes verified, by country",
    "otp_deliveries": "Code deliveries to the SMS sender, by result",
    "user_cache": "User cache lookups, by layer and result",
}


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reader = PrometheusMetricReader(disable_target_info=True, registry=self.registry)
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.meter = self.provider.get_meter("otp-server")
        self._counters: dict[str, Counter] = {}
        self.duration = self.meter.create_histogram(
            "http_request_duration_seconds",
            unit="s",
            description="HTTP request duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )

    def add(self, name: str, /, **labels: str) -> None:
        counter = self._counters.get(name)
        if counter is None:
            counter = self.meter.create_counter(name, description=DESCRIPTIONS.get(name, name))
            self._counters[name] = counter
        counter.add(1, labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self.provider.shutdown()
