"""PreparedStatement (adapters/pg_prepared.py) against a real Postgres: the sign-ins' path to libpq."""

from __future__ import annotations

import gc
from datetime import UTC, datetime

import psycopg
import pytest

from otpcore.adapters.pg_prepared import PreparedStatement
from otpcore.adapters.postgres import PostgresDatabase

ECHO = PreparedStatement(
    "otp_test_echo",
    "SELECT %(text)s::text AS text, %(blob)s::bytea AS blob, %(at)s::timestamptz AS at,"
    " %(n)s::bigint AS n, %(text)s::text = 'a''b' AS again, %(none)s::text AS none",
)
PARAMS = {
    "text": "a'b",
    "blob": b"\x00\xff\\x",
    "at": datetime(2026, 1, 2, 3, 4, 5, 6, UTC),
    "n": 2**40,
    "none": None,
}


async def test_values_go_and_come_back_as_psycopg_reads_them(pg_database: PostgresDatabase) -> None:
    async with pg_database.connection() as conn:
        row = await ECHO.fetchone(conn, PARAMS)
        by_cursor = await (await conn.execute(ECHO.sql, PARAMS)).fetchone()
    assert row == by_cursor
    assert row == {**PARAMS, "again": True}


async def test_later_runs_on_a_connection_read_their_own_values(pg_database: PostgresDatabase) -> None:
    # The column names are kept between runs on a connection; nothing of one run's values may stick.
    others = [
        {"text": None, "blob": b"", "at": datetime(1999, 12, 31, 23, 59, tzinfo=UTC), "n": 7, "none": "x"},
        {"text": "é" * 300, "blob": bytes(range(256)), "at": PARAMS["at"], "n": -(2**62), "none": None},
    ]
    async with pg_database.connection() as conn:
        await ECHO.fetchone(conn, PARAMS)
        for params in others:
            row = await ECHO.fetchone(conn, params)
            assert row == await (await conn.execute(ECHO.sql, params)).fetchone()
            assert row == {**params, "again": params["text"] == "a'b" if params["text"] else None}


async def test_fetchall_reads_every_row_and_none_is_an_empty_list(pg_database: PostgresDatabase) -> None:
    series = PreparedStatement(
        "otp_test_series", "SELECT g AS n, g::text AS t FROM generate_series(1, %(last)s::int) g"
    )
    async with pg_database.connection() as conn:
        assert await series.fetchall(conn, {"last": 3}) == [{"n": n, "t": str(n)} for n in (1, 2, 3)]
        assert await series.fetchall(conn, {"last": 0}) == []
        assert await series.fetchone(conn, {"last": 2}) == {"n": 1, "t": "1"}


async def test_a_connection_closed_is_forgotten(pg_dsn: str) -> None:
    statement = PreparedStatement("otp_test_forgotten", "SELECT %(n)s::int AS n")
    conn = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
    assert await statement.fetchone(conn, {"n": 1}) == {"n": 1}
    assert len(statement._prepared) == 1
    await conn.close()
    del conn
    gc.collect()
    assert len(statement._prepared) == 0  # nothing it kept holds the connection


async def test_columns_are_read_anew_after_a_new_preparation(pg_database: PostgresDatabase) -> None:
    async with pg_database.connection() as conn:
        await conn.execute("CREATE TEMP TABLE otp_test_cols (a int)")
        await conn.execute("INSERT INTO otp_test_cols VALUES (1)")
        statement = PreparedStatement("otp_test_cols", "SELECT * FROM otp_test_cols WHERE a = %(a)s::int")
        try:
            assert await statement.fetchone(conn, {"a": 1}) == {"a": 1}
            await conn.execute("DEALLOCATE ALL")
            await conn.execute("ALTER TABLE otp_test_cols ADD COLUMN b text DEFAULT 'x'")
            assert await statement.fetchone(conn, {"a": 1}) == {"a": 1, "b": "x"}
        finally:
            await conn.execute("DROP TABLE otp_test_cols")


async def test_a_statement_gone_from_the_connection_is_prepared_again(pg_database: PostgresDatabase) -> None:
    async with pg_database.connection() as conn:
        await ECHO.fetchone(conn, PARAMS)
        await conn.execute("DEALLOCATE ALL")
        assert (await ECHO.fetchone(conn, PARAMS)) == {**PARAMS, "again": True}


async def test_another_instance_of_the_same_statement_shares_the_name(pg_database: PostgresDatabase) -> None:
    twin = PreparedStatement("otp_test_echo", ECHO.sql)
    async with pg_database.connection() as conn:
        await ECHO.fetchone(conn, PARAMS)
        assert (await twin.fetchone(conn, PARAMS)) == {**PARAMS, "again": True}


async def test_a_statement_of_the_same_name_with_other_sql_runs_its_own(
    pg_database: PostgresDatabase,
) -> None:
    other = PreparedStatement("otp_test_echo", "SELECT 'other' AS text")
    async with pg_database.connection() as conn:
        await ECHO.fetchone(conn, PARAMS)
        assert (await other.fetchone(conn, {})) == {"text": "other"}


async def test_bytes_arrive_whole_whatever_the_string_settings(pg_database: PostgresDatabase) -> None:
    async with pg_database.connection() as conn:
        await conn.execute("SET standard_conforming_strings = off")
        try:
            assert (await ECHO.fetchone(conn, PARAMS)) == {**PARAMS, "again": True}
        finally:
            await conn.execute("RESET standard_conforming_strings")


async def test_no_row_is_none_and_errors_are_psycopg_errors(pg_database: PostgresDatabase) -> None:
    nothing = PreparedStatement("otp_test_nothing", "SELECT 1 AS one WHERE %(x)s::int > 1")
    failing = PreparedStatement("otp_test_failing", "SELECT 1 / %(x)s::int AS quotient")
    async with pg_database.connection() as conn:
        assert await nothing.fetchone(conn, {"x": 0}) is None
        with pytest.raises(psycopg.errors.DivisionByZero):
            await failing.fetchone(conn, {"x": 0})
        assert await failing.fetchone(conn, {"x": 1}) == {"quotient": 1}  # the connection still works


def test_only_named_placeholders_are_taken() -> None:
    assert PreparedStatement("otp_test_numbered", "SELECT %(a)s, %(b)s, %(a)s").query == b"SELECT $1, $2, $1"
    with pytest.raises(ValueError, match="placeholders"):
        PreparedStatement("otp_test_positional", "SELECT %s")
