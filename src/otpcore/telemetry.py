"""Metrics through the OpenTelemetry SDK, exposed in Prometheus text by its exporter; the
request duration histogram goes straight into the same Prometheus registry (see Durations).

``Telemetry`` is the production ``Counters`` adapter and also holds the HTTP layer's
instruments. Each Core owns its registry, so several in one process (tests) never mix counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest

# No "_created" series beside the histogram's: the OTel exporter never wrote one (process-wide, and
# prometheus_client serves no other metric here).
disable_created_metrics()

# Seconds, down to 1 ms: most answers here take a few milliseconds.
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

# A label set in a canonical order, so one set is one series however the caller orders it.
Labels = tuple[tuple[str, str], ...]


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reader = PrometheusMetricReader(disable_target_info=True, registry=self.registry)
        # The Prometheus exporter drops exemplars: sampling them (on every traced request) is waste.
        self.provider = MeterProvider(metric_readers=[self.reader], exemplar_filter=AlwaysOffExemplarFilter())
        self.meter = self.provider.get_meter("otp-server")
        self._counts: dict[str, defaultdict[Labels, int]] = {}
        self.duration = Durations(self.registry)

    def add(self, name: str, /, **labels: str) -> None:
        # A synchronous OTel counter costs ~12 µs per add (it validates and hashes the labels each
        # time); a dict increment costs ~1 µs, and the SDK reads the totals through an observable
        # counter only when /metrics is rendered. The exported series are the same.
        counts = self._counts.get(name)
        if counts is None:
            counts = self._counts[name] = defaultdict(int)
            self.meter.create_observable_counter(
                name, callbacks=[_observe(counts)], description=DESCRIPTIONS.get(name, name)
            )
        counts[tuple(sorted(labels.items()))] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self.provider.shutdown()


class Durations:
    """The HTTP request duration histogram, straight in the Prometheus registry.

    An OTel histogram record costs ~6 µs here (a measurement object, attribute checks, view
    matching, a lock), about 3 % of a cached profile read; the SDK has no observable histogram
    to defer it to, as the counters do. prometheus_client's own histogram, with each label
    set's child kept, costs ~1 µs and exports the same series (without OTel's scope labels).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._histogram = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration",
            ["method", "path"],
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        self._children: dict[tuple[str, str], Histogram] = {}

    def record(self, seconds: float, method: str, path: str) -> None:
        child = self._children.get((method, path))
        if child is None:
            child = self._children[method, path] = self._histogram.labels(method, path)
        child.observe(seconds)


def _observe(counts: dict[Labels, int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        # list() copies in one step, so a count added meanwhile cannot break the iteration.
        return [Observation(total, dict(labels)) for labels, total in list(counts.items())]

    return observe
