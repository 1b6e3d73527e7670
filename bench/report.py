"""The Markdown table and the issue-5 targets, from the results dictionary of one run."""

from __future__ import annotations

from typing import Any

WORKLOADS = ("send-otp", "verify-otp", "profile", "search")


def ceiling_rps(results: dict[str, Any]) -> float:
    return ceiling(results)["rps"]


def ceiling(results: dict[str, Any]) -> dict[str, float]:
    """The ceiling of this run: the mean of its measurements (one before and after each workload)."""
    runs = results.get("ceiling_runs", [])
    if not runs:
        return {"rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0}
    return {k: sum(r[k] for r in runs) / len(runs) for k in ("rps", "p50_ms", "p99_ms")}


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "n/a"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    load, counts, top = results.get("load", {}), results.get("counts", {}), ceiling(results)["rps"]

    def rps_ratio(name: str) -> float | None:
        if name not in load:
            return None
        base = load[name].get("ceiling_around", {}).get("rps") or top
        return round(load[name]["rps"] / base, 3) if base else None

    def count(name: str, key: str) -> float | None:
        return counts.get(name, {}).get(key)

    cache = results.get("user_cache", {}).get("hit_ratio")
    search = results.get("search_latency", {}).get("substring_p95_ms")
    rows = [
        ("send-otp req/s ÷ ceiling", ">= 0.30", rps_ratio("send-otp"), lambda v: v >= 0.30),
        ("verify-otp req/s ÷ ceiling", ">= 0.12", rps_ratio("verify-otp"), lambda v: v >= 0.12),
        ("profile req/s ÷ ceiling", ">= 0.45", rps_ratio("profile"), lambda v: v >= 0.45),
        (
            "Redis commands per send-otp",
            "<= 2 (aim 1)",
            count("send-otp", "redis_cmds_per_req"),
            lambda v: v <= 2,
        ),
        (
            "Redis commands per verify-otp",
            "<= 3",
            count("verify-otp", "redis_cmds_per_req"),
            lambda v: v <= 3,
        ),
        (
            "PG statements per verify-otp",
            "<= 2",
            count("verify-otp", "pg_statements_per_req"),
            lambda v: v <= 2,
        ),
        (
            "PG statements per cached profile",
            "0",
            count("profile", "pg_statements_per_req"),
            lambda v: v == 0,
        ),
        ("search p95 ms (substring, 3+ chars)", "<= 25", search, lambda v: v <= 25),
        ("user-cache hit ratio (profile)", ">= 0.90", cache, lambda v: v >= 0.90),
    ]
    return [
        {
            "target": name,
            "budget": budget,
            "measured": value,
            "met": None if value is None else bool(ok(value)),
        }
        for name, budget, value, ok in rows
    ]


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    load, counts = results.get("load", {}), results.get("counts", {})
    top = ceiling(results)
    impl = results.get("uvicorn", {})
    lines = [
        f"## otp-server benchmark — {meta.get('date')}",
        "",
        f"{meta.get('cores')} cores, {meta.get('cpu')}; Python {meta.get('python')}; "
        f"{meta.get('workers')} workers, uvicorn ({impl.get('http')}, {impl.get('loop')}); "
        f"wrk {meta.get('wrk')}; {meta.get('users'):,} users in Postgres.",
        "",
        "| workload | req/s | × ceiling | p50 ms | × ceiling | p99 ms | × ceiling | Redis cmds/req | PG stmts/req | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| ceiling (hello) | {top['rps']:.0f} | 1.00 | {top['p50_ms']:.2f} | 1.00 | {top['p99_ms']:.2f} | 1.00 | 0 | 0 | 0 |",
    ]
    for name in WORKLOADS:
        run = load.get(name)
        if run is None:
            continue
        c = counts.get(name, {})
        base = run.get("ceiling_around") or top
        lines.append(
            f"| {name} | {run['rps']:.0f} | {_ratio(run['rps'], base['rps'])} | {run['p50_ms']:.2f} | "
            f"{_ratio(run['p50_ms'], base['p50_ms'])} | {run['p99_ms']:.2f} | {_ratio(run['p99_ms'], base['p99_ms'])} | "
            f"{c.get('redis_cmds_per_req', 'n/a')} | {c.get('pg_statements_per_req', 'n/a')} | "
            f"{run['errors']['status']} |"
        )
    short = [name for name in WORKLOADS if load.get(name, {}).get("ran_out_threads")]
    if short:
        lines += [
            "",
            f"**{', '.join(short)} ran out of requests before the end: the req/s above is understated.**",
        ]
    runs = ", ".join(f"{r['rps']:.0f}" for r in results.get("ceiling_runs", []))
    lines += [
        "",
        f"The ceiling was measured before and after each workload ({runs} req/s; the ceiling row is their mean). "
        "Each workload's ratios are to the mean of the two ceiling runs around it; "
        "latency ratios are workload ÷ ceiling (higher is slower).",
        "",
        "Per request, exact (counting proxies, fixed request count): Redis commands by name; Postgres statements, "
        "pool checks (empty queries) and round trips:",
        "",
        "| workload | Redis by command | PG statements | PG pool checks | PG round trips | Redis calls incl. in-script (wrk run, approx.) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in WORKLOADS:
        c = counts.get(name, {})
        by = ", ".join(f"{k} {v:g}" for k, v in c.get("redis_by_command", {}).items()) or "—"
        lines.append(
            f"| {name} | {by} | {c.get('pg_statements_per_req', 'n/a')} | {c.get('pg_checks_per_req', 'n/a')} | "
            f"{c.get('pg_round_trips_per_req', 'n/a')} | {load.get(name, {}).get('redis_calls_incl_scripts_per_req', 'n/a')} |"
        )
    cache = results.get("user_cache", {})
    ratio = cache.get("hit_ratio")
    lines += [
        "",
        f"User cache on the profile workload (Zipf s={meta.get('zipf')} over {meta.get('profile_users')} users): "
        + (
            f"hit ratio {ratio:.1%} (L1 {cache.get('l1_hit_ratio', 0):.1%}), from `user_cache_total` of "
            f"{cache.get('workers_seen')} worker(s): {cache.get('counts')}"
            if ratio is not None
            else cache.get("note", "n/a")
        ),
    ]
    rss = results.get("rss_kib", {})
    for name, workers in rss.items():
        figures = ", ".join(
            f"{v.get('VmRSS', 0) / 1024:.0f} MiB (peak {v.get('VmHWM', 0) / 1024:.0f})"
            for v in workers.values()
        )
        lines.append(f"RSS per worker, {name}: {figures}.")
    search = results.get("search_latency", {})
    if search:
        lines += [
            "",
            f"Admin search through the HTTP API at {meta.get('users'):,} users, one request at a time:",
            "",
            "| query | n | p50 ms | p95 ms | max ms | median total |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        labels = {
            "name": "name substring (3–6 chars)",
            "phone": "phone substring (4–7 digits)",
            "empty": "empty, deep after_id",
        }
        for kind, label in labels.items():
            s = search.get(kind)
            if s:
                lines.append(
                    f"| {label} | {s['n']} | {s['p50_ms']} | {s['p95_ms']} | {s['max_ms']} | {int(s['median_total']):,} |"
                )
    explain = results.get("explain", {})
    if explain:
        lines += [
            "",
            f"EXPLAIN (ANALYZE, BUFFERS) of the repository's search SQL ({explain.get('source')}):",
            "",
        ]
        for kind, e in explain.items():
            if isinstance(e, dict):
                lines.append(f"- {kind} {e['query']}: indexes used: {', '.join(e['indexes']) or 'none'}")
        for kind, e in explain.items():
            if isinstance(e, dict):
                lines += [
                    "",
                    f"<details><summary>plan: {kind} {e['query']}</summary>",
                    "",
                    "```",
                    e["plan"],
                    "```",
                    "</details>",
                ]
    granian = results.get("granian", {})
    if "granian" in granian:
        g, u = granian["granian"], granian["uvicorn"]
        lines += [
            "",
            f"Ceiling app, granian vs uvicorn ({meta.get('workers')} workers each, alternating runs): "
            f"granian {g['rps']:.0f} req/s (p50 {g['p50_ms']:.2f} ms, p99 {g['p99_ms']:.2f} ms), "
            f"uvicorn {u['rps']:.0f} req/s (p50 {u['p50_ms']:.2f} ms, p99 {u['p99_ms']:.2f} ms): "
            f"granian = {granian['rps_vs_uvicorn']}× uvicorn.",
        ]
    seed = results.get("seed")
    if seed:
        lines.append(
            f"Seeding: COPY {seed.get('copy_s')} s, indexes {seed.get('indexes_s')} s, VACUUM ANALYZE {seed.get('analyze_s')} s."
        )
    lines += ["", "Issue-5 targets:", "", "| target | budget | measured | met |", "|---|---|---:|---|"]
    for t in results.get("targets", []):
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(
            f"| {t['target']} | {t['budget']} | {t['measured'] if t['measured'] is not None else 'n/a'} | {met} |"
        )
    return "\n".join(lines) + "\n"
