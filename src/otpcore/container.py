"""The composition root: adapters chosen from Settings, services wired to them.

``build_core(settings)`` is the embedding API; ``otp_http`` builds its app on the same Core.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from dependency_injector import containers, providers

from otpcore.adapters.cache import CachedUserRepo, Invalidations
from otpcore.adapters.delivery_queue import STREAM as DELIVERY_STREAM
from otpcore.adapters.delivery_queue import DeliveryWorker, JobCipher, QueuedCodeSender
from otpcore.adapters.event_stream import EventForwarder, EventStream
from otpcore.adapters.memory import (
    MemoryCodeSender,
    MemoryCodeStore,
    MemoryEventBus,
    MemoryRateLimiter,
    MemorySessionStore,
    MemoryUserRepo,
)
from otpcore.adapters.postgres import PostgresDatabase, PostgresSessionStore, PostgresSignIn, PostgresUserRepo
from otpcore.adapters.redis import RedisCodeStore, RedisEventBus, RedisKeyspace, RedisRateLimiter
from otpcore.adapters.senders import ConsoleCodeSender
from otpcore.adapters.session_cache import CachedSessionStore
from otpcore.adapters.sqlite import SqliteDatabase, SqliteSessionStore, SqliteUserRepo
from otpcore.adapters.webhooks import WebhookCodeSender, WebhookPoster, WebhookSigner
from otpcore.domain.codes import CodePolicy
from otpcore.domain.model import PhonePolicy
from otpcore.domain.services import AuthService, StepwiseSignIn, UserService
from otpcore.domain.tokens import CLOCK_SKEW_LEEWAY, TokenKeys, TokenService
from otpcore.settings import Settings
from otpcore.telemetry import Telemetry

STORE_TIMEOUT = 3.0


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
        test_codes_until=settings.test_codes_until,
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
    postgres = providers.Singleton(
        PostgresDatabase,
        settings.provided.postgres_dsn,
        min_size=settings.provided.db_max_idle_conns,
        max_size=settings.provided.db_max_open_conns,
        max_lifetime=settings.provided.db_conn_max_lifetime,
        # A store that is down must answer 503 well inside the 5 s a client may wait.
        timeout=STORE_TIMEOUT,
        migrate=settings.provided.should_migrate_on_start,
    )
    redis = providers.Singleton(
        RedisKeyspace.from_url,
        settings.provided.redis_location,
        cluster=settings.provided.redis_cluster_mode,
        prefix=settings.provided.otp_redis_key_prefix,
        pool_size=settings.provided.redis_pool_size,
    )
    # Caches share Redis (L2, version tokens, revocation markers) when there is one.
    cache_keyspace = providers.Selector(
        settings.provided.fast_store, memory=providers.Object(None), redis=redis
    )
    # One invalidation subscription per process, shared by the user and session caches.
    invalidations = providers.Selector(
        settings.provided.fast_store,
        memory=providers.Object(None),
        redis=providers.Singleton(Invalidations, redis),
    )
    # A revocation marker outlives every access token of the session it names.
    revoked_ttl = providers.Callable(lambda s: s.jwt_expiry + CLOCK_SKEW_LEEWAY + 60, settings)
    postgres_sessions = providers.Singleton(PostgresSessionStore, postgres)
    session_store = providers.Selector(
        settings.provided.storage,
        memory=providers.Singleton(MemorySessionStore),
        sqlite=providers.Singleton(
            CachedSessionStore,
            providers.Singleton(SqliteSessionStore, sqlite),
            keyspace=cache_keyspace,
            invalidations=invalidations,
            revoked_ttl=revoked_ttl,
        ),
        postgres=providers.Singleton(
            CachedSessionStore,
            postgres_sessions,
            keyspace=cache_keyspace,
            invalidations=invalidations,
            revoked_ttl=revoked_ttl,
        ),
    )
    event_bus = providers.Selector(
        settings.provided.fast_store,
        memory=providers.Singleton(MemoryEventBus),
        redis=providers.Singleton(
            RedisEventBus,
            redis,
            stream=settings.provided.events_redis_channel,
            batch_size=settings.provided.events_batch_size,
        ),
    )
    rate_limiter = providers.Selector(
        settings.provided.fast_store,
        memory=providers.Singleton(MemoryRateLimiter, clock=clock),
        redis=providers.Singleton(RedisRateLimiter, redis, clock=clock),
    )
    code_store = providers.Selector(
        settings.provided.fast_store,
        memory=providers.Singleton(MemoryCodeStore, clock=clock, events=event_bus, limiter=rate_limiter),
        redis=providers.Singleton(RedisCodeStore, redis, clock=clock, events=event_bus),
    )
    # Outbound event webhooks: a consumer of the stream, on a Redis client of its own (it blocks).
    event_forwarder = providers.Selector(
        settings.provided.event_forwarding,
        off=providers.Object(None),
        webhook=providers.Singleton(
            EventForwarder,
            providers.Singleton(
                EventStream.connect,
                settings.provided.redis_location,
                cluster=settings.provided.redis_cluster_mode,
                prefix=settings.provided.otp_redis_key_prefix,
                stream=settings.provided.events_redis_channel,
            ),
            providers.Singleton(
                WebhookPoster,
                settings.provided.events_webhook_url,
                providers.Singleton(WebhookSigner, settings.provided.events_webhook_secret),
            ),
        ),
    )
    sms_webhook = providers.Singleton(
        WebhookCodeSender,
        providers.Singleton(
            WebhookPoster,
            settings.provided.sms_webhook_url,
            providers.Singleton(WebhookSigner, settings.provided.sms_webhook_secret),
        ),
        give_up_after=settings.provided.otp_expiry,
    )
    # With Redis, SMS are queued there (encrypted) and posted by each process's DeliveryWorker.
    delivery_cipher = providers.Singleton(JobCipher, settings.provided.code_hmac_key.call())
    code_sender = providers.Selector(
        settings.provided.otp_sender,
        console=providers.Singleton(ConsoleCodeSender),
        memory=providers.Singleton(MemoryCodeSender),
        webhook=providers.Selector(
            settings.provided.fast_store,
            memory=sms_webhook,
            redis=providers.Singleton(
                QueuedCodeSender, redis, delivery_cipher, ttl=settings.provided.otp_expiry, clock=clock
            ),
        ),
    )

    # Test numbers are passed per call by AuthService: they are in force only until their date.
    phone_policy = providers.Singleton(PhonePolicy, allowed_countries=settings.provided.allowed_countries)
    code_policy = providers.Singleton(_code_policy, settings)
    tokens = providers.Singleton(
        TokenService,
        providers.Singleton(_token_keys, settings),
        issuer=settings.provided.jwt_issuer,
        audience=settings.provided.jwt_audience,
        access_ttl=settings.provided.jwt_expiry,
        refresh_ttl=settings.provided.jwt_refresh_expiry,
        clock=clock,
    )
    telemetry = providers.Singleton(Telemetry)
    # The consumer of the SMS queue, on a Redis client of its own (it blocks); started by Core.
    delivery_worker = providers.Singleton(
        DeliveryWorker,
        providers.Singleton(
            EventStream.connect,
            settings.provided.redis_location,
            cluster=settings.provided.redis_cluster_mode,
            prefix=settings.provided.otp_redis_key_prefix,
            stream=DELIVERY_STREAM,
        ),
        sms_webhook,
        delivery_cipher,
        events=event_bus,
        counters=telemetry,
        country_of=providers.Object(PhonePolicy.country_of),
        clock=clock,
    )
    # Database-backed users are cached: L1 in each process, plus L2 and invalidations in Redis.
    postgres_users = providers.Singleton(PostgresUserRepo, postgres, clock=clock)
    user_repo = providers.Selector(
        settings.provided.storage,
        memory=providers.Singleton(MemoryUserRepo, clock=clock),
        sqlite=providers.Singleton(
            CachedUserRepo,
            providers.Singleton(SqliteUserRepo, sqlite, clock=clock),
            keyspace=cache_keyspace,
            invalidations=invalidations,
            counters=telemetry,
        ),
        postgres=providers.Singleton(
            CachedUserRepo,
            postgres_users,
            keyspace=cache_keyspace,
            invalidations=invalidations,
            counters=telemetry,
        ),
    )
    # Postgres signs in with one statement; the other stores take the two steps.
    stepwise_sign_in = providers.Singleton(StepwiseSignIn, users=user_repo, sessions=session_store)
    sign_in = providers.Selector(
        settings.provided.storage,
        memory=stepwise_sign_in,
        sqlite=stepwise_sign_in,
        postgres=providers.Singleton(PostgresSignIn, postgres_users, postgres_sessions),
    )
    auth = providers.Singleton(
        AuthService,
        sign_ins=sign_in,
        counters=telemetry,
        limiter=rate_limiter,
        country_hourly_limit=settings.provided.otp_country_hourly_limit,
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
        self.telemetry: Telemetry = container.telemetry()
        self._forwarder: EventForwarder | None = None
        self._delivery: DeliveryWorker | None = None

    def checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """One liveness probe per backing store, named for the store ("postgres", "redis", ...)."""
        c = self.container
        return {
            self.settings.storage: c.user_repo().ping,
            self.settings.fast_store: c.code_store().ping,
        }

    async def migrate(self) -> list[str]:
        """Apply pending schema migrations; the versions applied now."""
        if self.settings.storage == "memory":
            return []
        return await self._database().migrate()

    def _database(self) -> SqliteDatabase | PostgresDatabase:
        if self.settings.storage == "postgres":
            return self.container.postgres()
        return self.container.sqlite()

    async def start(self) -> None:
        """Start the background work of a serving process: event forwarder, SMS delivery worker,
        and the caches' invalidation listener (live before the first request, not at it)."""
        invalidations = self.container.invalidations()
        if invalidations is not None:
            invalidations.start()
        self._forwarder = self.container.event_forwarder()
        if self._forwarder is not None:
            self._forwarder.start()
        # Queued SMS are posted by a worker in every serving process (see delivery_queue).
        if isinstance(self.container.code_sender(), QueuedCodeSender):
            self._delivery = self.container.delivery_worker()
            self._delivery.start()

    async def aclose(self) -> None:
        await self.auth.drain()
        if self._delivery is not None:
            await self._delivery.stop()  # before the Redis clients go
        if self._forwarder is not None:
            await self._forwarder.stop()  # before the Redis clients go
        invalidations = self.container.invalidations()
        if invalidations is not None:
            await invalidations.aclose()  # the caches' listener, before the Redis client goes
        self.telemetry.shutdown()
        sign_ins = self.container.sign_in()
        if isinstance(sign_ins, PostgresSignIn):
            await sign_ins.drain()  # a batch of sign-ins in flight, before its database goes
        if self.settings.storage != "memory":
            await self._database().close()
        await self._close_event_buses()  # before the Redis client goes
        if self.settings.fast_store == "redis":
            await self.container.redis().aclose()
        if self.settings.otp_sender == "webhook":
            await self.container.code_sender().aclose()

    async def _close_event_buses(self) -> None:
        """Let appends in flight finish, EVENTS_FLUSH_INTERVAL at most, then stop the buses."""
        sender = self.container.code_sender()
        jobs = sender.stream if isinstance(sender, QueuedCodeSender) else None
        buses = [bus for bus in (self.events, jobs) if isinstance(bus, RedisEventBus)]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.events_flush_interval):
                for bus in buses:
                    await bus.drain()
        for bus in buses:
            await bus.aclose()

    async def __aenter__(self) -> Core:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def build_core(settings: Settings | None = None, **overrides: object) -> Core:
    """Wire the library from ``settings`` (default: the environment).

    ``overrides`` replace providers by name, e.g. ``code_sender=MySender()``.
    """
    settings = settings or Settings.from_env()
    container = Container(settings=settings.with_dev_secret())
    for name, value in overrides.items():
        getattr(container, name).override(providers.Object(value))
    return Core(container)
