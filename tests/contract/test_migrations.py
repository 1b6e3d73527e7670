"""Migrations: found in order, applied once, safe when several instances start together."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from otpcore.adapters.migrations import migration_files
from otpcore.adapters.sqlite import apply_sqlite, connect

EXPECTED_TABLES = {"users", "sessions", "refresh_tokens", "schema_migrations"}


def _versions() -> list[str]:
    return [version for version, _ in migration_files("sqlite")]


def _state(path) -> tuple[list[str], set[str]]:
    conn = connect(str(path))
    try:
        recorded = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    return sorted(recorded), tables


def test_files_are_sorted_and_named():
    files = migration_files("sqlite")
    versions = [version for version, _ in files]
    assert versions == sorted(versions)
    assert versions[0] == "0001_users_and_sessions"
    assert all(sql.strip() for _, sql in files)


def test_unknown_dialect_is_an_error():
    with pytest.raises(FileNotFoundError):
        migration_files("no-such-dialect")


def test_applying_twice_applies_nothing_the_second_time(tmp_path):
    path = tmp_path / "db.sqlite3"
    conn = connect(str(path))
    try:
        assert apply_sqlite(conn) == _versions()
        assert apply_sqlite(conn) == []
    finally:
        conn.close()
    recorded, tables = _state(path)
    assert recorded == _versions()
    assert tables >= EXPECTED_TABLES


def test_concurrent_threads_migrate_one_file(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    start = threading.Barrier(4)
    applied: list[list[str]] = []
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            conn = connect(path)
            try:
                start.wait()
                applied.append(apply_sqlite(conn))
            finally:
                conn.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    # Exactly one instance applied the migrations; the others found them done.
    assert sorted(applied, key=len) == [[], [], [], _versions()]
    assert _state(path)[0] == _versions()


def test_concurrent_processes_migrate_one_file(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    script = (
        "import sys; from otpcore.adapters.sqlite import apply_sqlite, connect;"
        "print(len(apply_sqlite(connect(sys.argv[1]))))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, [err for _, err in results]
    assert sorted(int(out) for out, _ in results) == [0, 0, 0, len(_versions())]
    assert _state(path)[0] == _versions()
