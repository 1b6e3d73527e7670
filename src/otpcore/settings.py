"""Settings decoded from the environment, with the seed's variable names.

``Settings.from_env()`` reads ``os.environ`` (and a ``.env`` file if present) once, when asked;
nothing is read at import time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import msgspec
from dotenv import dotenv_values

from otpcore.adapters.webhooks import WebhookSigner
from otpcore.domain.model import well_formed_e164
from otpcore.domain.tokens import SUPPORTED_ALGORITHMS

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class SettingsError(ValueError):
    """The configuration cannot be used; the message says which variable and why."""


def parse_duration(raw: str) -> int:
    """Go-style durations as the seed writes them ("2m", "1h30m", "720h", "30d") -> seconds."""
    text = raw.strip()
    if text.isdigit():
        return int(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {raw!r} (use e.g. 90s, 2m, 1h, 30d)")
    return round(sum(float(n) * _UNITS[u] for n, u in parts))


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


# Environment variable -> field, for durations given as text.
_DURATIONS = {
    "otp_expiry",
    "jwt_expiry",
    "jwt_refresh_expiry",
    "otp_failed_window",
    "events_flush_interval",
    "db_conn_max_lifetime",
    "rate_limit_global_duration",
    "rate_limit_auth_duration",
    "rate_limit_otp_duration",
    "rate_limit_user_duration",
}


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    environment: str = "development"
    server_host: str = "127.0.0.1"
    server_port: int = 8080
    # Storage: "sqlite" (embedded default), "memory", or "postgres".
    db_provider: Literal["sqlite", "memory", "postgres"] = "sqlite"
    database_url: str = ""
    sqlite_path: str = "./otp-server.db"
    postgres_host: str = "localhost"
    postgres_port: int = 5432
    postgres_user: str = "otp_server_user"
    postgres_password: str = "otp_server_password"  # noqa: S105 - the seed's local default
    postgres_db: str = "otp_server_db"
    postgres_ssl_mode: str = "disable"
    db_max_open_conns: int = 25
    db_max_idle_conns: int = 5
    db_conn_max_lifetime: int = 3600
    migrate_on_start: bool | None = None
    redis_url: str = ""
    redis_host: str = ""
    redis_port: int = 6379
    redis_password: str = ""
    redis_db: int = 0
    redis_pool_size: int = 10
    redis_min_idle_conns: int = 5
    redis_max_retries: int = 3
    redis_cluster_mode: bool = False
    jwt_secret: str = ""
    jwt_algorithm: str = "HS256"
    jwt_private_key_file: str = ""
    jwt_issuer: str = "otp-server"
    jwt_audience: str = "otp-server"
    jwt_expiry: int = 15 * 60
    jwt_refresh_expiry: int = 30 * 86400
    log_level: str = "info"
    log_format: Literal["json", "text"] = "json"
    # One log line per request from the server (uvicorn's access log); metrics and request ids
    # cover requests without it, so it is off unless asked for.
    access_log: bool = False
    cors_allowed_origins: str = "http://localhost:3000,http://localhost:8080"
    cors_allowed_methods: str = "GET,POST,PUT,PATCH,DELETE,OPTIONS"
    cors_allowed_headers: str = "Content-Type,Authorization,X-Requested-With,X-Request-ID"
    metrics_enabled: bool = True
    metrics_endpoint: str = "/metrics"
    otp_expiry: int = 120
    otp_length: int = 6
    otp_code_charset: str = "0123456789"
    otp_redis_key_prefix: str = "otp"
    otp_max_attempts: int = 5
    otp_max_failed_per_phone: int = 10
    otp_failed_window: int = 3600
    otp_hmac_secret: str = ""
    otp_sender: Literal["console", "memory", "webhook"] = "console"
    sms_webhook_url: str = ""
    sms_webhook_secret: str = ""
    otp_sms_template: str = "Your sign-in code is {code}. It expires in {minutes} min."
    otp_test_phone_numbers: str = ""
    otp_test_phone_numbers_valid_until: str = ""
    otp_allowed_countries: str = ""
    otp_country_hourly_limit: int = 0
    otp_admin_phone_numbers: str = ""
    events_enabled: bool = True
    events_redis_channel: str = "events"
    events_batch_size: int = 100
    events_flush_interval: int = 5
    events_webhook_url: str = ""
    events_webhook_secret: str = ""
    rate_limit_global_requests: int = 100
    rate_limit_global_duration: int = 60
    rate_limit_auth_requests: int = 20
    rate_limit_auth_duration: int = 60
    rate_limit_otp_requests: int = 3
    rate_limit_otp_duration: int = 600
    rate_limit_user_requests: int = 50
    rate_limit_user_duration: int = 60
    trusted_proxies: str = ""

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, dotenv: str | Path | None = ".env"
    ) -> Settings:
        """Settings from ``environ`` (default ``os.environ``) over a ``.env`` file if present."""
        values: dict[str, str] = {}
        if dotenv is not None and Path(dotenv).is_file():
            values.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
        values.update(os.environ if environ is None else environ)
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> Settings:
        fields: dict[str, Any] = {}
        for name in cls.__struct_fields__:
            raw = values.get(name.upper())
            if raw is None or raw == "":
                continue
            try:
                fields[name] = parse_duration(raw) if name in _DURATIONS else raw
            except ValueError as exc:
                raise SettingsError(f"{name.upper()}: {exc}") from None
        try:
            return msgspec.convert(fields, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise SettingsError(_env_name(str(exc))) from None

    def __post_init__(self) -> None:
        self.check()

    @property
    def is_production(self) -> bool:
        return self.environment.lower() in {"production", "prod"}

    @property
    def storage(self) -> str:
        """Where users and sessions live: DATABASE_URL wins over DB_PROVIDER."""
        if self.database_url.startswith(("postgres://", "postgresql://")):
            return "postgres"
        return self.db_provider

    @property
    def uses_redis(self) -> bool:
        return bool(self.redis_url or self.redis_host)

    @property
    def postgres_dsn(self) -> str:
        """DATABASE_URL, else the seed's POSTGRES_* variables as a connection URL."""
        if self.database_url:
            return self.database_url
        user = quote(self.postgres_user, safe="")
        password = quote(self.postgres_password, safe="")
        return (
            f"postgresql://{user}:{password}@{self.postgres_host}:{self.postgres_port}/"
            f"{quote(self.postgres_db, safe='')}?sslmode={quote(self.postgres_ssl_mode, safe='')}"
        )

    @property
    def redis_location(self) -> str:
        """REDIS_URL, else the seed's REDIS_* variables as a URL."""
        if self.redis_url:
            return self.redis_url
        auth = f":{quote(self.redis_password, safe='')}@" if self.redis_password else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def fast_store(self) -> str:
        """Where codes, limits and events live: "redis" when configured, else "memory"."""
        return "redis" if self.uses_redis else "memory"

    @property
    def event_forwarding(self) -> Literal["webhook", "off"]:
        """Whether each process forwards the event stream to EVENTS_WEBHOOK_URL."""
        return "webhook" if self.events_webhook_url else "off"

    @property
    def should_migrate_on_start(self) -> bool:
        return (not self.is_production) if self.migrate_on_start is None else self.migrate_on_start

    def test_codes(self) -> dict[str, str]:
        """The configured test numbers and their fixed codes (see test_codes_until)."""
        codes: dict[str, str] = {}
        for item in _csv(self.otp_test_phone_numbers):
            phone, sep, code = item.partition("=")
            if not sep:
                raise SettingsError(f"OTP_TEST_PHONE_NUMBERS: expected NUMBER=CODE, got {item!r}")
            codes[well_formed_e164(phone)] = code.strip()
        return codes

    @property
    def test_numbers_valid_until(self) -> date | None:
        if not self.otp_test_phone_numbers_valid_until:
            return None
        return date.fromisoformat(self.otp_test_phone_numbers_valid_until)

    @property
    def test_codes_until(self) -> float | None:
        """The epoch second test numbers stop working: the end of their valid-until day (UTC)."""
        until = self.test_numbers_valid_until
        if until is None:
            return None
        return datetime.combine(until + timedelta(days=1), datetime.min.time(), UTC).timestamp()

    @property
    def admin_numbers(self) -> frozenset[str]:
        return frozenset(well_formed_e164(p) for p in _csv(self.otp_admin_phone_numbers))

    @property
    def allowed_countries(self) -> frozenset[str]:
        return frozenset(c.upper() for c in _csv(self.otp_allowed_countries))

    @property
    def cors_origins(self) -> tuple[str, ...]:
        return _csv(self.cors_allowed_origins)

    @property
    def cors_methods(self) -> tuple[str, ...]:
        return _csv(self.cors_allowed_methods)

    @property
    def cors_headers(self) -> tuple[str, ...]:
        return _csv(self.cors_allowed_headers)

    @property
    def trusted_proxy_networks(self) -> tuple[str, ...]:
        return _csv(self.trusted_proxies)

    def code_hmac_key(self) -> bytes:
        """The key codes are stored under: OTP_HMAC_SECRET, else derived from JWT_SECRET."""
        if self.otp_hmac_secret:
            return self.otp_hmac_secret.encode()
        return hmac.new(self.jwt_secret.encode(), b"otp-code-digest", hashlib.sha256).digest()

    def with_dev_secret(self) -> Settings:
        """Development without JWT_SECRET: a random one for this process (and its workers)."""
        if self.jwt_secret or self.is_production:
            return self
        return msgspec.structs.replace(self, jwt_secret=secrets.token_urlsafe(32))

    def check(self) -> None:
        """Refuse settings that would run insecurely or not at all, saying why."""
        problems: list[str] = []
        if not 4 <= self.otp_length <= 10:
            problems.append("OTP_LENGTH must be between 4 and 10")
        if len(set(self.otp_code_charset)) < 2:
            problems.append("OTP_CODE_CHARSET needs at least two distinct characters")
        if self.jwt_algorithm not in SUPPORTED_ALGORITHMS:
            problems.append(f"JWT_ALGORITHM must be one of {', '.join(SUPPORTED_ALGORITHMS)}")
        if self.jwt_algorithm != "HS256" and not self.jwt_private_key_file:
            problems.append(f"JWT_PRIVATE_KEY_FILE is required with JWT_ALGORITHM={self.jwt_algorithm}")
        for name in (
            "otp_max_attempts",
            "otp_max_failed_per_phone",
            "jwt_expiry",
            "otp_expiry",
            "events_batch_size",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name.upper()} must be positive")
        for kind in ("global", "auth", "otp", "user"):
            if getattr(self, f"rate_limit_{kind}_requests") < 1:
                problems.append(f"RATE_LIMIT_{kind.upper()}_REQUESTS must be positive")
        try:
            test_codes = self.test_codes()
            self.admin_numbers  # noqa: B018 - parsed for its errors
            until = self.test_numbers_valid_until
        except (ValueError, SettingsError) as exc:
            problems.append(str(exc))
            test_codes, until = {}, None
        for phone, code in test_codes.items():
            if len(code) != self.otp_length or any(c not in self.otp_code_charset for c in code):
                problems.append(
                    f"OTP_TEST_PHONE_NUMBERS: the code of {phone} must be {self.otp_length} "
                    "characters of OTP_CODE_CHARSET"
                )
        if self.otp_sender == "webhook":
            problems += _webhook_problems("SMS", self.sms_webhook_url, self.sms_webhook_secret)
        if self.events_webhook_url or self.events_webhook_secret:
            problems += _webhook_problems("EVENTS", self.events_webhook_url, self.events_webhook_secret)
            if not self.uses_redis:
                problems.append("EVENTS_WEBHOOK_URL needs REDIS_URL: events are forwarded from its stream")
        if self.is_production:
            problems += self._production_problems(test_codes, until)
        if problems:
            raise SettingsError("; ".join(problems))

    def _production_problems(self, test_codes: dict[str, str], until: date | None) -> list[str]:
        problems = []
        if self.jwt_algorithm == "HS256" and len(self.jwt_secret.encode()) < 32:
            problems.append("JWT_SECRET must be set and at least 32 bytes in production")
        if self.otp_sender != "webhook":
            problems.append(
                f"OTP_SENDER={self.otp_sender} delivers no SMS (console prints codes to the log); "
                "use OTP_SENDER=webhook in production"
            )
        if test_codes:
            today = datetime.now(UTC).date()
            if until is None:
                problems.append(
                    "OTP_TEST_PHONE_NUMBERS needs OTP_TEST_PHONE_NUMBERS_VALID_UNTIL in production"
                )
            elif until > today + timedelta(days=90):
                problems.append("OTP_TEST_PHONE_NUMBERS_VALID_UNTIL must be at most 90 days ahead")
        return problems


def _webhook_problems(name: str, url: str, secret: str) -> list[str]:
    """The checks of a signed outbound webhook: ``{name}_WEBHOOK_URL`` and ``_SECRET``."""
    problems = []
    if not url.startswith(("https://", "http://")):
        problems.append(f"{name}_WEBHOOK_URL must be an http:// or https:// URL")
    try:
        WebhookSigner(secret)
    except ValueError as exc:
        problems.append(f"{name}_WEBHOOK_SECRET: {exc}")
    return problems


def _env_name(message: str) -> str:
    # msgspec says "... - at `$.otp_length`"; name the variable the operator sets instead.
    match = re.search(r"`\$\.(\w+)`", message)
    if not match:
        return message
    return f"{match.group(1).upper()}: {message.split(' - at ')[0]}"
