"""The benchmark: ``python -m bench`` (or ``make bench``). See bench/README.md for what it measures.

Phases, in one run:

1. setup: a database ``otp_bench_<hex>`` (migrated, then seeded with ``--users`` users by COPY)
   and a Redis key prefix of its own; test numbers with a fixed code in a ``.env`` file;
2. counting: ``otp-server serve`` with its Postgres and Redis connections through counting
   proxies (bench/wire.py); a fixed number of requests per endpoint from a Python client gives
   exact Redis commands and Postgres statements per request;
3. load: ``otp-server serve`` connected directly, the ceiling app (bench/ceiling.py) under the
   same server and worker count, and wrk on each workload, ceiling first and last;
4. search latency at ``--users`` users through the HTTP API, and EXPLAIN of the search SQL;
5. the ceiling under granian, when granian is installed in the venv;
6. teardown: servers stopped, database dropped, Redis keys of the prefix deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from bench import procs, report, seed, wire
from bench.wrkrun import WrkResult, require_wrk, run_wrk

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
VENV_BIN = Path(sys.executable).parent
TEST_CODE = "123456"
TEST_PREFIX = "+1555"  # test numbers: +1555 and seven digits; no seeded random number starts so
# Limits raised so that they never refuse, with a 1 s window: every request still runs the whole
# limiter script (trim, count, add), and the per-IP sorted set holds at most one second of
# requests instead of the 10^5 a 60 s window would collect under load.
RAISED_LIMIT, RAISED_WINDOW = "1000000000", "1s"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=1_000_000, help="users seeded (default 10^6)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    p.add_argument("--count", type=int, default=200, help="requests per endpoint when counting")
    p.add_argument("--profile-users", type=int, default=1000, help="users in the profile mix")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the profile mix")
    p.add_argument("--verify-codes", type=int, default=110_000, help="test numbers for verify-otp (all runs)")
    p.add_argument("--search-samples", type=int, default=100, help="timed searches per kind")
    p.add_argument(
        "--py-spy",
        nargs="?",
        const="send-otp",
        choices=["send-otp", "verify-otp", "profile"],
        help="profile a worker during an extra run of this workload (default send-otp)",
    )
    p.add_argument("--no-granian", action="store_true", help="skip the ceiling under granian")
    p.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--keep-work-dir", action="store_true", help="keep data files and server logs")
    return p.parse_args(argv)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Plan:
    """The numbers each phase uses: test numbers (fixed code) by role, in .env order."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.profile = args.profile_users
        self.count = args.count
        self.verify = args.verify_codes
        total = 1 + self.profile + self.count + self.verify
        if total >= 10_000_000:
            raise SystemExit("bench: too many test numbers")
        self.numbers = [f"{TEST_PREFIX}{i:07d}" for i in range(total)]
        self.admin = self.numbers[0]
        self.profile_numbers = self.numbers[1 : 1 + self.profile]
        self.count_numbers = self.numbers[1 + self.profile : 1 + self.profile + self.count]
        self.verify_numbers = self.numbers[1 + self.profile + self.count :]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.plan = Plan(args)
        self.work = Path(tempfile.mkdtemp(prefix="otp-bench-"))
        self.prefix = f"otpbench{secrets.token_hex(4)}"
        self.db_name: str | None = None
        self.db_url = ""
        self.servers: list[procs.Server] = []
        self.results: dict[str, Any] = {}
        self.rng = random.Random(2024)
        self.redis = redis.Redis.from_url(args.redis_url)

    # -- environment ---------------------------------------------------------------------------

    def server_env(self, database_url: str, redis_url: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
        env.update(
            {
                "ENVIRONMENT": "development",
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_url,
                "OTP_REDIS_KEY_PREFIX": self.prefix,
                "JWT_SECRET": self.jwt_secret,
                "MIGRATE_ON_START": "false",
                "OTP_SENDER": "memory",
                # Codes primed for verify-otp must outlive priming, counting and the run.
                "OTP_EXPIRY": "15m",
                "OTP_ADMIN_PHONE_NUMBERS": self.plan.admin,
                "PYTHONUNBUFFERED": "1",
            }
        )
        for kind in ("GLOBAL", "AUTH", "USER"):
            env[f"RATE_LIMIT_{kind}_REQUESTS"] = RAISED_LIMIT
            env[f"RATE_LIMIT_{kind}_DURATION"] = RAISED_WINDOW
        return env

    def write_dotenv(self) -> None:
        # Thousands of test numbers exceed the 128 KiB limit of one environment variable, so
        # they go in the .env file that Settings.from_env reads from the server's directory.
        codes = ",".join(f"{n}={TEST_CODE}" for n in self.plan.numbers)
        (self.work / ".env").write_text(f"OTP_TEST_PHONE_NUMBERS={codes}\n")

    def start_otp_server(self, name: str, env: dict[str, str]) -> procs.Server:
        port = procs.free_port()
        argv = [str(VENV_BIN / "otp-server"), "serve", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--workers", str(self.args.workers)]
        server = procs.Server(
            name,
            argv,
            port=port,
            env=env,
            cwd=self.work,
            log_dir=self.work,
            expected_workers=self.args.workers,
        )
        self.servers.append(server)
        server.wait_ready()
        return server

    def start_ceiling(self, kind: str) -> procs.Server:
        port = procs.free_port()
        argv = [sys.executable, "-m", "bench.ceiling", "--server", kind, "--port", str(port)]
        argv += ["--workers", str(self.args.workers)]
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
        env["PYTHONPATH"] = str(ROOT)
        server = procs.Server(
            f"ceiling-{kind}",
            argv,
            port=port,
            env=env,
            cwd=ROOT,
            log_dir=self.work,
            ready_path="/",
            expected_workers=self.args.workers,
        )
        self.servers.append(server)
        server.wait_ready()
        return server

    def stop(self, server: procs.Server) -> None:
        server.stop()
        self.servers.remove(server)

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        self.jwt_secret = secrets.token_urlsafe(48)
        self.results["meta"] = machine_info(args)
        self.results["meta"]["redis_prefix"] = self.prefix
        self.setup_database()
        self.write_dotenv()
        self.counting_phase()
        self.load_phase()
        if not args.no_granian:
            self.granian_phase()
        self.results["targets"] = report.targets(self.results)

    def setup_database(self) -> None:
        self.db_name, self.db_url = seed.create_database(self.args.pg_url)
        self.results["meta"]["database"] = self.db_name
        log(f"database {self.db_name}, Redis prefix {self.prefix}, work dir {self.work}")
        env = self.server_env(self.db_url, self.args.redis_url)
        migrate = subprocess.run(
            [str(VENV_BIN / "otp-server"), "migrate"],
            cwd=self.work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"otp-server migrate failed: {migrate.stderr}")
        log(f"seeding {self.args.users} users with COPY")
        timings = seed.seed_users(
            self.db_url,
            total=max(self.args.users, len(self.plan.numbers)),
            first_phones=self.plan.numbers,
            admin_phone=self.plan.admin,
            avoid_prefix=TEST_PREFIX,
        )
        self.results["seed"] = {k: round(v, 1) for k, v in timings.items()}
        log(f"seeded: {self.results['seed']}")

    # -- counting --------------------------------------------------------------------------------

    def counting_phase(self) -> None:
        pg = urllib.parse.urlsplit(self.args.pg_url)
        rd = urllib.parse.urlsplit(self.args.redis_url)
        with wire.Proxies(redis_port=rd.port or 6379, pg_port=pg.port or 5432) as proxies:
            user = pg.username or "postgres"
            db_url = f"postgresql://{user}@127.0.0.1:{proxies.pg.port}/{self.db_name}?sslmode=disable&gssencmode=disable"
            redis_url = f"redis://127.0.0.1:{proxies.redis.port}{rd.path or '/0'}"
            xact_before = self.xact_count()
            log("counting phase: otp-server through counting proxies")
            server = self.start_otp_server("otp-counting", self.server_env(db_url, redis_url))
            try:
                counts = asyncio.run(self.count_requests(server.url, proxies))
            finally:
                self.stop(server)
            total = proxies.pg.snapshot()
            xact_after = self.xact_count()
        counts["_phase"] = {
            "pg_wire_totals": dict(total),
            "pg_xact_commit_rollback_delta": xact_after - xact_before,
        }
        self.results["counts"] = counts

    def xact_count(self) -> int:
        with psycopg.connect(self.args.pg_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (self.db_name,)
            ).fetchone()
        return int(row[0]) if row else 0

    async def count_requests(self, base: str, proxies: wire.Proxies) -> dict[str, Any]:
        n = self.args.count
        out: dict[str, Any] = {}
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:

            async def measure(
                name: str, requests: list[tuple[str, str, dict[str, Any]]]
            ) -> list[httpx.Response]:
                await asyncio.sleep(0.3)
                r0, p0 = proxies.redis.snapshot(), proxies.pg.snapshot()
                responses = [await client.request(m, path, **kw) for m, path, kw in requests]
                await asyncio.sleep(0.5)  # work a response does not wait for (deliveries)
                r1, p1 = proxies.redis.snapshot(), proxies.pg.snapshot()
                redis_cmds = r1 - r0
                pg = p1 - p0
                # redis-py's PING health check of a connection idle for 10 s is not per request.
                counted = sum(v for k, v in redis_cmds.items() if k != "PING")
                out[name] = {
                    "requests": len(requests),
                    "ok": sum(1 for r in responses if r.status_code < 400),
                    "redis_cmds_per_req": round(counted / len(requests), 2),
                    "redis_by_command": {
                        k: round(v / len(requests), 2) for k, v in sorted(redis_cmds.items())
                    },
                    "pg_statements_per_req": round(pg["statements"] / len(requests), 2),
                    "pg_checks_per_req": round(pg["checks"] / len(requests), 2),
                    "pg_round_trips_per_req": round(pg["round_trips"] / len(requests), 2),
                }
                return responses

            def send(phone: str) -> tuple[str, str, dict[str, Any]]:
                return ("POST", "/api/v1/auth/send-otp", {"json": {"phone_number": phone}})

            def verify(phone: str) -> tuple[str, str, dict[str, Any]]:
                return (
                    "POST",
                    "/api/v1/auth/verify-otp",
                    {"json": {"phone_number": phone, "otp_code": TEST_CODE}},
                )

            def do(request: tuple[str, str, dict[str, Any]]) -> Any:
                return client.request(request[0], request[1], **request[2])

            fresh = (f"+1650{2_000_000 + i}" for i in range(10 * n + 100))
            for _ in range(20):  # warm-up: connections, scripts loaded
                await do(send(next(fresh)))
            await measure("send-otp", [send(next(fresh)) for _ in range(n)])

            numbers = self.plan.count_numbers
            warm, counted = numbers[: n // 5], numbers[n // 5 :]
            for phone in numbers:
                r = await client.post("/api/v1/auth/send-otp", json={"phone_number": phone})
                r.raise_for_status()
            tokens = [(await do(verify(p))).json()["token"] for p in warm]
            responses = await measure("verify-otp", [verify(p) for p in counted])
            tokens += [r.json()["token"] for r in responses if r.status_code == 200]

            def profile(token: str) -> tuple[str, str, dict[str, Any]]:
                return ("GET", "/api/v1/users/profile", {"headers": {"Authorization": f"Bearer {token}"}})

            for token in tokens:  # the first read of each user fills the caches
                await do(profile(token))
            await measure("profile", [profile(t) for t in tokens])

            admin = await self.sign_in(client, self.plan.admin)
            paths = self.search_paths(kinds=("name", "phone"), per_kind=max(10, n // 20))
            for path in paths[:5]:
                await client.get(path, headers={"Authorization": f"Bearer {admin}"})
            await measure(
                "search", [("GET", p, {"headers": {"Authorization": f"Bearer {admin}"}}) for p in paths]
            )
        return out

    async def sign_in(self, client: httpx.AsyncClient, phone: str) -> str:
        (await client.post("/api/v1/auth/send-otp", json={"phone_number": phone})).raise_for_status()
        r = await client.post("/api/v1/auth/verify-otp", json={"phone_number": phone, "otp_code": TEST_CODE})
        r.raise_for_status()
        return str(r.json()["token"])

    # -- search queries --------------------------------------------------------------------------

    def search_queries(self, kind: str, count: int) -> list[dict[str, Any]]:
        rng = random.Random(f"{kind}-{count}")
        queries: list[dict[str, Any]] = []
        for _ in range(count):
            if kind == "name":
                word = rng.choice(seed.FIRST + seed.LAST)
                length = rng.randint(3, max(3, min(6, len(word))))
                start = rng.randint(0, max(0, len(word) - length))
                text = word[start : start + length]
                queries.append({"query": rng.choice([text, text.lower(), text.upper()])})
            elif kind == "phone":
                length = rng.randint(4, 7)
                queries.append({"query": "".join(rng.choice("0123456789") for _ in range(length))})
            else:  # "empty, deep after_id"
                users = max(self.args.users, len(self.plan.numbers))
                queries.append({"query": "", "after_id": rng.randint(int(users * 0.9), users)})
        return queries

    def search_paths(self, kinds: tuple[str, ...], per_kind: int) -> list[str]:
        paths = []
        for kind in kinds:
            for q in self.search_queries(kind, per_kind):
                paths.append("/api/v1/users/search?" + urllib.parse.urlencode({**q, "limit": 10}))
        random.Random(1).shuffle(paths)
        return paths

    # -- load --------------------------------------------------------------------------------------

    def wrk(
        self, url: str, workload: str, args: list[str] | None = None, duration: float | None = None
    ) -> WrkResult:
        before = self.commandstats()
        result = run_wrk(
            url,
            workload,
            duration=duration or self.args.duration,
            threads=self.args.threads,
            connections=self.args.connections,
            args=args,
            work_dir=self.work,
        )
        after = self.commandstats()
        if result.requests:
            delta = sum(after.values()) - sum(before.values())
            result.redis_calls_all = round(delta / result.requests, 2)  # type: ignore[attr-defined]
        return result

    def commandstats(self) -> Counter[str]:
        stats = self.redis.info("commandstats")
        return Counter({k: int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info",)})

    def load_phase(self) -> None:
        args = self.args
        env = self.server_env(self.db_url, args.redis_url)
        log("load phase: otp-server and the ceiling")
        server = self.start_otp_server("otp-load", env)
        ceiling = self.start_ceiling("uvicorn")
        runs: dict[str, Any] = {}
        ceilings: list[WrkResult] = []

        def measure_ceiling() -> None:
            # Before and after every workload: each workload is compared with the mean of the
            # two ceiling runs around it, so drift on a shared machine cancels out.
            ceilings.append(self.wrk(ceiling.url + "/", "ceiling"))
            log(f"ceiling: {ceilings[-1].rps} req/s")

        try:
            self.wrk(ceiling.url + "/", "ceiling", duration=2)  # warm-up
            self.wrk(server.url, "send_otp", ["510", str(args.threads)], duration=2)
            measure_ceiling()

            runs["send-otp"] = self.wrk(server.url, "send_otp", ["628", str(args.threads)])
            log(f"send-otp: {runs['send-otp'].rps} req/s")
            # The profiled runs are extra ones: the sampler takes CPU, so they are not measured.
            if args.py_spy == "send-otp":
                with self.py_spy(server):
                    self.wrk(server.url, "send_otp", ["415", str(args.threads)])
            measure_ceiling()

            runs["verify-otp"] = self.verify_run(server, send_rps=runs["send-otp"].rps)
            log(f"verify-otp: {runs['verify-otp'].rps} req/s")
            if args.py_spy == "verify-otp":
                with self.py_spy(server):
                    self.verify_run(server, send_rps=runs["send-otp"].rps)
            measure_ceiling()

            tokens = asyncio.run(self.obtain_tokens(server.url, self.plan.profile_numbers))
            tokens_file, cdf_file = self.work / "tokens.txt", self.work / "cdf.txt"
            tokens_file.write_text("\n".join(tokens) + "\n")
            cdf_file.write_text("\n".join(f"{p:.9f}" for p in zipf_cdf(len(tokens), args.zipf)) + "\n")
            workers = server.workers()
            before = procs.get_from_each_worker(server.port, "/metrics", workers)
            runs["profile"] = self.wrk(server.url, "profile", [str(tokens_file), str(cdf_file)])
            after = procs.get_from_each_worker(server.port, "/metrics", workers)
            self.results["user_cache"] = cache_ratio(before, after)
            log(f"profile: {runs['profile'].rps} req/s, cache {self.results['user_cache'].get('hit_ratio')}")
            if args.py_spy == "profile":
                with self.py_spy(server):
                    self.wrk(server.url, "profile", [str(tokens_file), str(cdf_file)])
            measure_ceiling()

            admin = asyncio.run(self.obtain_tokens(server.url, [self.plan.admin]))[0]
            paths_file = self.work / "search-paths.txt"
            paths_file.write_text("\n".join(self.search_paths(("name", "phone"), 100)) + "\n")
            runs["search"] = self.wrk(server.url, "search", [str(paths_file), admin])
            log(f"search: {runs['search'].rps} req/s")
            measure_ceiling()

            self.results["rss_kib"] = {
                "otp-server": {str(pid): procs.memory_kib(pid) for pid in server.workers()},
                "ceiling": {str(pid): procs.memory_kib(pid) for pid in ceiling.workers()},
            }
            self.results["search_latency"] = asyncio.run(self.time_searches(server.url, admin))
            self.results["explain"] = self.explain_searches()
        finally:
            for s in (server, ceiling):
                self.stop(s)
        load = {k: v.as_dict() | extra(v) for k, v in runs.items()}
        for i, name in enumerate(load):
            around = ceilings[i : i + 2]
            load[name]["ceiling_around"] = {
                k: round(sum(getattr(c, k) for c in around) / len(around), 3)
                for k in ("rps", "p50_ms", "p99_ms")
            }
        self.results["ceiling_runs"] = [c.as_dict() for c in ceilings]
        self.results["load"] = load
        self.results["server"] = {"otp-server": "uvicorn (otp-server serve)", "ceiling": "uvicorn"}
        self.results["uvicorn"] = uvicorn_impl()

    def verify_run(self, server: procs.Server, send_rps: float) -> WrkResult:
        """verify-otp of existing users with the right code: codes are sent first (test numbers,
        fixed code), then each is verified once. A short trial run sizes the real one."""
        args, numbers = self.args, list(self.plan.verify_numbers)
        primed = 0

        def prime(count: int) -> Path:
            nonlocal primed
            batch = [numbers.pop() for _ in range(min(count, len(numbers)))]
            path = self.work / f"verify-{len(numbers)}.txt"
            path.write_text("\n".join(batch) + "\n")
            primed = len(batch)
            # wrk runs for its whole -d even when every thread is done: bound it by the rate.
            seconds = min(120, 2 + math.ceil(2 * len(batch) / max(send_rps, 100)))
            sent = self.wrk(
                server.url, "listed", ["send", str(path), str(args.threads), TEST_CODE], duration=seconds
            )
            if sent.ran_out_threads < args.threads:
                log("warning: priming did not finish in time; some verify-otp codes are missing")
            return path

        # A verification does all a send does and more, so codes for the send rate cannot run
        # out during the trial: a trial that runs out understates the rate it sizes the run by.
        trial_seconds = 2
        trial_codes = prime(math.ceil(send_rps * trial_seconds) + 500)
        trial = self.wrk(
            server.url,
            "listed",
            ["verify", str(trial_codes), str(args.threads), TEST_CODE],
            duration=trial_seconds,
        )
        if trial.ran_out_threads:
            log("warning: the verify-otp trial ran out of codes; the run may too")
        # The trial starts cold: leave a margin (a run that runs out says so).
        want = math.ceil(1.5 * trial.rps * args.duration) + 1000
        if want > len(numbers):
            log(f"warning: verify-otp may need {want} codes, only {len(numbers)} left; raise --verify-codes")
        path = prime(want)
        log(f"primed {primed} codes for verify-otp (trial: {trial.rps} req/s)")
        result = self.wrk(server.url, "listed", ["verify", str(path), str(args.threads), TEST_CODE])
        if result.ran_out_threads:
            log("warning: verify-otp ran out of codes before the end (its req/s is understated)")
        return result

    async def obtain_tokens(self, base: str, phones: list[str]) -> list[str]:
        gate = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:

            async def one(phone: str) -> str:
                async with gate:
                    return await self.sign_in(client, phone)

            return list(await asyncio.gather(*(one(p) for p in phones)))

    async def time_searches(self, base: str, admin: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        headers = {"Authorization": f"Bearer {admin}"}
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as client:
            for _ in range(3):
                await client.get("/api/v1/users/search", params={"query": "warm"})
            for kind in ("name", "phone", "empty"):
                samples, totals = [], []
                for q in self.search_queries(kind, self.args.search_samples):
                    started = time.perf_counter()
                    r = await client.get("/api/v1/users/search", params={**q, "limit": 10})
                    samples.append((time.perf_counter() - started) * 1000)
                    r.raise_for_status()
                    totals.append(r.json()["total"])
                out[kind] = {
                    "n": len(samples),
                    "p50_ms": round(percentile(samples, 50), 2),
                    "p95_ms": round(percentile(samples, 95), 2),
                    "max_ms": round(max(samples), 2),
                    "median_total": statistics.median(totals),
                }
        substring = [out["name"], out["phone"]]
        out["substring_p95_ms"] = max(s["p95_ms"] for s in substring)
        return out

    def explain_searches(self) -> dict[str, Any]:
        from otpcore.adapters import postgres as adapter

        search_sql = getattr(adapter, "_SEARCH", None)
        params_of = getattr(adapter, "_search_params", None)
        if search_sql is None or params_of is None:
            return {"source": "not found: otpcore.adapters.postgres has no _SEARCH/_search_params any more"}
        examples = {
            "name": self.search_queries("name", 1)[0],
            "phone": self.search_queries("phone", 1)[0],
            "empty": self.search_queries("empty", 1)[0],
        }
        # A common 3-character name substring: the worst case of the trigram index (many rows).
        examples["name_common"] = {"query": "son"}
        plans: dict[str, Any] = {"source": "otpcore.adapters.postgres._SEARCH with _search_params (imported)"}
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            for kind, q in examples.items():
                params = params_of(q["query"], 0, 10, q.get("after_id"))
                rows = conn.execute(
                    "EXPLAIN (ANALYZE, BUFFERS) " + search_sql, params, prepare=False
                ).fetchall()
                plan = "\n".join(r[0] for r in rows)
                plans[kind] = {
                    "query": q,
                    "indexes": sorted(set(re.findall(r"(?:Index|Index Only) Scan (?:using|on) (\w+)", plan))),
                    "plan": plan,
                }
        return plans

    # -- py-spy ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def py_spy(self, server: procs.Server) -> Iterator[None]:
        """Samples one worker while the block runs the load; the summary goes to the results."""
        py_spy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
        if py_spy is None:
            log("py-spy not found (.venv/bin/pip install py-spy); not profiling")
            yield
            return
        out = self.work / "py-spy.txt"
        argv = [py_spy, "record", "--nonblocking", "--format", "raw", "-r", "200", "-o", str(out)]
        argv += ["--pid", str(server.workers()[0])]
        spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it has sampled and exits
            spy.wait(timeout=60)
        if not out.exists():
            self.results["py_spy"] = {"error": "py-spy wrote nothing (ptrace not permitted?)"}
            return
        shutil.copy(out, RESULTS / f"py-spy-{self.args.py_spy}.txt")
        self.results["py_spy"] = {"workload": self.args.py_spy, **summarize_py_spy(out.read_text())}

    # -- granian ---------------------------------------------------------------------------------

    def granian_phase(self) -> None:
        if not (VENV_BIN / "granian").exists():
            self.results["granian"] = {"skipped": "granian is not installed in the venv"}
            return
        log("ceiling: granian vs uvicorn, alternating")
        servers = {"uvicorn": self.start_ceiling("uvicorn"), "granian": self.start_ceiling("granian")}
        runs: dict[str, list[WrkResult]] = {"uvicorn": [], "granian": []}
        try:
            for server in servers.values():
                self.wrk(server.url + "/", "ceiling", duration=2)
            for _ in range(2):
                for name, server in servers.items():
                    runs[name].append(self.wrk(server.url + "/", "ceiling"))
                    log(f"ceiling under {name}: {runs[name][-1].rps} req/s")
        finally:
            for server in servers.values():
                self.stop(server)
        mean = {
            k: {m: sum(getattr(r, m) for r in v) / len(v) for m in ("rps", "p50_ms", "p99_ms")}
            for k, v in runs.items()
        }
        self.results["granian"] = {
            "uvicorn": mean["uvicorn"],
            "granian": mean["granian"],
            "runs": {k: [r.as_dict() for r in v] for k, v in runs.items()},
            "rps_vs_uvicorn": round(mean["granian"]["rps"] / mean["uvicorn"]["rps"], 2),
        }

    # -- teardown --------------------------------------------------------------------------------

    def cleanup(self) -> None:
        for server in list(self.servers):
            try:
                self.stop(server)
            except Exception as exc:
                log(f"stopping {server.name}: {exc}")
        if self.db_name:
            try:
                seed.drop_database(self.args.pg_url, self.db_name)
                log(f"dropped database {self.db_name}")
            except Exception as exc:
                log(f"could not drop {self.db_name}: {exc}")
        try:
            deleted = 0
            batch = []
            for key in self.redis.scan_iter(match=f"{self.prefix}:*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += self.redis.unlink(*batch)
                    batch.clear()
            if batch:
                deleted += self.redis.unlink(*batch)
            log(f"deleted {deleted} Redis keys under {self.prefix}:")
        except redis.RedisError as exc:
            log(f"could not delete Redis keys: {exc}")
        if not self.args.keep_work_dir:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"work dir kept: {self.work}")


# -- helpers -------------------------------------------------------------------------------------


def extra(result: WrkResult) -> dict[str, Any]:
    value = getattr(result, "redis_calls_all", None)
    return {} if value is None else {"redis_calls_incl_scripts_per_req": value}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def zipf_cdf(n: int, s: float) -> list[float]:
    weights = [1 / (rank**s) for rank in range(1, n + 1)]
    total, acc, cdf = sum(weights), 0.0, []
    for w in weights:
        acc += w
        cdf.append(acc / total)
    cdf[-1] = 1.0
    return cdf


_METRIC = re.compile(r"^user_cache_total\{([^}]*)\}\s+([0-9.eE+]+)", re.M)


def _cache_counts(text: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for labels, value in _METRIC.findall(text):
        parsed = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        counts[f"{parsed.get('layer')}:{parsed.get('result')}"] += int(float(value))
    return counts


def cache_ratio(before: dict[int, str], after: dict[int, str]) -> dict[str, Any]:
    """Hits (L1 or L2) over lookups, from user_cache_total deltas of each worker over the run."""
    delta: Counter[str] = Counter()
    workers = sorted(set(before) & set(after))
    for pid in workers:
        delta.update(_cache_counts(after[pid]) - _cache_counts(before[pid]))
    if not any("user_cache_total" in body for body in after.values()):
        return {"hit_ratio": None, "note": "n/a: /metrics has no user_cache_total"}
    lookups = delta["l1:hit"] + delta["l1:miss"]
    hits = delta["l1:hit"] + delta["l2:hit"]
    return {
        "hit_ratio": round(hits / lookups, 4) if lookups else None,
        "l1_hit_ratio": round(delta["l1:hit"] / lookups, 4) if lookups else None,
        "counts": dict(delta),
        "workers_seen": len(workers),
    }


def summarize_py_spy(raw: str, top: int = 15) -> dict[str, Any]:
    """From py-spy's collapsed stacks: self time by package, and the functions with the most
    inclusive time below the frames every sample shares (the event loop, the worker)."""
    by_package: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        by_package[_package(frames[-1])] += n
        for frame in set(frames):
            inclusive[_short_frame(frame)] += n
    if not total:
        return {"samples": 0}
    below_base = [(f, v) for f, v in inclusive.most_common() if v < 0.7 * total]
    return {
        "samples": total,
        "self_by_package_pct": [[p, round(100 * v / total, 1)] for p, v in by_package.most_common(top)],
        "top_inclusive_pct": [[f, round(100 * v / total, 1)] for f, v in below_base[:top]],
    }


def _frame_path(frame: str) -> str:
    match = re.search(r"\((.*):\d+\)$", frame)
    return match.group(1) if match else ""


def _package(frame: str) -> str:
    """py-spy names files relative to sys.path: the first component is the package/module."""
    path = _frame_path(frame)
    return path.split("/", 1)[0].removesuffix(".py") if path else frame


def _short_frame(frame: str) -> str:
    return re.sub(r":\d+\)$", ")", frame)


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "users": max(args.users, 1 + args.profile_users + args.count + args.verify_codes),
        "workers": args.workers,
        "wrk": f"-t{args.threads} -c{args.connections} -d{args.duration:g}s",
        "count_requests": args.count,
        "zipf": args.zipf,
        "profile_users": args.profile_users,
    }


def uvicorn_impl() -> dict[str, str]:
    import importlib.util

    return {
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_wrk()
    RESULTS.mkdir(exist_ok=True)
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.cleanup()
    (RESULTS / "latest.json").write_text(json.dumps(bench.results, indent=2, default=str) + "\n")
    table = report.markdown(bench.results)
    (RESULTS / "latest.md").write_text(table)
    print(table)
