"""Metrics through the OpenTelemetry SDK, exposed in Prometheus text by its exporter (the
request-duration histogram, recorded on every request, is kept beside it: see ``Histogram``).

``Telemetry`` is the production ``Counters`` adapter and also holds the HTTP layer's
instruments. Each Core owns its registry, so several in one process (tests) never mix counts.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric

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
        self.duration = Histogram("http_request_duration_seconds", "HTTP request duration", DURATION_BUCKETS)
        self.registry.register(self.duration)

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


def _observe(counts: dict[Labels, int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        # list() copies in one step, so a count added meanwhile cannot break the iteration.
        return [Observation(total, dict(labels)) for labels, total in list(counts.items())]

    return observe


class Histogram:
    """A histogram kept as bucket counts per label set, rendered by prometheus_client as the
    SDK's would be (with the same scope labels).

    The SDK's synchronous histogram costs ~15 µs per record (a measurement object, label
    validation and hashing, locks) on every request; this is a bisect and three additions.
    """

    _SCOPE = {"otel_scope_name": "otp-server", "otel_scope_schema_url": "", "otel_scope_version": ""}

    def __init__(self, name: str, description: str, bounds: Iterable[float]) -> None:
        self.name = name
        self.description = description
        self.bounds = tuple(bounds)
        # Label set -> [count per bucket (the last one past every bound)..., sum].
        self._series: dict[Labels, list[float]] = {}

    def record(self, value: float, attributes: Mapping[str, str]) -> None:
        labels = tuple(sorted(attributes.items()))
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0.0] * (len(self.bounds) + 2)
        series[bisect.bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def collect(self) -> Iterator[Metric]:
        family: HistogramMetricFamily | None = None
        for labels, series in list(self._series.items()):
            names = dict(labels) | self._SCOPE
            if family is None:
                family = HistogramMetricFamily(self.name, self.description, labels=sorted(names))
            cumulative, buckets = 0.0, []
            for bound, count in zip((*map(repr, self.bounds), "+Inf"), series[:-1], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([names[name] for name in sorted(names)], buckets, series[-1])
        if family is not None:
            yield family
