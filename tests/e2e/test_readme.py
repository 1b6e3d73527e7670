"""The README's walk-through, run exactly as printed against a real ``otp-server serve``."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"


def walkthrough() -> str:
    text = README.read_text()
    match = re.search(r"<!-- walkthrough -->\s*```bash\n(.*?)```", text, re.S)
    assert match, "README.md has no walk-through block"
    return match.group(1)


def test_readme_opens_with_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S)
    assert first_block
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make run", "make test"]


def test_walkthrough_works_as_printed(server: Server) -> None:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", walkthrough()],
        cwd=server.workdir,
        env={**os.environ, **server.env, "BASE": server.base},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    sent = json.loads(lines[0])
    assert sent == {
        "message": "OTP sent successfully",
        "phone_number": "+14155550123",
        "expires_in": 120,
    }
    profile, renamed = json.loads(lines[1]), json.loads(lines[2])
    assert profile["name"] == "Ada" and profile["role"] == "user"
    assert renamed["name"] == "Ada Lovelace"
    assert lines[3] == "user 1 (+14155550123) is now admin"
    found = json.loads(lines[4])
    assert found["total"] == 1 and found["users"][0]["name"] == "Ada Lovelace"
    assert lines[5] == "204"
    assert json.loads(lines[6])["error"] == "invalid_token"
    assert "Traceback" not in server.log.read_text()
