"""Real ``otp-server serve`` processes on 127.0.0.1, their logs in files the tests can read.

``mode`` runs a test in both deployments: "embedded" (SQLite + memory) and "production"
(a PostgreSQL database and a Redis key prefix of the test's own).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.backends.postgres import create_test_database, drop_test_database

VENV_BIN = Path(sys.executable).parent
REDIS_URL = os.environ.get("OTP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, workdir: Path, name: str, env: dict[str, str], workers: int = 1) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        self.env = env
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(
            [str(VENV_BIN / "otp-server"), "serve", "--port", str(self.port), "--workers", str(workers)],
            cwd=workdir,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "LOG_FORMAT": "json", **env},
        )
        self._wait_ready()

    def code_for(self, phone: str, logs: list[Path] | None = None) -> str:
        """The last code the console sender logged for ``phone`` (in this or the given logs)."""
        deadline = time.monotonic() + 5
        needle = f"OTP for {phone}: "
        while time.monotonic() < deadline:
            lines = [
                line
                for log in (logs or [self.log])
                for line in log.read_text().splitlines()
                if needle in line
            ]
            if lines:
                return lines[-1].split(needle, 1)[1].split()[0].strip('",')
            time.sleep(0.05)
        raise AssertionError(f"no code logged for {phone}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"otp-server exited:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"otp-server did not come up:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log_file.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory like a checkout's root: `.venv/bin/otp-server` works from it."""
    (tmp_path / ".venv").symlink_to(VENV_BIN.parent)
    return tmp_path


@pytest.fixture
def production_env() -> Iterator[dict[str, str]]:
    """DATABASE_URL and REDIS_URL of a database and key prefix made for this test alone."""
    dsn = create_test_database()
    prefix = f"otptest-{uuid.uuid4().hex[:12]}"
    try:
        yield {
            "DATABASE_URL": dsn,
            "REDIS_URL": REDIS_URL,
            "OTP_REDIS_KEY_PREFIX": prefix,
            "EVENTS_REDIS_CHANNEL": "events",
            "JWT_SECRET": "e2e-secret-" + "x" * 32,
        }
    finally:
        drop_test_database(dsn)
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()


@pytest.fixture(params=["embedded", "production"])
def mode_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "embedded":
        return {"DATABASE_URL": "", "REDIS_URL": "", "REDIS_HOST": ""}
    env: dict[str, str] = request.getfixturevalue("production_env")
    return env


@pytest.fixture
def server(workdir: Path, mode_env: dict[str, str]) -> Iterator[Server]:
    started = Server(workdir, "otp-server", mode_env)
    yield started
    started.stop()


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]):
    """Print past pytest's capture: fault tests put their counts in the CI log."""

    def say(line: str) -> None:
        with capsys.disabled():
            print(f"\n  [fault report] {line}")

    return say
