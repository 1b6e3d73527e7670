"""A statement through libpq directly: the sign-ins, the request path's statements.

psycopg's cursor path costs ~50 µs of client CPU per statement here on top of libpq (a cursor
with its own transformer, query conversion, prepare bookkeeping, result objects), about a tenth
of a sign-in's worker time. ``PreparedStatement`` prepares its SQL once per connection under a
name of its own and runs it with ``send_query_prepared``: parameters are dumped and the row loaded
by psycopg's own adapters (a ``Transformer``), the wait is the connection's own (interrupts cancel
the query as psycopg does), and errors are psycopg's errors.

Parameters go as text (bytes in binary: text would depend on standard_conforming_strings) with
their types left to the server, which infers each from where it stands in the statement (a column
it is compared with or written to), so one preparation fits every call. For autocommit
connections: the retry after a vanished preparation would fail inside an aborted transaction.
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from psycopg import AsyncConnection, generators, pq
from psycopg import errors as e
from psycopg.abc import Buffer
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq.abc import PGresult

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
_INVALID_STATEMENT_NAME = b"26000"  # the prepared statement is gone (DEALLOCATE, a pooler)
_DUPLICATE_STATEMENT = b"42P05"  # prepared already: by this very SQL, whose hash is in the name

# Set by ``instrument`` when the server traces (psycopg's instrumentation sees only cursors).
_tracer: trace.Tracer | None = None


def instrument(provider: trace.TracerProvider) -> None:
    """Give every run a client span, as psycopg's instrumentation gives a cursor's execute."""
    global _tracer
    _tracer = provider.get_tracer(__name__)


class PreparedStatement:
    """``sql`` with ``%(name)s`` placeholders, run by name on any connection of a pool. Best one
    instance per statement in a process (a module constant): it knows where it is prepared."""

    def __init__(self, name: str, sql: str) -> None:
        self.label = name  # its span's name
        self.sql = sql
        self.params: list[str] = []  # placeholder names, in $n order

        def number(match: re.Match[str]) -> str:
            if match[1] not in self.params:
                self.params.append(match[1])
            return f"${self.params.index(match[1]) + 1}"

        query = _PLACEHOLDER.sub(number, sql)
        if "%" in query:
            raise ValueError(f"{name}: only %(name)s placeholders are supported")
        self.query = query.encode()
        # The same name is always the same SQL, so a statement found prepared already is this one.
        self.name = f"{name}_{hashlib.sha1(self.query).hexdigest()[:12]}".encode()  # noqa: S324
        # The connections it is prepared on, each with the result's column names once a row came
        # back (fixed for a preparation: Postgres refuses to change a prepared result's columns).
        self._prepared: weakref.WeakKeyDictionary[AsyncConnection[Any], list[str]] = (
            weakref.WeakKeyDictionary()
        )

    async def fetchone(self, conn: AsyncConnection[Any], params: Mapping[str, Any]) -> dict[str, Any] | None:
        """The statement's first row as a dict (None when it returns none)."""
        rows = await self.fetchall(conn, params)
        return rows[0] if rows else None

    async def fetchall(
        self,
        conn: AsyncConnection[Any],
        params: Mapping[str, Any],
        *,
        for_spans: Sequence[trace.SpanContext] = (),
    ) -> list[dict[str, Any]]:
        """The statement's rows as dicts. ``for_spans``: the requests it runs for, when it runs
        for several (a group commit, outside any one's trace): its span links to each."""
        if _tracer is None:
            return await self._fetchall(conn, params)
        links = [trace.Link(context) for context in for_spans if context.is_valid]
        with _tracer.start_as_current_span(self.label, kind=trace.SpanKind.CLIENT, links=links) as span:
            info = conn.info
            span.set_attributes(
                {
                    "db.system": "postgresql",
                    "db.statement": self.sql,
                    "db.name": info.dbname,
                    "db.user": info.user,
                    "net.peer.name": info.host,
                    "net.peer.port": info.port,
                }
            )
            return await self._fetchall(conn, params)

    async def _fetchall(self, conn: AsyncConnection[Any], params: Mapping[str, Any]) -> list[dict[str, Any]]:
        names = self._prepared.get(conn)
        if names is None:
            await self._prepare(conn)
            names = self._prepared[conn] = []
        # A transformer per run, as a cursor makes one per query: one kept would hold its
        # connection (and the last row) and keep the encoding it first saw.
        tx = Transformer(conn)
        values = [params[name] for name in self.params]
        formats = [PyFormat.BINARY if isinstance(v, bytes) else PyFormat.TEXT for v in values]
        dumped = tx.dump_sequence(values, formats)
        result = await self._run(conn, dumped, tx.formats)
        if (
            result.status == pq.ExecStatus.FATAL_ERROR
            and result.error_field(pq.DiagnosticField.SQLSTATE) == _INVALID_STATEMENT_NAME
            and conn.info.transaction_status == pq.TransactionStatus.IDLE
        ):
            names.clear()  # a new preparation: its columns are read anew
            await self._prepare(conn)  # gone from the server (DEALLOCATE, a pooler): again
            result = await self._run(conn, dumped, tx.formats)
        if result.status != pq.ExecStatus.TUPLES_OK:
            raise e.error_from_result(result, encoding=conn.info.encoding)
        if not result.ntuples:
            return []
        tx.set_pgresult(result)
        if not names:
            names += [(result.fname(i) or b"").decode() for i in range(result.nfields)]
        return [dict(zip(names, row, strict=True)) for row in tx.load_rows(0, result.ntuples, tuple)]

    async def _prepare(self, conn: AsyncConnection[Any]) -> None:
        pgconn = conn.pgconn
        pgconn.send_prepare(self.name, self.query)
        result = _last(await conn.wait(generators.execute(pgconn)))
        if result.status != pq.ExecStatus.COMMAND_OK and (
            result.error_field(pq.DiagnosticField.SQLSTATE) != _DUPLICATE_STATEMENT
        ):
            raise e.error_from_result(result, encoding=conn.info.encoding)

    async def _run(
        self, conn: AsyncConnection[Any], values: Sequence[Buffer | None], formats: Sequence[pq.Format] | None
    ) -> PGresult:
        pgconn = conn.pgconn
        pgconn.send_query_prepared(self.name, values, param_formats=formats)
        return _last(await conn.wait(generators.execute(pgconn)))


def _last(results: list[PGresult]) -> PGresult:
    if not results:
        raise e.InternalError("got no result from the query")  # as psycopg's cursor says
    return results[-1]
