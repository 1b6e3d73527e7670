"""A real ``otp-server serve`` process on 127.0.0.1, its log in a file the tests can read."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, workdir: Path, port: int, process: subprocess.Popen[bytes]) -> None:
        self.workdir = workdir
        self.port = port
        self.process = process
        self.base = f"http://127.0.0.1:{port}"
        self.log = workdir / "otp-server.log"

    def code_for(self, phone: str) -> str:
        """The last code the console sender logged for ``phone``."""
        deadline = time.monotonic() + 5
        needle = f"OTP for {phone}: "
        while time.monotonic() < deadline:
            lines = [line for line in self.log.read_text().splitlines() if needle in line]
            if lines:
                return lines[-1].split(needle, 1)[1].split()[0].strip('",')
            time.sleep(0.05)
        raise AssertionError(f"no code logged for {phone}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    yield from start_server(tmp_path)


def start_server(workdir: Path, **env: str) -> Iterator[Server]:
    port = free_port()
    (workdir / ".venv").symlink_to(VENV_BIN.parent)
    log = (workdir / "otp-server.log").open("wb")
    process = subprocess.Popen(
        [str(VENV_BIN / "otp-server"), "serve", "--port", str(port)],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "LOG_FORMAT": "json", **env},
    )
    server = Server(workdir, port, process)
    try:
        _wait_ready(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"otp-server exited:\n{server.log.read_text()}")
        try:
            if httpx.get(f"{server.base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"otp-server did not come up:\n{server.log.read_text()}")
