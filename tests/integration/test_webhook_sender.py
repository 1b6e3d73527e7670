"""The webhook SMS sender against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from otp_http import create_app
from otpcore import Settings, build_core

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Receiver:
    """Answers each POST with the next status of ``script`` (the last one repeats)."""

    def __init__(self, script: list[int], first_delay: float = 0.0) -> None:
        self.script = script
        self.first_delay = first_delay
        self.requests: list[tuple[dict[str, str], bytes, float, float]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                started = time.monotonic()
                body = self.rfile.read(int(self.headers["content-length"]))
                n = len(receiver.requests)
                if n == 0 and receiver.first_delay:
                    time.sleep(receiver.first_delay)
                status = receiver.script[min(n, len(receiver.script) - 1)]
                receiver.requests.append(
                    ({k.lower(): v for k, v in self.headers.items()}, body, started, time.monotonic())
                )
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/sms"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator:
    made: list[Receiver] = []

    def make(script: list[int], first_delay: float = 0.0) -> Receiver:
        made.append(Receiver(script, first_delay))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def verify_standard_webhook(headers: dict[str, str], body: bytes) -> bool:
    """The receiving side of the Standard Webhooks spec, written from the spec."""
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{body.decode()}".encode()
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = [s.split(",", 1)[1] for s in headers["webhook-signature"].split() if s.startswith("v1,")]
    return any(hmac.compare_digest(expected, s) for s in offered)


def settings_for(url: str, **extra: object) -> Settings:
    return Settings(
        db_provider="memory",
        otp_sender="webhook",
        sms_webhook_url=url,
        sms_webhook_secret=SECRET,
        jwt_secret="w" * 40,
        **extra,  # type: ignore[arg-type]
    )


async def test_retries_until_delivered_and_the_response_does_not_wait(receiver_factory) -> None:
    receiver = receiver_factory([500, 503, 200], first_delay=1.0)
    core = build_core(settings_for(receiver.url, otp_expiry=30))
    app = create_app(core)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://otp") as client:
        response = await client.post("/api/v1/auth/send-otp", json={"phone_number": "+14155550123"})
        answered = time.monotonic()
        assert response.status_code == 200
        deadline = time.monotonic() + 20
        while len(receiver.requests) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    await core.aclose()

    assert len(receiver.requests) == 3
    first_started, first_finished = receiver.requests[0][2], receiver.requests[0][3]
    assert answered < first_finished, "send-otp waited for the SMS provider"
    assert first_started - 1 < answered
    headers, body, _, _ = receiver.requests[2]
    assert verify_standard_webhook(headers, body)
    assert {h["webhook-id"] for h, *_ in receiver.requests} == {headers["webhook-id"]}
    payload = json.loads(body)
    assert payload["phone_number"] == "+14155550123"
    code = next(c for c in payload["message"].split() if c.rstrip(".").isdigit()).rstrip(".")
    assert len(code) == 6
    assert not any(e.event_type == "otp:delivery_failed" for e in core.events.events)


async def test_a_receiver_that_always_fails_gives_delivery_failed(receiver_factory) -> None:
    receiver = receiver_factory([500])
    core = build_core(settings_for(receiver.url, otp_expiry=2))
    await core.auth.send_code("+14155550123")
    await asyncio.wait_for(core.auth.drain(), 10)
    metrics = core.telemetry.render().decode()
    await core.aclose()
    failed = [e for e in core.events.events if e.event_type == "otp:delivery_failed"]
    assert len(failed) == 1 and failed[0].data["phone_number"] == "+14155550123"
    assert re.search(r'otp_deliveries_total\{[^}]*result="failed"[^}]*\} 1\.0', metrics), metrics
    assert len(receiver.requests) >= 2
    for event in core.events.events:
        assert "message" not in event.data


async def test_a_permanent_refusal_is_not_retried(receiver_factory) -> None:
    receiver = receiver_factory([400])
    core = build_core(settings_for(receiver.url, otp_expiry=30))
    await core.auth.send_code("+14155550123")
    await asyncio.wait_for(core.auth.drain(), 10)
    await core.aclose()
    assert len(receiver.requests) == 1
    assert any(e.event_type == "otp:delivery_failed" for e in core.events.events)


def test_webhook_settings_are_checked() -> None:
    from otpcore import SettingsError

    with pytest.raises(SettingsError, match="SMS_WEBHOOK_URL"):
        Settings(otp_sender="webhook", sms_webhook_secret=SECRET)
    with pytest.raises(SettingsError, match="SMS_WEBHOOK_SECRET"):
        Settings(otp_sender="webhook", sms_webhook_url="https://sms.example/hook", sms_webhook_secret="nope")
    production = Settings(
        environment="production",
        jwt_secret="p" * 40,
        otp_sender="webhook",
        sms_webhook_url="https://sms.example/hook",
        sms_webhook_secret=SECRET,
    )
    assert production.is_production
