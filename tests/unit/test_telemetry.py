"""The OpenTelemetry metrics adapter: counters as Prometheus counters, the duration histogram."""

from __future__ import annotations

import re

from otpcore.telemetry import Telemetry


def samples(telemetry: Telemetry, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Sample values of ``name`` by label set (OTel's scope labels left out)."""
    found = {}
    for labels, value in re.findall(rf"^{name}\{{(.*)\}} (\S+)$", telemetry.render().decode(), re.M):
        pairs = re.findall(r'(\w+)="([^"]*)"', labels)
        found[frozenset((k, v) for k, v in pairs if not k.startswith("otel_"))] = float(value)
    return found


def test_counts_are_prometheus_counters_by_label_set() -> None:
    telemetry = Telemetry()
    assert b"otp_sent_total" not in telemetry.render()
    telemetry.add("otp_sent", country="US", test_number="false")
    telemetry.add("otp_sent", test_number="false", country="US")  # label order does not matter
    telemetry.add("otp_sent", country="GB", test_number="true")
    text = telemetry.render().decode()
    assert "# TYPE otp_sent_total counter" in text
    assert "# HELP otp_sent_total Codes sent, by country (test numbers tagged)" in text
    assert samples(telemetry, "otp_sent_total") == {
        frozenset({("country", "US"), ("test_number", "false")}): 2.0,
        frozenset({("country", "GB"), ("test_number", "true")}): 1.0,
    }
    telemetry.add("otp_sent", country="US", test_number="false")
    assert samples(telemetry, "otp_sent_total")[frozenset({("country", "US"), ("test_number", "false")})] == 3


def test_registries_of_two_instances_do_not_mix() -> None:
    one, two = Telemetry(), Telemetry()
    one.add("user_cache", layer="l1", result="hit")
    assert samples(two, "user_cache_total") == {}
    assert samples(one, "user_cache_total") == {frozenset({("layer", "l1"), ("result", "hit")}): 1.0}


def test_duration_histogram_in_seconds() -> None:
    telemetry = Telemetry()
    telemetry.duration.record(0.003, "GET", "/health")
    telemetry.duration.record(0.2, "GET", "/health")
    text = telemetry.render().decode()
    assert "# TYPE http_request_duration_seconds histogram" in text
    assert "# HELP http_request_duration_seconds HTTP request duration" in text
    assert "_created" not in text
    health = frozenset({("method", "GET"), ("path", "/health")})
    assert samples(telemetry, "http_request_duration_seconds_count")[health] == 2
    assert samples(telemetry, "http_request_duration_seconds_sum")[health] == 0.203
    buckets = {
        dict(labels)["le"]: value
        for labels, value in samples(telemetry, "http_request_duration_seconds_bucket").items()
    }
    assert buckets["0.001"] == 0 and buckets["0.005"] == 1 and buckets["0.25"] == 2 and buckets["+Inf"] == 2
