"""Rules about the repository itself: import direction, documented configuration."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from otpcore import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    """otpcore.domain imports no adapter, framework, driver or wiring; layers point inward."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_setting_is_documented() -> None:
    example = (ROOT / "config.env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    for field in Settings.__struct_fields__:
        name = field.upper()
        assert f"{name}=" in example, f"{name} missing from config.env.example"
        assert f"`{name}`" in readme, f"{name} missing from the README's configuration table"


def test_every_test_the_security_table_names_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Security", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_\w+)`", table))
    defined = {
        m
        for path in (ROOT / "tests").rglob("test_*.py")
        for m in re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M)
    }
    assert named, "the Security table names no test"
    assert named <= defined, f"named but missing: {sorted(named - defined)}"
