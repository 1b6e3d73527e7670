"""One pipelined Redis connection per process, for the commands on the request path.

Every request runs one or two Lua scripts. Through redis-py's pool each call costs about
150-200 µs of CPU here (pool checkout and release, retry wrapper, stream reader, health check);
sent over a single connection whose replies are parsed by hiredis in the protocol callback, it
costs about 40 µs, and commands of concurrent requests are in flight together (pipelining).
redis-py keeps everything else: pub/sub, blocking reads, cluster.

A command is written at once when Redis holds none of ours; issued while it does, it waits for
the next reply and goes with the others that waited, in one write. On loopback TCP the writer
pays for the segment's delivery too: one write per reply instead of one per command took send-otp
from ~318 to ~281 µs of machine CPU (Redis ~67 -> ~52, the worker ~213 -> ~193). Redis is not
left waiting for a loop iteration to end: gathering each iteration's commands instead made the
two take turns, and both cores sat idle about a tenth of the time.

Replies come back in the order commands were written, so each waiter is a future in a FIFO.
A connection that stops answering (the oldest waiter older than ``timeout``) or closes fails
every waiter with a redis-py ``ConnectionError``/``TimeoutError``; the next call reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any
from urllib.parse import urlsplit

import hiredis
from opentelemetry import trace
from redis import exceptions as rex
from redis._parsers.base import BaseParser
from redis.connection import parse_url

Arg = bytes | str | int | float

# Set by ``instrument`` when the server traces (redis-py's instrumentation cannot see the wire).
_tracer: trace.Tracer | None = None


def instrument(provider: trace.TracerProvider) -> None:
    """Give every wire command a client span, as redis-py's instrumentation does its own."""
    global _tracer
    _tracer = provider.get_tracer(__name__)


def _encode(args: tuple[Arg, ...]) -> bytes:
    # In C, as redis-py's encoder writes each argument (ints and floats in decimal, str as
    # UTF-8): a third of a Python loop's time, ~10 µs less for a script's twenty-odd arguments.
    return hiredis.pack_command(args)  # type: ignore[arg-type]  # its stub takes a 1-tuple


