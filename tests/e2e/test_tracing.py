"""Traces: with OTEL_TRACES_EXPORTER=console a real server emits HTTP, Redis and Postgres spans."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e


def spans_in(log: str) -> list[dict]:
    """The console exporter prints each span as an indented JSON object."""
    decoder, spans, i = json.JSONDecoder(), [], 0
    while (i := log.find('{\n    "name"', i)) != -1:
        span, end = decoder.raw_decode(log, i)
        spans.append(span)
        i = end
    return spans


def test_spans_cover_http_redis_and_postgres(workdir: Path, production_env: dict[str, str]) -> None:
    server = Server(workdir, "traced", {**production_env, "OTEL_TRACES_EXPORTER": "console"})
    try:
        phone = "+14155550177"
        assert (
            httpx.post(f"{server.base}/api/v1/auth/send-otp", json={"phone_number": phone}).status_code == 200
        )
        body = {"phone_number": phone, "otp_code": server.code_for(phone)}
        assert httpx.post(f"{server.base}/api/v1/auth/verify-otp", json=body).status_code == 200
        # Again, now that the user exists: the sign-in goes through the group commit.
        assert (
            httpx.post(f"{server.base}/api/v1/auth/send-otp", json={"phone_number": phone}).status_code == 200
        )
        deadline = time.monotonic() + 5
        while server.log.read_text().count(f"OTP for {phone}: ") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        again = {"phone_number": phone, "otp_code": server.code_for(phone)}
        assert httpx.post(f"{server.base}/api/v1/auth/verify-otp", json=again).status_code == 200
    finally:
        server.stop()  # SIGTERM: the batch processor flushes on exit
    spans = spans_in(server.log.read_text())
    kinds = {span["kind"] for span in spans}
    assert "SpanKind.SERVER" in kinds
    systems = {
        span["attributes"].get("db.system") or span["attributes"].get("db.system.name") for span in spans
    }
    assert {"redis", "postgresql"} <= systems, systems
    # The sign-in runs outside psycopg's cursors (adapters/pg_prepared.py): it has its own span.
    assert any(
        span["name"] == "otp_sign_in" and span["attributes"].get("db.system") == "postgresql"
        for span in spans
    ), [span["name"] for span in spans]
    # Sign-ins first look for an existing user in a batch, outside the request's trace (the new
    # user's too, before otp_sign_in creates it): each batch's span links to its requests'.
    batches = [span for span in spans if span["name"] == "otp_sign_in_known"]
    server_traces = {span["context"]["trace_id"] for span in spans if span["kind"] == "SpanKind.SERVER"}
    linked = [{link["context"]["trace_id"] for link in batch["links"]} for batch in batches]
    assert len(batches) == 2 and all(len(traces) == 1 and traces <= server_traces for traces in linked)
    assert linked[0] != linked[1]
    assert not {batch["context"]["trace_id"] for batch in batches} & server_traces
    assert any(
        "send-otp" in span["name"]
        or span["attributes"].get("http.target") == "/api/v1/auth/send-otp"
        or "/api/v1/auth/send-otp" in json.dumps(span["attributes"])
        for span in spans
    )
    text = server.log.read_text()
    assert body["otp_code"] not in text.replace(f"OTP for {phone}: {body['otp_code']}", "")
