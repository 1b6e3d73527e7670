"""The composition root: adapters chosen from Settings, services wired to them.

``build_core(settings)`` is the embedding API; ``otp_http`` builds its app on the same Core.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from dependency_injector import containers, providers

from otpcore.adapters.memory import (
    MemoryCodeSender,
    MemoryCodeStore,
    MemoryEventBus,
    MemoryRateLimiter,
    MemorySessionStore,
    MemoryUserRepo,
)
from otpcore.adapters.senders import ConsoleCodeSender
from otpcore.adapters.sqlite import SqliteDatabase, SqliteSessionStore, SqliteUserRepo
from otpcore.domain.codes import CodePolicy
from otpcore.domain.model import PhonePolicy
from otpcore.domain.services import AuthService, UserService
from otpcore.domain.tokens import TokenKeys, TokenService
from otpcore.settings import Settings, SettingsError


def _code_policy(settings: Settings) -> CodePolicy:
    return CodePolicy(
        secret=settings.code_hmac_key(),
        length=settings.otp_length,
        charset=settings.otp_code_charset,
        ttl=settings.otp_expiry,
        max_attempts=settings.otp_max_attempts,
        sends_per_window=settings.rate_limit_otp_requests,
        send_window=settings.rate_limit_otp_duration,
        failures_per_window=settings.otp_max_failed_per_phone,
        failure_window=settings.otp_failed_window,
        test_codes=settings.test_codes(),
        sms_template=settings.otp_sms_template,
    )


def _token_keys(settings: Settings) -> TokenKeys:
    pem = Path(settings.jwt_private_key_file).read_bytes() if settings.jwt_private_key_file else b""
    return TokenKeys(settings.jwt_algorithm, secret=settings.jwt_secret, private_key_pem=pem)


class Container(containers.DeclarativeContainer):
    settings = providers.Dependency(instance_of=Settings)
    clock = providers.Object(time.time)

    sqlite = providers.Singleton(
        SqliteDatabase,
        settings.provided.sqlite_path,
        migrate=settings.provided.should_migrate_on_start,
    )
    user_repo = providers.Selector(
        settings.provided.storage,
        memory=providers.Singleton(MemoryUserRepo, clock=clock),
        sqlite=providers.Singleton(SqliteUserRepo, sqlite, clock=clock),
    )
    session_store = providers.Selector(
        settings.provided.storage,
        memory=providers.Singleton(MemorySessionStore),
        sqlite=providers.Singleton(SqliteSessionStore, sqlite),
    )
    code_store = providers.Singleton(MemoryCodeStore, clock=clock)
    rate_limiter = providers.Singleton(MemoryRateLimiter, clock=clock)
    event_bus = providers.Singleton(MemoryEventBus)
    code_sender = providers.Selector(
        settings.provided.otp_sender,
        console=providers.Singleton(ConsoleCodeSender),
        memory=providers.Singleton(MemoryCodeSender),
    )

    phone_policy = providers.Singleton(
        PhonePolicy,
        test_numbers=providers.Callable(lambda s: frozenset(s.test_codes()), settings),
        allowed_countries=settings.provided.allowed_countries,
    )
    code_policy = providers.Singleton(_code_policy, settings)
    tokens = providers.Singleton(
        TokenService,
        providers.Singleton(_token_keys, settings),
        issuer=settings.provided.jwt_issuer,
        audience=settings.provided.jwt_audience,
        access_ttl=settings.provided.jwt_expiry,
        refresh_ttl=settings.provided.jwt_refresh_expiry,
    )
    auth = providers.Singleton(
        AuthService,
        users=user_repo,
        codes=code_store,
        sessions=session_store,
        events=event_bus,
        sender=code_sender,
        tokens=tokens,
        phones=phone_policy,
        policy=code_policy,
        admin_numbers=settings.provided.admin_numbers,
        clock=clock,
    )
    users = providers.Singleton(UserService, users=user_repo, events=event_bus, phones=phone_policy)


class Core:
    """The running library: services, and the stores behind them for health checks."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self.settings: Settings = container.settings()
        self.auth: AuthService = container.auth()
        self.users: UserService = container.users()
        self.tokens: TokenService = container.tokens()
        self.events = container.event_bus()

    def checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """One liveness probe per backing store, by name."""
        c = self.container
        return {
            "users": c.user_repo().ping,
            "sessions": c.session_store().ping,
            "codes": c.code_store().ping,
            "rate_limits": c.rate_limiter().ping,
            "events": c.event_bus().ping,
        }

    async def migrate(self) -> list[str]:
        """Apply pending schema migrations; the versions applied now."""
        if self.settings.storage == "sqlite":
            return await self.container.sqlite().migrate()
        return []

    async def aclose(self) -> None:
        await self.auth.drain()
        if self.settings.storage == "sqlite":
            await self.container.sqlite().close()

    async def __aenter__(self) -> Core:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def build_core(settings: Settings | None = None, **overrides: object) -> Core:
    """Wire the library from ``settings`` (default: the environment).

    ``overrides`` replace providers by name, e.g. ``code_sender=MySender()``.
    """
    settings = settings or Settings.from_env()
    if settings.storage == "postgres" or settings.uses_redis:
        # Refuse rather than silently fall back to per-process memory stores.
        raise SettingsError("PostgreSQL and Redis adapters are not part of this build yet")
    container = Container(settings=settings.with_dev_secret())
    for name, value in overrides.items():
        getattr(container, name).override(providers.Object(value))
    return Core(container)
