"""The event stream end to end: a consumer group that was down gets every event of 200 logins."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from tests.e2e.conftest import REDIS_URL, VENV_BIN, Server
from tests.e2e.test_production_mode import GENEROUS_LIMITS, sign_in
from tests.integration.test_webhook_sender import SECRET, Receiver, verify_standard_webhook

pytestmark = pytest.mark.e2e
LOGINS = 200
SHAPE = ["event_id", "event_type", "timestamp", "data"]
PER_LOGIN = {"otp:generated", "otp:verified", "user:created", "user:authenticated"}


class Tail:
    """``otp-server events tail --group NAME`` as a subprocess, its stdout lines collected."""

    def __init__(self, workdir: Path, env: dict[str, str], group: str) -> None:
        self.lines: list[str] = []
        self.stderr = (workdir / f"tail-{group}.log").open("ab")
        self.process = subprocess.Popen(
            [str(VENV_BIN / "otp-server"), "events", "tail", "--group", group],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._reader.join(5)
        self.stderr.close()
        return code


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def group_names(client: redis.Redis, stream: str) -> set[str]:
    try:
        return {g["name"].decode() for g in client.xinfo_groups(stream)}
    except redis.ResponseError:  # no stream yet
        return set()


def digit_run(code: str) -> re.Pattern[str]:
    """``code`` as a whole run of digits, not part of a longer number."""
    return re.compile(rf"(?<!\d){re.escape(code)}(?!\d)")


def test_a_consumer_that_was_down_gets_every_event_of_200_logins(
    workdir: Path, production_env: dict[str, str]
) -> None:
    env = {**production_env, **GENEROUS_LIMITS}
    stream = f"{production_env['OTP_REDIS_KEY_PREFIX']}:{{events}}"
    client = redis.Redis.from_url(REDIS_URL)
    server = Server(workdir, "events-server", env)
    try:
        # The consumer group comes first; then its consumer goes down.
        first = Tail(workdir, env, "audit")
        wait_until(lambda: "audit" in group_names(client, stream), 15, "the consumer group")
        assert first.stop() == 0
        assert first.lines == []

        phones = [f"+1415555{3000 + i:04d}" for i in range(LOGINS)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            logins = dict(zip(phones, pool.map(lambda phone: sign_in(server, phone), phones), strict=True))

        # Back up: everything published while it was down, through the group.
        second = Tail(workdir, env, "audit")
        wait_until(lambda: len(second.lines) >= LOGINS * len(PER_LOGIN), 60, "every event")
        time.sleep(0.5)  # anything beyond the expected events would show up now
        assert second.stop() == 0
        assert client.xpending(stream, "audit")["pending"] == 0, "printed events are acknowledged"
    finally:
        server.stop()
        client.close()

    events = [json.loads(line) for line in second.lines]
    for event in events:
        assert list(event) == SHAPE
        assert isinstance(event["event_id"], str) and isinstance(event["data"], dict)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)", event["timestamp"])
    assert len({e["event_id"] for e in events}) == len(events)
    assert Counter(e["event_type"] for e in events) == {t: LOGINS for t in PER_LOGIN}
    by_phone: dict[str, list[dict]] = {}
    for event in events:
        by_phone.setdefault(event["data"]["phone_number"], []).append(event)
    for phone, login in logins.items():
        mine = by_phone[phone]
        assert {e["event_type"] for e in mine} == PER_LOGIN
        assert {e["data"]["user_id"] for e in mine if "user_id" in e["data"]} == {login["user"]["id"]}

    # No code and no token anywhere: not in an event, not in a line of the server's log.
    codes = {login["code"] for login in logins.values()}
    tokens = [login[k] for login in logins.values() for k in ("token", "refresh_token")]
    assert len(codes) > LOGINS // 2 and all(len(t) >= 32 for t in tokens)
    for line, event in zip(second.lines, events, strict=True):
        assert not any(token in line for token in tokens)
        leaves = [str(v) for v in event["data"].values()]
        assert not codes.intersection(leaves)
        own_code = logins[event["data"]["phone_number"]]["code"]
        assert not digit_run(own_code).search(json.dumps(event["data"])), event
    log_lines = server.log.read_text().splitlines()
    assert sum("OTP for " in line for line in log_lines) == LOGINS
    for line in log_lines:
        if "OTP for " in line:  # the console sender: the one place a code is printed
            continue
        try:
            record = json.loads(line)
            text = json.dumps({k: v for k, v in record.items() if k not in {"time", "request_id"}})
        except ValueError:
            text = line
        assert not any(token in text for token in tokens), line
        assert not any(digit_run(code).search(text) for code in codes), line


def test_the_server_forwards_its_events_to_the_events_webhook(
    workdir: Path, production_env: dict[str, str]
) -> None:
    receiver = Receiver([200])
    env = {**production_env, "EVENTS_WEBHOOK_URL": receiver.url, "EVENTS_WEBHOOK_SECRET": SECRET}
    server = Server(workdir, "forwarding-server", env)
    try:
        login = sign_in(server, "+14155554000")
        wait_until(lambda: len(receiver.requests) >= len(PER_LOGIN), 15, "the forwarded events")
    finally:
        server.stop()
        receiver.close()
    posted = [json.loads(body) for _, body, *_ in receiver.requests]
    assert all(verify_standard_webhook(headers, body) for headers, body, *_ in receiver.requests)
    assert {e["event_type"] for e in posted} == PER_LOGIN and all(list(e) == SHAPE for e in posted)
    assert not any(login["refresh_token"] in body.decode() for _, body, *_ in receiver.requests)
    log = server.log.read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log
