"""Postgres + Redis deployments: several processes acting as one, stores failing and coming back."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from tests.e2e.conftest import REDIS_URL, VENV_BIN, Server
from tests.faults import CuttableProxy

pytestmark = pytest.mark.e2e
GENEROUS_LIMITS = {
    "RATE_LIMIT_GLOBAL_REQUESTS": "100000",
    "RATE_LIMIT_AUTH_REQUESTS": "100000",
    "RATE_LIMIT_USER_REQUESTS": "100000",
}


def random_phone() -> str:
    return f"+1415555{random.randint(0, 9999):04d}"


def sign_in(server: Server, phone: str, via: Server | None = None) -> dict:
    sent = httpx.post(f"{server.base}/api/v1/auth/send-otp", json={"phone_number": phone}, timeout=10)
    assert sent.status_code == 200, sent.text
    code = server.code_for(phone)
    verified = httpx.post(
        f"{(via or server).base}/api/v1/auth/verify-otp",
        json={"phone_number": phone, "otp_code": code},
        timeout=10,
    )
    assert verified.status_code == 200, verified.text
    return {"code": code, **verified.json()}


@pytest.fixture
def two_servers(workdir: Path, production_env: dict[str, str]):
    env = {**production_env, **GENEROUS_LIMITS}
    first = Server(workdir, "first", env)
    second = Server(workdir, "second", env)
    yield first, second
    first.stop()
    second.stop()


def test_a_code_sent_through_one_instance_verifies_through_the_other(two_servers) -> None:
    first, second = two_servers
    phone = "+14155550123"
    result = sign_in(first, phone, via=second)
    assert result["user"]["phone_number"] == phone
    profile = httpx.get(
        f"{first.base}/api/v1/users/profile", headers={"Authorization": f"Bearer {result['token']}"}
    )
    assert profile.status_code == 200 and profile.json()["id"] == result["user"]["id"]


def test_sends_spread_across_instances_share_one_limit(two_servers) -> None:
    first, second = two_servers
    formats = ["+14155550124", "+1 415 555 0124", "+1 (415) 555-0124", "+1 415-555-0124"]

    def send(i: int) -> int:
        server = (first, second)[i % 2]
        body = {"phone_number": formats[i % len(formats)]}
        return httpx.post(f"{server.base}/api/v1/auth/send-otp", json=body, timeout=10).status_code

    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(send, range(20)))
    assert statuses.count(200) == 3
    assert statuses.count(429) == 17


def test_no_code_or_refresh_token_is_stored_in_plain_text(two_servers, production_env) -> None:
    first, second = two_servers
    secrets = []
    for i in range(3):
        result = sign_in(first, f"+1415555{1000 + i}", via=second)
        secrets += [result["code"], result["refresh_token"]]
    refreshed = httpx.post(
        f"{second.base}/api/v1/auth/refresh", json={"refresh_token": result["refresh_token"]}, timeout=10
    ).json()
    secrets.append(refreshed["refresh_token"])
    httpx.post(f"{first.base}/api/v1/auth/send-otp", json={"phone_number": "+14155552000"}, timeout=10)
    secrets.append(first.code_for("+14155552000"))

    client = redis.Redis.from_url(REDIS_URL)
    prefix = production_env["OTP_REDIS_KEY_PREFIX"]
    stored: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*"):
        stored.append(key)
        kind = client.type(key)
        if kind == b"hash":
            stored += [b for pair in client.hgetall(key).items() for b in pair]
        elif kind == b"zset":
            stored += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            stored += [v for _, fields in client.xrange(key) for v in fields.values()]
        elif kind == b"string":
            stored.append(client.get(key) or b"")
    client.close()
    assert stored, "expected Redis keys after real sends"

    with psycopg.connect(production_env["DATABASE_URL"]) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                stored += [v if isinstance(v, bytes) else str(v).encode() for v in row]

    for secret in secrets:
        needle = secret.encode()
        assert not [value for value in stored if needle in value], f"{secret!r} stored in plain text"


def test_two_migrate_runs_at_once_apply_each_file_once(workdir: Path, production_env) -> None:
    env = {**production_env, "MIGRATE_ON_START": "false"}
    runs = [
        subprocess.Popen(
            [str(VENV_BIN / "otp-server"), "migrate"],
            cwd=workdir,
            env={**__import__("os").environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    files = sorted(p.stem for p in (Path(__file__).parents[2] / "migrations" / "postgres").glob("*.sql"))
    with psycopg.connect(production_env["DATABASE_URL"]) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == files
    applied = sum(int(out.split()[1]) for out, _ in outputs)
    assert applied == len(files)


class Flow:
    """Steady traffic from a few threads; every answer's status and time is kept."""

    def __init__(self, server: Server, token: str) -> None:
        self.server = server
        self.token = token
        self.results: list[tuple[str, int, float]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(4)]

    def __enter__(self) -> Flow:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.server.base, timeout=10) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                # Cached reads may outlive a database outage; a rename always needs the database.
                kind = ("send", "profile", "verify", "rename")[i]
                try:
                    if kind == "send":
                        r = client.post("/api/v1/auth/send-otp", json={"phone_number": random_phone()})
                    elif kind == "profile":
                        r = client.get(
                            "/api/v1/users/profile", headers={"Authorization": f"Bearer {self.token}"}
                        )
                    elif kind == "rename":
                        r = client.put(
                            "/api/v1/users/profile",
                            headers={"Authorization": f"Bearer {self.token}"},
                            json={"name": f"Ada {random.randint(0, 999)}"},
                        )
                    else:
                        r = client.post(
                            "/api/v1/auth/verify-otp",
                            json={"phone_number": random_phone(), "otp_code": "000000"},
                        )
                    status = r.status_code
                except httpx.TimeoutException:
                    status = -1
                self.results.append((kind, status, time.monotonic() - started))
                time.sleep(0.02)

    def by_status(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for _, status, _ in self.results:
            counts[status] = counts.get(status, 0) + 1
        return dict(sorted(counts.items()))


def wait_until_serving(server: Server, token: str, deadline: float) -> float:
    started = time.monotonic()
    while time.monotonic() < deadline:
        sent = httpx.post(
            f"{server.base}/api/v1/auth/send-otp", json={"phone_number": random_phone()}, timeout=10
        )
        profile = httpx.get(
            f"{server.base}/api/v1/users/profile", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        ready = httpx.get(f"{server.base}/health/ready", timeout=10)
        if (sent.status_code, profile.status_code, ready.status_code) == (200, 200, 200):
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError("the service did not recover by itself")


@pytest.mark.parametrize("store", ["redis", "postgres"])
def test_a_store_going_down_gives_503s_and_the_service_recovers_without_restart(
    workdir: Path, production_env: dict[str, str], store: str, report
) -> None:
    if store == "redis":
        host, port = "127.0.0.1", int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
        proxy = CuttableProxy(host, port)
        env = {**production_env, "REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"}
    else:
        proxy = CuttableProxy("127.0.0.1", 5432)
        env = {
            **production_env,
            "DATABASE_URL": production_env["DATABASE_URL"].replace(":5432/", f":{proxy.port}/"),
        }
    server = Server(workdir, f"outage-{store}", {**env, **GENEROUS_LIMITS})
    try:
        token = sign_in(server, "+14155550199")["token"]
        with Flow(server, token) as flow:
            time.sleep(1)
            proxy.cut()
            time.sleep(4)
            during = httpx.get(f"{server.base}/health/ready", timeout=10)
            proxy.restore()
            recovered_in = wait_until_serving(server, token, time.monotonic() + 15)
            time.sleep(0.5)
        by_status = flow.by_status()
        report(f"{store} outage: sent={len(flow.results)} by_status={by_status} lost=0")
        report(f"{store} outage: recovered in {recovered_in:.1f}s without a restart")
        assert during.status_code == 503
        assert during.json()["error"] == "service_unavailable" and store in during.json()["checks"]
        assert during.json()["checks"][store] != "ok"
        assert 500 not in by_status and -1 not in by_status, by_status
        assert set(by_status) <= {200, 400, 401, 403, 429, 503}, by_status
        assert by_status.get(503, 0) > 0, "the outage was not seen"
        slowest = max(elapsed for _, _, elapsed in flow.results)
        assert slowest < 5, f"an answer took {slowest:.1f}s"
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()
        proxy.close()


def test_cluster_mode_shares_codes_and_limits_across_instances(
    workdir: Path, production_env: dict[str, str], redis_cluster: list[str]
) -> None:
    env = {**production_env, **GENEROUS_LIMITS, "REDIS_URL": redis_cluster[0], "REDIS_CLUSTER_MODE": "true"}
    first = Server(workdir, "cluster-first", env)
    second = Server(workdir, "cluster-second", env)
    try:
        result = sign_in(first, "+14155550150", via=second)
        assert result["user"]["phone_number"] == "+14155550150"
        statuses = [
            httpx.post(
                f"{server.base}/api/v1/auth/send-otp", json={"phone_number": "+14155550151"}, timeout=10
            ).status_code
            for server in (first, second, first, second, first)
        ]
        assert statuses == [200, 200, 200, 429, 429]
        ready = httpx.get(f"{second.base}/health/ready", timeout=10).json()
        assert ready["checks"]["redis"] == "ok"
    finally:
        first.stop()
        second.stop()
