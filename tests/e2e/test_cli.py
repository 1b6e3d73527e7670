"""The ``otp-server`` command as an operator uses it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import VENV_BIN

pytestmark = pytest.mark.e2e


def otp_server(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "otp-server"), *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_serve_refuses_several_workers_without_redis(tmp_path: Path) -> None:
    result = otp_server("serve", "--workers", "2", cwd=tmp_path, REDIS_URL="", REDIS_HOST="")
    assert result.returncode != 0
    assert "needs REDIS_URL" in result.stderr and "per process" in result.stderr


def test_production_refuses_insecure_settings_and_says_why(tmp_path: Path) -> None:
    result = otp_server("serve", cwd=tmp_path, ENVIRONMENT="production", JWT_SECRET="short")
    assert result.returncode != 0
    assert "JWT_SECRET" in result.stderr and "32 bytes" in result.stderr
    assert "console" in result.stderr


def test_migrate_applies_each_file_once(tmp_path: Path) -> None:
    first = otp_server("migrate", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "applied 1 migration(s): 0001_" in first.stdout
    second = otp_server("migrate", cwd=tmp_path)
    assert second.returncode == 0 and "applied 0 migration(s)" in second.stdout
    assert (tmp_path / "otp-server.db").exists()


def test_set_role_grants_admin_and_refuses_bad_numbers(tmp_path: Path) -> None:
    granted = otp_server("users", "set-role", "+1 415 555 0123", "admin", cwd=tmp_path)
    assert granted.returncode == 0, granted.stderr
    assert granted.stdout.strip() == "user 1 (+14155550123) is now admin"
    refused = otp_server("users", "set-role", "not-a-number", "admin", cwd=tmp_path)
    assert refused.returncode != 0 and "phone number" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_openapi_lists_every_endpoint(tmp_path: Path) -> None:
    result = otp_server("openapi", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["openapi"].startswith("3.1")
    for path in (
        "/api/v1/auth/send-otp",
        "/api/v1/auth/verify-otp",
        "/api/v1/auth/refresh",
        "/api/v1/auth/logout",
        "/api/v1/users/search",
        "/api/v1/users/profile",
        "/api/v1/users/{user_id}",
        "/health",
        "/health/ready",
        "/metrics",
        "/.well-known/jwks.json",
    ):
        assert path in document["paths"], path
