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
    telemetry.duration.record(0.005, "GET", "/health")  # on a bound: counted in that bucket
    telemetry.duration.record(11.0, "GET", "/health")  # past every bound: +Inf only
    telemetry.duration.record(0.0001, "POST", "/api/v1/auth/send-otp")
    text = telemetry.render().decode()
    assert "# TYPE http_request_duration_seconds histogram" in text
    assert "# HELP http_request_duration_seconds HTTP request duration" in text
    assert "_created" not in text
    health = frozenset({("method", "GET"), ("path", "/health")})
    assert samples(telemetry, "http_request_duration_seconds_count")[health] == 4
    assert samples(telemetry, "http_request_duration_seconds_sum")[health] == 11.208
    buckets = {
        dict(labels)["le"]: value
        for labels, value in samples(telemetry, "http_request_duration_seconds_bucket").items()
        if ("path", "/health") in labels
    }
    assert len(buckets) == 14  # 13 bounds and +Inf, as prometheus_client's histogram writes them
    assert buckets["0.001"] == 0 and buckets["0.0025"] == 0 and buckets["0.005"] == 2
    assert buckets["0.25"] == 3 and buckets["10.0"] == 3 and buckets["+Inf"] == 4
    send = frozenset({("method", "POST"), ("path", "/api/v1/auth/send-otp")})
    assert samples(telemetry, "http_request_duration_seconds_count")[send] == 1
    assert samples(telemetry, "http_request_duration_seconds_bucket")[send | {("le", "0.001")}] == 1
