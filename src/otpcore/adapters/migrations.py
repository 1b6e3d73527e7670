"""Finding the SQL migration files; each dialect's adapter applies them (``apply_sqlite``, …).

Files live in ``<dir>/<dialect>/NNNN_description.sql`` and are applied in file-name order; the
version recorded for a file is its name without ``.sql``.
"""

from __future__ import annotations

import re
from pathlib import Path

_NAME = re.compile(r"^\d{4}_[a-z0-9_]+\.sql$")


def migrations_dir() -> Path:
    """The migrations packaged in the wheel, else those of the source checkout."""
    packaged = Path(__file__).resolve().parents[1] / "migrations"  # otpcore/migrations
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "migrations"  # <repo>/migrations


def migration_files(dialect: str) -> list[tuple[str, str]]:
    """(version, sql) of every migration of ``dialect``, sorted by file name."""
    folder = migrations_dir() / dialect
    if not folder.is_dir():
        raise FileNotFoundError(f"no migrations for {dialect!r} in {folder}")
    files = sorted(folder.glob("*.sql"))
    misnamed = [f.name for f in files if not _NAME.match(f.name)]
    if misnamed:
        # A misnamed file would sort unpredictably or never run; refuse rather than guess.
        raise ValueError(f"migration files must be named NNNN_description.sql: {misnamed}")
    return [(f.stem, f.read_text(encoding="utf-8")) for f in files]
