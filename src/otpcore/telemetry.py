"""Metrics through the OpenTelemetry SDK, exposed in Prometheus text by its exporter; the
request duration histogram is read by the same Prometheus registry (see Durations).

``Telemetry`` is the production ``Counters`` adapter and also holds the HTTP layer's
instruments. Each Core owns its registry, so several in one process (tests) never mix counts.
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# Seconds, down to 1 ms: most answers here take a few milliseconds.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Their "le" labels as prometheus_client writes them, and +Inf's.
_BUCKET_LABELS = (*map(floatToGoString, DURATION_BUCKETS), "+Inf")

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

# A label set as a caller gave it; the same set in another order is the same series (see _observe).
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
        counts[tuple(labels.items())] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self.provider.shutdown()


class Durations:
    """The HTTP request duration histogram, counted here and read by the registry at a scrape.

    An OTel histogram record costs ~6 µs here (a measurement object, attribute checks, view
    matching, a lock); prometheus_client's own ~1 µs (a child lookup, two locked increments).
    A list of counts per label set costs half that (one bisect, two additions), and the
    registry reads the lists through ``collect`` when /metrics is rendered; the series are
    those prometheus_client's histogram writes, without OTel's scope labels.
    """

    NAME = "http_request_duration_seconds"

    def __init__(self, registry: CollectorRegistry) -> None:
        # Per (method, path): the count of each bucket (not cumulative), +Inf's, then the sum.
        self._series: dict[tuple[str, str], list[float]] = {}
        registry.register(self)

    def record(self, seconds: float, method: str, path: str) -> None:
        series = self._series.get((method, path))
        if series is None:
            series = self._series[method, path] = [0.0] * (len(DURATION_BUCKETS) + 2)
        # The first bucket whose bound is at least ``seconds`` (bounds are inclusive); +Inf past them.
        series[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        series[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.NAME, "HTTP request duration", labels=("method", "path"))
        for (method, path), series in list(self._series.items()):
            cumulative = itertools.accumulate(series[:-1])
            family.add_metric((method, path), list(zip(_BUCKET_LABELS, cumulative, strict=True)), series[-1])
        yield family


def _observe(counts: dict[Labels, int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        # Label sets are put in one order here, at a scrape, rather than at every add (sorting
        # was a third of an add). list() copies in one step, so an add meanwhile cannot break
        # the iteration.
        totals: defaultdict[Labels, int] = defaultdict(int)
        for labels, total in list(counts.items()):
            totals[tuple(sorted(labels))] += total
        return [Observation(total, dict(labels)) for labels, total in totals.items()]

    return observe
