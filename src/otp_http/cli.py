"""The ``otp-server`` command: serve, migrate, users, events, openapi."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import msgspec
import uvicorn

from otp_http.app import create_app, create_litestar
from otp_http.logs import configure_logging
from otp_http.tracing import configure_tracing, traced
from otpcore import Core, Role, Settings, SettingsError, build_core
from otpcore.adapters.event_stream import EventStream, event_document
from otpcore.domain.errors import OtpError
from otpcore.domain.events import Event

T = TypeVar("T")


def app_from_env() -> object:
    """uvicorn's factory: one app per worker process, configured from the environment."""
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings=settings)
    provider = configure_tracing()
    return traced(app, provider) if provider else app


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"otp-server: configuration error: {exc}")


def serve(args: argparse.Namespace) -> None:
    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)
    if args.workers > 1 and not settings.uses_redis:
        sys.exit(
            "otp-server: --workers > 1 needs REDIS_URL: without Redis, codes and rate limits "
            "live in each process's memory, so limits would be per process and a code sent "
            "through one worker could not be verified through another."
        )
    if not settings.jwt_secret:
        # Development: one random secret shared by every worker, valid until this stops.
        settings = settings.with_dev_secret()
        os.environ["JWT_SECRET"] = settings.jwt_secret
        print("otp-server: JWT_SECRET not set; using a random one until exit", file=sys.stderr)
    if settings.should_migrate_on_start:
        asyncio.run(_with_core(settings, lambda core: core.migrate()))
    uvicorn.run(
        "otp_http.cli:app_from_env",
        factory=True,
        host=args.host or settings.server_host,
        port=args.port or settings.server_port,
        workers=args.workers,
        log_config=None,
        # Client IPs come from TRUSTED_PROXIES only, never from uvicorn's own header rewriting.
        proxy_headers=False,
        server_header=False,
        access_log=settings.access_log,
    )


async def _with_core(settings: Settings, action: Callable[[Core], Awaitable[T]]) -> T:
    core = build_core(settings)
    try:
        return await action(core)
    finally:
        await core.aclose()


def migrate(_: argparse.Namespace) -> None:
    settings = _settings()
    configure_logging(settings.log_level, "text")
    # Not lazily on first use: this command reports what it applied.
    settings = msgspec.structs.replace(settings, migrate_on_start=False).with_dev_secret()
    applied = asyncio.run(_with_core(settings, lambda core: core.migrate()))
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))


def set_role(args: argparse.Namespace) -> None:
    settings = _settings().with_dev_secret()

    async def grant(core: Core) -> str:
        await core.migrate() if settings.should_migrate_on_start else None
        user = await core.users.set_role(args.phone, Role(args.role))
        return f"user {user.id} ({user.phone_number}) is now {user.role.value}"

    try:
        print(asyncio.run(_with_core(settings, grant)))
    except OtpError as exc:
        sys.exit(f"otp-server: {exc.message}")


def events_tail(args: argparse.Namespace) -> None:
    settings = _settings()
    if not settings.uses_redis:
        print(
            "otp-server: events tail needs Redis (REDIS_URL or REDIS_HOST): without it, events "
            "stay in each server process's memory and there is no stream to follow",
            file=sys.stderr,
        )
        sys.exit(2)
    configure_logging(settings.log_level, "text")  # to stderr; stdout carries the events
    asyncio.run(_tail(settings, args))


async def _tail(settings: Settings, args: argparse.Namespace) -> None:
    """Print events as JSON lines until SIGINT/SIGTERM (or the reader of stdout goes away)."""
    main = asyncio.current_task()
    assert main is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, main.cancel)
    stream = EventStream.connect(
        settings.redis_location,
        cluster=settings.redis_cluster_mode,
        prefix=settings.otp_redis_key_prefix,
        stream=settings.events_redis_channel,
    )
    group = stream.group(args.group, args.consumer) if args.group else None
    try:
        if group is not None:
            # Acknowledged once printed: a consumer that was down gets everything back.
            await group.run(_print_event, from_start=args.from_start, give_up_on=(BrokenPipeError,))
        else:
            async for entry in stream.follow(from_start=args.from_start):
                if entry.event is not None:
                    await _print_event(entry.event)
    except asyncio.CancelledError:
        pass  # asked to stop: a clean exit
    except BrokenPipeError:
        # Nobody reads stdout any more (``| head``): exit quietly, without a second error at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        if group is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await group.leave()
        await stream.aclose()


async def _print_event(event: Event) -> None:
    sys.stdout.write(msgspec.json.encode(event_document(event)).decode() + "\n")
    sys.stdout.flush()


def openapi(_: argparse.Namespace) -> None:
    settings = Settings(db_provider="memory", jwt_secret="openapi-document-only-" + "x" * 16)
    app = create_litestar(build_core(settings))
    print(json.dumps(app.openapi_schema.to_schema(), indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="otp-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("serve", help="run the HTTP service")
    p.add_argument("--host", default=None, help="bind address (default SERVER_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default SERVER_PORT, 8080)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (more than 1 needs Redis)")
    p.set_defaults(run=serve)

    p = commands.add_parser("migrate", help="apply pending database migrations")
    p.set_defaults(run=migrate)

    users = commands.add_parser("users", help="manage users").add_subparsers(dest="action", required=True)
    p = users.add_parser("set-role", help="grant a role to a phone number")
    p.add_argument("phone")
    p.add_argument("role", choices=[r.value for r in Role])
    p.set_defaults(run=set_role)

    events = commands.add_parser("events", help="the event stream").add_subparsers(
        dest="action", required=True
    )
    p = events.add_parser("tail", help="print events as JSON lines as they happen")
    p.add_argument("--group", help="read through this consumer group: at least once, resumes after a stop")
    p.add_argument("--consumer", help="consumer name in the group (default: hostname-pid)")
    p.add_argument(
        "--from-start",
        action="store_true",
        help="begin with the oldest event the stream holds (with --group: when creating the group)",
    )
    p.set_defaults(run=events_tail)

    p = commands.add_parser("openapi", help="print the OpenAPI document")
    p.set_defaults(run=openapi)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
