"""Postgres for the tests: one throwaway database per test session, emptied before each test.

Tests only ever touch databases they created here (named ``otp_test_<hex>``). The server is the
one at ``OTP_TEST_POSTGRES_URL`` (default: the local trust-auth ``postgres`` user), whose
database in the URL is used only to create and drop the test databases.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from otpcore.adapters.postgres import PostgresDatabase

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PREFIX = "otp_test_"


def admin_url() -> str:
    return os.environ.get("OTP_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL)


def _with_database(url: str, name: str) -> str:
    return urlsplit(url)._replace(path=f"/{name}").geturl()


def create_test_database() -> str:
    """Create an empty database of its own on the test server; returns its URL."""
    name = f"{PREFIX}{secrets.token_hex(6)}"
    with psycopg.connect(admin_url(), autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _with_database(admin_url(), name)


def drop_test_database(dsn: str) -> None:
    """Drop a database made by ``create_test_database``, disconnecting whoever still uses it."""
    name = urlsplit(dsn).path.lstrip("/")
    if not name.startswith(PREFIX):
        raise ValueError(f"refusing to drop {name!r}: not a test database")
    with psycopg.connect(admin_url(), autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    dsn = create_test_database()
    try:
        yield dsn
    finally:
        drop_test_database(dsn)


@pytest.fixture
async def pg_database(pg_dsn: str) -> AsyncIterator[PostgresDatabase]:
    """A migrated, empty database for one test."""
    db = PostgresDatabase(pg_dsn)
    try:
        async with db.connection() as conn:
            await conn.execute("TRUNCATE users, sessions, refresh_tokens RESTART IDENTITY CASCADE")
        yield db
    finally:
        await db.close()
