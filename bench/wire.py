"""Counting TCP proxies for Redis and Postgres: exact per-request command and statement counts.

Only the server started for the counting phase connects through these (the load runs connect
directly, so the proxies cost them nothing). Each proxy parses what the client sends:

* Redis (RESP): one count per top-level command, by name. Commands a Lua script runs inside
  Redis never cross the wire, so they are not counted: this is the number of commands the
  server sends (a pipeline of three is three), the figure the issue's budget is about.
* Postgres (frontend protocol v3): ``Execute`` messages and non-empty simple ``Query`` messages
  are statements; an empty simple query (the pool's ``check_connection``) is counted apart as
  a "check"; ``Sync`` and simple queries are round trips.

The proxies run on an event loop in a thread of their own; ``snapshot()`` is thread-safe.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter


class _Counts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)


class RespParser:
    """Counts the commands in a client-to-Redis byte stream (RESP arrays, or inline)."""

    def __init__(self, counts: _Counts) -> None:
        self.counts = counts
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data
        while self._one():
            pass

    def _one(self) -> bool:
        buf = self.buf
        if not buf:
            return False
        end = buf.find(b"\r\n")
        if end < 0:
            return False
        if buf[0:1] != b"*":  # an inline command
            name = bytes(buf[:end]).split(b" ", 1)[0]
            del buf[: end + 2]
            self.counts.add(name.decode(errors="replace").upper())
            return True
        items = int(buf[1:end])
        pos, first = end + 2, b""
        for i in range(items):
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return False
            length = int(buf[pos + 1 : line_end])
            start = line_end + 2
            if len(buf) < start + length + 2:
                return False
            if i == 0:
                first = bytes(buf[start : start + length])
            pos = start + length + 2
        del buf[:pos]
        self.counts.add(first.decode(errors="replace").upper())
        return True


# Untyped first messages: SSLRequest, GSSENCRequest, CancelRequest; anything else is startup.
_PRELUDE_CODES = {80877103, 80877104, 80877102}


class PgParser:
    """Counts statements in a client-to-Postgres byte stream (protocol v3, no TLS)."""

    def __init__(self, counts: _Counts) -> None:
        self.counts = counts
        self.buf = bytearray()
        self.started = False

    def feed(self, data: bytes) -> None:
        self.buf += data
        while self._one():
            pass

    def _one(self) -> bool:
        buf = self.buf
        if not self.started:
            if len(buf) < 8:
                return False
            length = int.from_bytes(buf[0:4], "big")
            if len(buf) < length:
                return False
            code = int.from_bytes(buf[4:8], "big")
            del buf[:length]
            self.started = code not in _PRELUDE_CODES
            self.counts.add("connections" if self.started else "prelude")
            return True
        if len(buf) < 5:
            return False
        kind = buf[0:1]
        length = int.from_bytes(buf[1:5], "big")
        if len(buf) < 1 + length:
            return False
        body = bytes(buf[5 : 1 + length])
        del buf[: 1 + length]
        if kind == b"Q":
            text = body.rstrip(b"\0").strip()
            self.counts.add("statements" if text else "checks")
            self.counts.add("round_trips")
        elif kind == b"E":
            self.counts.add("statements")
        elif kind == b"S":
            self.counts.add("round_trips")
        elif kind == b"P":
            self.counts.add("parses")
        return True


class CountingProxy:
    """127.0.0.1:<port> -> target, counting what clients send with a parser per connection."""

    def __init__(self, target_port: int, parser: type[RespParser] | type[PgParser]) -> None:
        self.target_port = target_port
        self.parser = parser
        self.counts = _Counts()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        parser = self.parser(self.counts)
        await asyncio.gather(
            _pump(reader, up_writer, parser.feed), _pump(up_reader, writer, None), return_exceptions=True
        )

    def snapshot(self) -> Counter[str]:
        return self.counts.snapshot()

    async def close(self) -> None:
        self._server.close()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, feed: object) -> None:
    try:
        while data := await src.read(65536):
            if feed is not None:
                feed(data)  # type: ignore[operator]
            dst.write(data)
            await dst.drain()
    finally:
        dst.close()


class Proxies:
    """A Redis and a Postgres counting proxy on a background event loop."""

    def __init__(self, redis_port: int, pg_port: int) -> None:
        self.redis = CountingProxy(redis_port, RespParser)
        self.pg = CountingProxy(pg_port, PgParser)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-proxies", daemon=True)

    def __enter__(self) -> Proxies:
        self._thread.start()
        for proxy in (self.redis, self.pg):
            asyncio.run_coroutine_threadsafe(proxy.start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        for proxy in (self.redis, self.pg):
            asyncio.run_coroutine_threadsafe(proxy.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
