"""Running wrk: a workload's Lua script with bench/lua/common.lua prepended, bounded in time."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA = Path(__file__).parent / "lua"


def require_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit(
            "bench: wrk is not installed. Install it (Debian/Ubuntu) with:\n"
            "    apt-get install -y wrk\n"
            "and run the benchmark again; it installs nothing by itself."
        )
    return wrk


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: dict[str, int]
    ran_out_threads: int

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def run_wrk(
    url: str,
    workload: str,
    *,
    duration: float,
    threads: int,
    connections: int,
    args: list[str] | None = None,
    work_dir: Path,
) -> WrkResult:
    script = work_dir / f"{workload}.lua"
    script.write_text((LUA / "common.lua").read_text() + "\n" + (LUA / f"{workload}.lua").read_text())
    argv = [require_wrk(), "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s"]
    argv += ["--timeout", "5s", "--latency", "-s", str(script), url]
    if args:
        argv += ["--", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = data["duration_us"] / 1e6
    return WrkResult(
        requests=data["requests"],
        seconds=round(seconds, 2),
        rps=round(data["requests"] / seconds, 1) if seconds else 0.0,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=data["errors"],
        ran_out_threads=data["ran_out_threads"],
    )
