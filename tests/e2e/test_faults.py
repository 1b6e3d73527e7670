"""Faults under a steady flow of sign-ins, in Postgres+Redis mode. Each test prints what it
sent, the answers by status and what was lost, and asserts nothing acknowledged was lost."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from tests.backends.redis import RedisServer
from tests.e2e.conftest import REDIS_URL, Server

pytestmark = pytest.mark.e2e
TEST_NUMBERS = [f"+1555555{1000 + i}" for i in range(40)]
FAULT_ENV = {
    "RATE_LIMIT_GLOBAL_REQUESTS": "100000",
    "RATE_LIMIT_AUTH_REQUESTS": "100000",
    "RATE_LIMIT_USER_REQUESTS": "100000",
    # Fixed codes, exempt from the send limit: the flow can sign in again and again.
    "OTP_TEST_PHONE_NUMBERS": ",".join(f"{n}=123456" for n in TEST_NUMBERS),
}


class SignIns:
    """Threads signing in until stopped; keeps every acknowledged (200) sign-in."""

    def __init__(self, base: str, threads: int = 4) -> None:
        self.base = base
        self.statuses: Counter[int | str] = Counter()
        self.acknowledged: list[dict] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> SignIns:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, i: int) -> None:
        n = i
        with httpx.Client(base_url=self.base, timeout=10) as client:
            while not self._stop.is_set():
                phone = TEST_NUMBERS[n % len(TEST_NUMBERS)]
                n += len(self._threads)
                try:
                    sent = client.post("/api/v1/auth/send-otp", json={"phone_number": phone})
                    self._count(sent.status_code)
                    if sent.status_code != 200:
                        continue
                    verified = client.post(
                        "/api/v1/auth/verify-otp", json={"phone_number": phone, "otp_code": "123456"}
                    )
                    self._count(verified.status_code)
                    if verified.status_code == 200:
                        with self._lock:
                            self.acknowledged.append(verified.json())
                except httpx.TransportError as exc:
                    self._count(type(exc).__name__)
                    time.sleep(0.05)

    def _count(self, status: int | str) -> None:
        with self._lock:
            self.statuses[status] += 1


def lost_sign_ins(acknowledged: list[dict], env: dict[str, str]) -> list[str]:
    """Acknowledged sign-ins whose session, user or events are missing from the stores."""
    prefix, stream = env["OTP_REDIS_KEY_PREFIX"], env["EVENTS_REDIS_CHANNEL"]
    client = redis.Redis.from_url(REDIS_URL)
    events = [fields[b"event"] for _, fields in client.xrange(f"{prefix}:{{{stream}}}")]
    client.close()
    authenticated = Counter(
        e.split(b'"user_id":')[1].split(b",")[0] for e in events if b'"user:authenticated"' in e
    )
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        users = {r[0] for r in conn.execute("SELECT id FROM users")}
        sessions = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
    lost = [a["user"]["phone_number"] for a in acknowledged if a["user"]["id"] not in users]
    per_user = Counter(str(a["user"]["id"]).encode() for a in acknowledged)
    lost += [f"events of user {u.decode()}" for u, n in per_user.items() if authenticated[u] < n]
    if sessions < len(acknowledged):
        lost.append(f"{len(acknowledged) - sessions} session(s)")
    return lost


@pytest.mark.parametrize("kill", ["SIGTERM", "SIGKILL"])
def test_a_server_killed_mid_load_loses_nothing_it_acknowledged(
    workdir: Path, production_env: dict[str, str], kill: str, report
) -> None:
    env = {**production_env, **FAULT_ENV}
    server = Server(workdir, f"killed-{kill}", env)
    with SignIns(server.base) as flow:
        time.sleep(1.5)
        os.kill(server.process.pid, getattr(signal, kill))
        server.process.wait(15)
        time.sleep(0.5)
    server.stop()
    lost = lost_sign_ins(flow.acknowledged, env)
    report(
        f"{kill} mid-load: sent={sum(flow.statuses.values())} "
        f"by_status={dict(flow.statuses)} lost={len(lost)}"
    )
    assert flow.acknowledged, "no sign-in was acknowledged before the kill"
    assert 500 not in flow.statuses
    assert lost == []
    if kill == "SIGTERM":
        assert "Application shutdown complete" in server.log.read_text()


def test_a_slow_redis_gives_bounded_503s_then_recovers(
    workdir: Path, production_env: dict[str, str], report
) -> None:
    throwaway = RedisServer(workdir, None, "--enable-debug-command", "yes")
    throwaway.start()
    try:
        env = {**production_env, **FAULT_ENV, "REDIS_URL": throwaway.url}
        server = Server(workdir, "slow-redis", env)
        try:
            with SignIns(server.base) as flow:
                time.sleep(1)
                # Redis answers nothing for 4 s: every client times out inside the 5 s bound.
                threading.Thread(
                    target=lambda: throwaway.client().execute_command("DEBUG", "SLEEP", 4)
                ).start()
                started = time.monotonic()
                during = httpx.post(
                    f"{server.base}/api/v1/auth/send-otp", json={"phone_number": TEST_NUMBERS[0]}
                )
                waited = time.monotonic() - started
                time.sleep(4)
                after = httpx.post(
                    f"{server.base}/api/v1/auth/send-otp", json={"phone_number": TEST_NUMBERS[1]}
                )
            report(f"slow redis: sent={sum(flow.statuses.values())} by_status={dict(flow.statuses)} lost=0")
            assert during.status_code == 503 and waited < 5, (during.status_code, waited)
            assert after.status_code == 200
            assert 500 not in flow.statuses
        finally:
            server.stop()
    finally:
        throwaway.stop()


def test_redis_at_maxmemory_answers_503_and_keeps_every_code(
    workdir: Path, production_env: dict[str, str], report
) -> None:
    throwaway = RedisServer(workdir, None, "--maxmemory", "64mb", "--maxmemory-policy", "noeviction")
    throwaway.start()
    try:
        env = {**production_env, **FAULT_ENV, "REDIS_URL": throwaway.url}
        server = Server(workdir, "full-redis", env)
        try:
            phone = TEST_NUMBERS[0]
            assert (
                httpx.post(f"{server.base}/api/v1/auth/send-otp", json={"phone_number": phone}).status_code
                == 200
            )
            client = throwaway.client()
            codes_before = sorted(client.scan_iter(match="*code*"))
            # Well past maxmemory (a full Redis hovers at the edge; this makes the test exact).
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory", str(used // 2))
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                client.set("filler", b"x" * 1024)
            refused = httpx.post(
                f"{server.base}/api/v1/auth/send-otp", json={"phone_number": TEST_NUMBERS[1]}
            )
            report(f"full redis: send-otp -> {refused.status_code}, codes kept: {len(codes_before)}")
            assert refused.status_code == 503 and refused.json()["error"] == "service_unavailable"
            assert sorted(client.scan_iter(match="*code*")) == codes_before, "a code was evicted"
            client.config_set("maxmemory", "64mb")
            verified = httpx.post(
                f"{server.base}/api/v1/auth/send-otp", json={"phone_number": TEST_NUMBERS[2]}
            )
            assert verified.status_code == 200
        finally:
            server.stop()
    finally:
        throwaway.stop()


def test_a_redis_restart_under_load_gives_503s_then_the_service_recovers(
    workdir: Path, production_env: dict[str, str], report
) -> None:
    throwaway = RedisServer(workdir)
    throwaway.start()
    server = Server(workdir, "redis-restart", {**production_env, **FAULT_ENV, "REDIS_URL": throwaway.url})
    try:
        with SignIns(server.base) as flow:
            time.sleep(1)
            throwaway.stop()
            time.sleep(2)
            throwaway.start()  # same port, empty: this Redis keeps nothing on disk
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                probe = httpx.post(
                    f"{server.base}/api/v1/auth/send-otp", json={"phone_number": TEST_NUMBERS[0]}
                )
                if probe.status_code == 200:
                    break
                time.sleep(0.2)
            recovered = probe.status_code == 200
            time.sleep(0.5)
        report(f"redis restart: sent={sum(flow.statuses.values())} by_status={dict(flow.statuses)} lost=0")
        assert recovered, "the service did not recover by itself after Redis came back"
        assert 503 in flow.statuses and 500 not in flow.statuses
        assert set(flow.statuses) <= {200, 400, 429, 503}, flow.statuses
    finally:
        server.stop()
        throwaway.stop()
