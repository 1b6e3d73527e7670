"""Queued SMS outlive the server process that accepted them (OTP_SENDER=webhook with Redis)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import redis

from tests.e2e.conftest import REDIS_URL, Server, free_port
from tests.integration.test_webhook_sender import SECRET, verify_standard_webhook

PHONE = "+14155550123"


class LateReceiver:
    """An SMS provider bridge on a fixed port, which is down until ``up()``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/sms"
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.server: ThreadingHTTPServer | None = None

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def test_a_queued_sms_survives_a_killed_server(workdir: Path, production_env: dict[str, str]) -> None:
    receiver = LateReceiver()
    env = {
        **production_env,
        "OTP_SENDER": "webhook",
        "SMS_WEBHOOK_URL": receiver.url,
        "SMS_WEBHOOK_SECRET": SECRET,
    }
    first = Server(workdir, "first", env)
    try:
        response = httpx.post(f"{first.base}/api/v1/auth/send-otp", json={"phone_number": PHONE}, timeout=5)
        assert response.status_code == 200, response.text
    finally:
        first.process.kill()  # SIGKILL: no shutdown, nothing flushed or acknowledged
        first.process.wait()
        first.stop()

    client = redis.Redis.from_url(REDIS_URL)
    try:
        stream = f"{production_env['OTP_REDIS_KEY_PREFIX']}:{{deliveries}}"
        assert client.xlen(stream) == 1, "the job was stored before send-otp answered"
    finally:
        client.close()

    second = Server(workdir, "second", env)
    try:
        receiver.up()
        deadline = time.monotonic() + 40  # the job is taken over once idle (10 s) at the dead process
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        second.stop()
        receiver.close()

    assert len(receiver.requests) == 1, (first.log.read_text(), second.log.read_text())
    headers, body = receiver.requests[0]
    assert verify_standard_webhook(headers, body)
    payload = json.loads(body)
    assert payload["phone_number"] == PHONE
    assert any(word.strip(".").isdigit() for word in payload["message"].split())