_TLS_OPTIONS = {"ssl_ca_certs", "ssl_cert_reqs"}


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    """The TLS settings redis-py reads from a rediss:// URL's query: CA file and certificate check."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if options.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif options.get("ssl_cert_reqs") in ("optional", ssl.CERT_OPTIONAL):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class CannotConnect(rex.ConnectionError):
    """No connection could be made (not retried: the next attempt would wait as long)."""


class Closed(rex.ConnectionError):
    """The wire was closed (aclose) under the call: not retried."""


class _Protocol(asyncio.Protocol):
    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.reader = hiredis.Reader(replyError=rex.ResponseError)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self is not self.wire._protocol:  # a dropped connection: its replies are no one's
            if self.transport is not None:
                self.transport.abort()
            return
        self.reader.feed(data)
        waiters = self.wire.waiters
        try:
            while (reply := self.reader.gets()) is not False:
                waiter = waiters.popleft()[0]
                if waiter.done():  # its caller was cancelled
                    continue
                if isinstance(reply, rex.ResponseError):
                    # The exception class redis-py would raise (NoScriptError, OutOfMemoryError...).
                    waiter.set_exception(BaseParser.parse_error(str(reply)))
                else:
                    waiter.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self.wire.abort(self, rex.ConnectionError(f"Redis protocol error: {exc}"))
            return
        unsent = self.wire.unsent
        if unsent and self.transport is not None:
            self.transport.write(b"".join(unsent))
            unsent.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.wire.abort(self, rex.ConnectionError("Redis closed the connection"))


class Wire:
    """A lazily connected, self-reconnecting, pipelined connection to one Redis server."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        timeout: float = 2.0,
    ) -> None:
        self.host, self.port, self.path, self.db = host, port, path, db
        self.timeout = timeout
        self._tls = tls
        handshake: list[tuple[Arg, ...]] = []
        if password is not None:
            handshake.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            handshake.append(("SELECT", db))
        self._handshake = handshake
        # (future, time written) of every command awaiting its reply, oldest first.
        self.waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        # Commands waiting for the next reply to go together (their waiters are queued already).
        self.unsent: list[bytes] = []

    @staticmethod
    def understands(url: str) -> bool:
        """Whether the URL asks for nothing the wire cannot do (client certificates, say):
        a URL it does not understand is left to redis-py whole."""
        return not (set(k for k in parse_url(url) if k.startswith("ssl_")) - _TLS_OPTIONS)

    @classmethod
    def from_url(cls, url: str, *, timeout: float) -> Wire:
        """``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs, as redis-py reads them."""
        parsed = parse_url(url)
        return cls(
            host=parsed.get("host") or "127.0.0.1",
            port=parsed.get("port") or 6379,
            path=parsed.get("path"),
            db=int(parsed.get("db") or 0),
            username=parsed.get("username"),
            password=parsed.get("password"),
            tls=_tls_context(parsed) if urlsplit(url).scheme == "rediss" else None,
            timeout=timeout,
        )

    async def call(self, *args: Arg) -> Any:
        """Send one command and await its reply.

        A connection found closed, or closed before the reply (a Redis restart), is retried
        once on a new connection, as redis-py's pool is configured to; a timeout is not (the
        command may have run).
        """
        if _tracer is not None:
            with _tracer.start_as_current_span(str(args[0]), kind=trace.SpanKind.CLIENT) as span:
                span.set_attributes(
                    {
                        "db.system": "redis",
                        "db.statement": str(args[0]),  # the name only: arguments hold digests
                        "db.redis.database_index": self.db,
                        "net.peer.name": self.path or self.host,
                        "net.peer.port": self.port,
                    }
                )
                return await self._call(args)
        return await self._call(args)

    async def _call(self, args: tuple[Arg, ...]) -> Any:
        command = _encode(args)
        try:
            return await self._roundtrip(self._protocol or await self._connect(), command)
        except (CannotConnect, rex.AuthenticationError, Closed):
            raise
        except rex.ConnectionError:
            return await self._roundtrip(self._protocol or await self._connect(), command)

    async def _roundtrip(self, protocol: _Protocol, command: bytes) -> Any:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._send(protocol, command, waiter, loop)
        return await waiter

    def _send(
        self,
        protocol: _Protocol,
        command: bytes,
        waiter: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        if protocol is not self._protocol or protocol.transport is None or protocol.transport.is_closing():
            error = rex.ConnectionError("Redis connection closed")
            self.abort(protocol, error)  # if current: the retry connects anew
            waiter.set_exception(error)
            return
        now = loop.time()
        if self.waiters:  # Redis holds ours: this goes with the next reply (see the module)
            self.unsent.append(command)
        else:
            protocol.transport.write(command)
        self.waiters.append((waiter, now))
        if self._watchdog is None:
            self._watchdog = loop.call_at(now + self.timeout, self._check_stalled)

    def _check_stalled(self) -> None:
        self._watchdog = None
        if not self.waiters or self._protocol is None:
            return
        loop = asyncio.get_running_loop()
        oldest = self.waiters[0][1]
        if oldest + self.timeout <= loop.time():
            self.abort(self._protocol, rex.TimeoutError("Timeout reading from Redis"))
        else:
            self._watchdog = loop.call_at(oldest + self.timeout, self._check_stalled)

    async def _connect(self) -> _Protocol:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if connecting.cancelled() and task is not None and not task.cancelling():
                raise Closed("Redis connection closed") from None
            raise
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                if self.path is not None:
                    _, protocol = await loop.create_unix_connection(lambda: _Protocol(self), self.path)
                else:
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(self),
                        self.host,
                        self.port,
                        ssl=self._tls,
                        server_hostname=self.host if self._tls else None,
                    )
        except (OSError, TimeoutError) as exc:
            raise CannotConnect(f"cannot connect to Redis: {exc}") from exc
        self._protocol = protocol
        # Queued with no await in between, the handshake leaves ahead of every command that
        # callers queue meanwhile: none can run before the SELECT, on another database.
        waiters = []
        for command in self._handshake:
            waiters.append(waiter := loop.create_future())
            self._send(protocol, _encode(command), waiter, loop)
        try:
            await asyncio.gather(*waiters)
        except rex.ResponseError as exc:  # not a login failure redis-py knows by name
            self.abort(protocol, rex.AuthenticationError(str(exc)))
            raise rex.AuthenticationError(str(exc)) from exc
        except BaseException:  # WRONGPASS (AuthenticationError), LOADING, a timeout, aclose
            self.abort(protocol, rex.ConnectionError("Redis handshake failed"))
            raise
        return protocol

    def abort(self, protocol: _Protocol, error: Exception) -> None:
        """Drop ``protocol`` (if current) and fail whatever waits on it."""
        if protocol is not self._protocol:
            return
        self._protocol = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiters, self.waiters = self.waiters, collections.deque()
        self.unsent.clear()
        for waiter, _ in waiters:
            if not waiter.done():
                waiter.set_exception(error)
        if protocol.transport is not None:
            protocol.transport.abort()

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._protocol is not None:
            self.abort(self._protocol, Closed("closed"))
