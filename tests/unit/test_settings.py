"""Settings from the environment (SPEC §2 Running modes, §4 Configuration)."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from otpcore.domain.codes import CodePolicy
from otpcore.settings import Settings, SettingsError, parse_duration

SECRET = "t" * 40
TODAY = datetime.now(UTC).date()


def env(**values: str) -> Settings:
    return Settings.from_env(values, dotenv=None)


def prod(**values: str) -> dict[str, str]:
    base = {
        "ENVIRONMENT": "production",
        "JWT_SECRET": SECRET,
        "OTP_SENDER": "webhook",
        "SMS_WEBHOOK_URL": "https://sms.example/otp",
        "SMS_WEBHOOK_SECRET": "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0IQ==",
    }
    base.update(values)
    return base


def test_defaults() -> None:
    s = env()
    assert s.server_port == 8080
    assert s.otp_expiry == 120
    assert s.otp_length == 6
    assert s.otp_max_attempts == 5
    assert s.jwt_expiry == 15 * 60  # not the seed's 24000h
    assert s.jwt_refresh_expiry == 30 * 86400
    assert (s.rate_limit_otp_requests, s.rate_limit_otp_duration) == (3, 600)
    assert (s.rate_limit_global_requests, s.rate_limit_global_duration) == (100, 60)
    assert (s.rate_limit_auth_requests, s.rate_limit_auth_duration) == (20, 60)
    assert (s.rate_limit_user_requests, s.rate_limit_user_duration) == (50, 60)
    assert (s.otp_max_failed_per_phone, s.otp_failed_window) == (10, 3600)
    assert s.storage == "sqlite"
    assert not s.is_production


def test_seed_names_and_durations() -> None:
    s = env(
        SERVER_PORT="9090",
        OTP_EXPIRY="2m",
        JWT_EXPIRY="1h",
        JWT_REFRESH_EXPIRY="720h",
        RATE_LIMIT_OTP_REQUESTS="5",
        RATE_LIMIT_OTP_DURATION="10m",
        RATE_LIMIT_GLOBAL_DURATION="1m30s",
        RATE_LIMIT_AUTH_DURATION="90s",
        RATE_LIMIT_USER_DURATION="1h30m",
        OTP_LENGTH="8",
        OTP_MAX_ATTEMPTS="3",
    )
    assert s.server_port == 9090
    assert s.otp_expiry == 120
    assert s.jwt_expiry == 3600
    assert s.jwt_refresh_expiry == 720 * 3600
    assert (s.rate_limit_otp_requests, s.rate_limit_otp_duration) == (5, 600)
    assert s.rate_limit_global_duration == 90
    assert s.rate_limit_auth_duration == 90
    assert s.rate_limit_user_duration == 5400
    assert s.otp_length == 8
    assert s.otp_max_attempts == 3


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("90", 90), ("90s", 90), ("2m", 120), ("1h", 3600), ("30d", 30 * 86400), ("1h30m", 5400)],
)
def test_parse_duration(raw: str, seconds: int) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize("raw", ["true", "True", "TRUE", "1"])
def test_booleans_true(raw: str) -> None:
    s = env(METRICS_ENABLED=raw, REDIS_CLUSTER_MODE=raw, EVENTS_ENABLED=raw)
    assert s.metrics_enabled is True
    assert s.redis_cluster_mode is True
    assert s.events_enabled is True


@pytest.mark.parametrize("raw", ["false", "False", "0"])
def test_booleans_false(raw: str) -> None:
    s = env(METRICS_ENABLED=raw, EVENTS_ENABLED=raw, MIGRATE_ON_START=raw)
    assert s.metrics_enabled is False
    assert s.events_enabled is False
    assert s.should_migrate_on_start is False


def test_empty_values_mean_default() -> None:
    assert env(SERVER_PORT="", OTP_EXPIRY="").server_port == 8080


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SERVER_PORT", "eighty"),
        ("SERVER_PORT", "80.5"),
        ("OTP_EXPIRY", "soon"),
        ("OTP_EXPIRY", "2 minutes"),
        ("OTP_EXPIRY", "-2m"),
        ("JWT_EXPIRY", "15x"),
        ("RATE_LIMIT_OTP_DURATION", "ten minutes"),
        ("RATE_LIMIT_OTP_REQUESTS", "three"),
        ("METRICS_ENABLED", "maybe"),
        ("REDIS_CLUSTER_MODE", "yes please"),
        ("DB_PROVIDER", "mysql"),
        ("OTP_LENGTH", "3"),
        ("OTP_LENGTH", "11"),
        ("OTP_MAX_ATTEMPTS", "0"),
        ("RATE_LIMIT_OTP_REQUESTS", "0"),
        ("JWT_ALGORITHM", "none"),
        ("OTP_CODE_CHARSET", "0"),
        ("LOG_FORMAT", "xml"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        env(**{name: value})
    assert name in str(info.value)


def test_asymmetric_algorithm_needs_a_key_file() -> None:
    with pytest.raises(SettingsError, match="JWT_PRIVATE_KEY_FILE"):
        env(JWT_ALGORITHM="ES256")


def test_test_number_code_must_fit_length_and_charset() -> None:
    with pytest.raises(SettingsError, match="OTP_TEST_PHONE_NUMBERS"):
        env(OTP_TEST_PHONE_NUMBERS="+15555550100=12345")
    with pytest.raises(SettingsError, match="OTP_TEST_PHONE_NUMBERS"):
        env(OTP_TEST_PHONE_NUMBERS="+15555550100=12345a")
    with pytest.raises(SettingsError, match="OTP_TEST_PHONE_NUMBERS"):
        env(OTP_TEST_PHONE_NUMBERS="+15555550100")
    with pytest.raises(SettingsError):
        env(OTP_TEST_PHONE_NUMBERS="not-a-number=123456")


def test_test_numbers_are_parsed_to_e164() -> None:
    s = env(OTP_TEST_PHONE_NUMBERS="+1 555 555 0100=123456, +15555550101=654321")
    assert s.test_codes() == {"+15555550100": "123456", "+15555550101": "654321"}


def test_admin_numbers_are_parsed_to_e164() -> None:
    s = env(OTP_ADMIN_PHONE_NUMBERS="+1 (415) 555-0123,+44 20 7946 0958")
    assert s.admin_numbers == {"+14155550123", "+442079460958"}
    with pytest.raises(SettingsError):
        env(OTP_ADMIN_PHONE_NUMBERS="4155550123")


def test_allowed_countries_are_upper_case_iso_codes() -> None:
    assert env(OTP_ALLOWED_COUNTRIES="us, gb").allowed_countries == {"US", "GB"}


# --- production ------------------------------------------------------------------------------


def test_production_with_good_settings_starts() -> None:
    s = Settings.from_env(prod(), dotenv=None)
    assert s.is_production
    assert not s.should_migrate_on_start


@pytest.mark.parametrize("secret", [None, "", "short", "x" * 31])
def test_production_refuses_missing_or_short_jwt_secret(secret: str | None) -> None:
    values = prod()
    if secret is None:
        del values["JWT_SECRET"]
    else:
        values["JWT_SECRET"] = secret
    with pytest.raises(SettingsError, match="JWT_SECRET") as info:
        Settings.from_env(values, dotenv=None)
    assert "32" in str(info.value)


def test_production_accepts_a_32_byte_secret() -> None:
    assert Settings.from_env(prod(JWT_SECRET="x" * 32), dotenv=None).jwt_secret == "x" * 32


def test_production_refuses_the_console_sender() -> None:
    with pytest.raises(SettingsError, match="console") as info:
        Settings.from_env(prod(OTP_SENDER="console"), dotenv=None)
    assert "OTP_SENDER" in str(info.value)


def test_console_is_the_development_default() -> None:
    assert env().otp_sender == "console"
    values = prod()
    del values["OTP_SENDER"]
    with pytest.raises(SettingsError, match="console"):
        Settings.from_env(values, dotenv=None)


def test_production_refuses_test_numbers_without_valid_until() -> None:
    with pytest.raises(SettingsError, match="OTP_TEST_PHONE_NUMBERS_VALID_UNTIL"):
        Settings.from_env(prod(OTP_TEST_PHONE_NUMBERS="+15555550100=123456"), dotenv=None)


def test_production_refuses_valid_until_more_than_90_days_ahead() -> None:
    far = (TODAY + timedelta(days=91)).isoformat()
    with pytest.raises(SettingsError, match="90 days"):
        Settings.from_env(
            prod(
                OTP_TEST_PHONE_NUMBERS="+15555550100=123456",
                OTP_TEST_PHONE_NUMBERS_VALID_UNTIL=far,
            ),
            dotenv=None,
        )


def test_production_accepts_test_numbers_with_a_near_valid_until() -> None:
    near = (TODAY + timedelta(days=30)).isoformat()
    s = Settings.from_env(
        prod(OTP_TEST_PHONE_NUMBERS="+15555550100=123456", OTP_TEST_PHONE_NUMBERS_VALID_UNTIL=near),
        dotenv=None,
    )
    assert s.test_codes() == {"+15555550100": "123456"}


def test_production_lists_every_problem() -> None:
    values = prod(OTP_SENDER="console", OTP_TEST_PHONE_NUMBERS="+15555550100=123456")
    del values["JWT_SECRET"]
    with pytest.raises(SettingsError) as info:
        Settings.from_env(values, dotenv=None)
    message = str(info.value)
    assert "JWT_SECRET" in message
    assert "console" in message
    assert "OTP_TEST_PHONE_NUMBERS_VALID_UNTIL" in message


def test_bad_valid_until_date_is_refused() -> None:
    with pytest.raises(SettingsError):
        env(
            OTP_TEST_PHONE_NUMBERS="+15555550100=123456",
            OTP_TEST_PHONE_NUMBERS_VALID_UNTIL="next tuesday",
        )


def test_development_allows_test_numbers_without_expiry() -> None:
    s = env(OTP_TEST_PHONE_NUMBERS="+15555550100=123456")
    assert s.test_codes() == {"+15555550100": "123456"}


def test_test_numbers_stop_working_after_valid_until() -> None:
    until = date(2030, 1, 31)
    s = env(
        OTP_TEST_PHONE_NUMBERS="+15555550100=123456",
        OTP_TEST_PHONE_NUMBERS_VALID_UNTIL=until.isoformat(),
    )
    end_of_day = datetime(2030, 2, 1, tzinfo=UTC).timestamp()
    assert s.test_codes_until == end_of_day
    policy = CodePolicy(secret=b"k" * 32, test_codes=s.test_codes(), test_codes_until=s.test_codes_until)
    assert policy.test_code("+15555550100", end_of_day - 1) == "123456"
    assert policy.test_code("+15555550100", end_of_day) is None


def test_an_expired_valid_until_turns_test_numbers_off() -> None:
    past = (TODAY - timedelta(days=1)).isoformat()
    s = env(OTP_TEST_PHONE_NUMBERS="+15555550100=123456", OTP_TEST_PHONE_NUMBERS_VALID_UNTIL=past)
    policy = CodePolicy(secret=b"k" * 32, test_codes=s.test_codes(), test_codes_until=s.test_codes_until)
    assert policy.test_code("+15555550100", time.time()) is None


# --- .env file -------------------------------------------------------------------------------


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("SERVER_PORT=7000\nOTP_EXPIRY=5m\n# a comment\nLOG_FORMAT=text\n")
    s = Settings.from_env({}, dotenv=dotenv)
    assert s.server_port == 7000
    assert s.otp_expiry == 300
    assert s.log_format == "text"


def test_environment_wins_over_dotenv(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("SERVER_PORT=7000\nOTP_EXPIRY=5m\n")
    s = Settings.from_env({"SERVER_PORT": "7001"}, dotenv=dotenv)
    assert s.server_port == 7001
    assert s.otp_expiry == 300


def test_missing_dotenv_file_is_fine(tmp_path: Path) -> None:
    assert Settings.from_env({}, dotenv=tmp_path / "absent.env").server_port == 8080


def test_bad_value_in_dotenv_names_the_variable(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("OTP_EXPIRY=whenever\n")
    with pytest.raises(SettingsError, match="OTP_EXPIRY"):
        Settings.from_env({}, dotenv=dotenv)


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVER_PORT", "6123")
    assert Settings.from_env(dotenv=None).server_port == 6123


# --- storage selection -----------------------------------------------------------------------


@pytest.mark.parametrize("url", ["postgresql://u:p@db:5432/otp", "postgres://u:p@db/otp"])
def test_database_url_postgres_selects_postgres(url: str) -> None:
    assert env(DATABASE_URL=url).storage == "postgres"
    # DATABASE_URL wins over DB_PROVIDER.
    assert env(DATABASE_URL=url, DB_PROVIDER="sqlite").storage == "postgres"


def test_db_provider_selects_storage() -> None:
    assert env(DB_PROVIDER="postgres").storage == "postgres"
    assert env(DB_PROVIDER="memory").storage == "memory"
    assert env().storage == "sqlite"


def test_redis_is_used_when_configured() -> None:
    assert not env().uses_redis
    assert env(REDIS_URL="redis://localhost:6379/0").uses_redis
    assert env(REDIS_HOST="redis").uses_redis


def test_code_hmac_key_is_not_the_jwt_secret() -> None:
    s = env(JWT_SECRET=SECRET)
    assert s.code_hmac_key() != SECRET.encode()
    assert len(s.code_hmac_key()) >= 16
    assert env(JWT_SECRET=SECRET, OTP_HMAC_SECRET="h" * 32).code_hmac_key() == b"h" * 32


def test_dev_secret_is_generated_only_outside_production() -> None:
    s = env().with_dev_secret()
    assert len(s.jwt_secret.encode()) >= 32
    assert env().with_dev_secret().jwt_secret != s.jwt_secret
    configured = env(JWT_SECRET=SECRET)
    assert configured.with_dev_secret().jwt_secret == SECRET


@pytest.mark.parametrize("sender", ["console", "memory"])
def test_production_refuses_senders_that_deliver_no_sms(sender: str) -> None:
    with pytest.raises(SettingsError, match=f"OTP_SENDER={sender}"):
        Settings.from_env(prod(OTP_SENDER=sender), dotenv=None)
