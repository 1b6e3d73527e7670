"""The benchmark's database: created, seeded with COPY, dropped. Nothing is cached between runs.

Users are seeded as the adapter writes them, ``name_folded`` being Python's ``name.casefold()``
(see migrations/postgres/0001_users_and_sessions.sql). The secondary indexes are dropped for the
COPY and rebuilt from their own definitions (read from ``pg_indexes``) afterwards: building a GIN
trigram index once is several times faster than maintaining it row by row.
"""

from __future__ import annotations

import itertools
import random
import secrets
import time
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

PREFIX = "otp_bench_"

FIRST = [
    "Ada",
    "Alan",
    "Alice",
    "Amara",
    "Ana",
    "Anders",
    "Anika",
    "Arjun",
    "Aurora",
    "Beatriz",
    "Bjorn",
    "Carlos",
    "Chiara",
    "Chloe",
    "Daniel",
    "Dmitri",
    "Elena",
    "Emil",
    "Emma",
    "Farah",
    "Felix",
    "Fatima",
    "Giulia",
    "Grace",
    "Hana",
    "Hugo",
    "Ibrahim",
    "Ines",
    "Ivan",
    "Jamal",
    "Jana",
    "Jonas",
    "Julia",
    "Kai",
    "Kenji",
    "Lara",
    "Leila",
    "Liam",
    "Lucia",
    "Mads",
    "Maria",
    "Mateo",
    "Mei",
    "Mila",
    "Nadia",
    "Noah",
    "Nora",
    "Olga",
    "Omar",
    "Oscar",
    "Paula",
    "Pedro",
    "Priya",
    "Rafael",
    "Rania",
    "Rosa",
    "Sami",
    "Sara",
    "Sofia",
    "Tariq",
    "Theo",
    "Uma",
    "Valentina",
    "Victor",
    "Wei",
    "Yara",
    "Yusuf",
    "Zoe",
    "Zoë",
    "Jürgen",
    "Søren",
    "Ágnes",
    "Çelik",
    "Élodie",
    "Łukasz",
    "Ömer",
]
LAST = [
    "Abbott",
    "Andersen",
    "Becker",
    "Bianchi",
    "Costa",
    "Dubois",
    "Eriksson",
    "Fischer",
    "Garcia",
    "Gonzalez",
    "Haddad",
    "Hansen",
    "Ivanova",
    "Jensen",
    "Kaur",
    "Khan",
    "Kowalski",
    "Larsen",
    "Lovelace",
    "Martin",
    "Meyer",
    "Moreau",
    "Nakamura",
    "Nguyen",
    "Novak",
    "Okafor",
    "Olsen",
    "Patel",
    "Pereira",
    "Petrov",
    "Quinn",
    "Rossi",
    "Santos",
    "Schmidt",
    "Silva",
    "Singh",
    "Smith",
    "Suzuki",
    "Tanaka",
    "Turing",
    "Weber",
    "Wagner",
    "Yamamoto",
    "Young",
    "Zhang",
    "Ziegler",
    "Straße",
    "Müller",
    "Hoffmann",
    "Johansson",
    "Nilsson",
    "Lindqvist",
]

USER_COLUMNS = ("phone_number", "name", "name_folded", "role", "is_active", "created_at", "updated_at")


def with_database(url: str, name: str) -> str:
    return urlsplit(url)._replace(path=f"/{name}").geturl()


def create_database(server_url: str) -> tuple[str, str]:
    """A fresh ``otp_bench_<hex>`` database; returns (name, url)."""
    name = f"{PREFIX}{secrets.token_hex(6)}"
    with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    if not name.startswith(PREFIX):
        raise ValueError(f"refusing to drop {name!r}: not a benchmark database")
    with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def random_phones(count: int, rng: random.Random, avoid_prefix: str) -> Iterator[str]:
    """``count`` distinct plausible North-American numbers (+1 and ten digits), none under
    ``avoid_prefix`` (the range the test numbers live in)."""
    # i -> i * k mod m is a bijection on [0, m) when gcd(k, m) == 1: distinct without a set.
    modulus, step = 7_999_999_999, 2_654_435_761
    offset = rng.randrange(modulus)
    made = i = 0
    while made < count:
        phone = f"+1{2_000_000_000 + (offset + i * step) % modulus:010d}"
        i += 1
        if not phone.startswith(avoid_prefix):
            made += 1
            yield phone


def name_for(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def seed_users(
    url: str,
    *,
    total: int,
    first_phones: Sequence[str],
    admin_phone: str,
    avoid_prefix: str,
    seed: int = 5,
) -> dict[str, float]:
    """Seed ``total`` users: ``first_phones`` first (so they get the smallest ids), then random
    numbers. Returns timings in seconds."""
    rng = random.Random(seed)
    now = "2025-01-01 00:00:00+00"
    timings: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'users'"
            " AND indexname NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = 'users'::regclass)"
        ).fetchall()
        for index_name, _ in indexes:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index_name)))
        # The per-name counts (migration 0003) are kept by row triggers: 5x slower for a COPY of
        # this size than counting once afterwards, as the migration itself does.
        conn.execute("ALTER TABLE users DISABLE TRIGGER USER")
        started = time.perf_counter()
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in USER_COLUMNS)
        with conn.cursor() as cur, cur.copy(sql.SQL("COPY users ({}) FROM STDIN").format(columns)) as copy:
            chunk: list[str] = []
            randoms = random_phones(max(0, total - len(first_phones)), rng, avoid_prefix)
            for phone in itertools.chain(first_phones, randoms):
                name = name_for(rng)
                role = "admin" if phone == admin_phone else "user"
                chunk.append(f"{phone}\t{name}\t{name.casefold()}\t{role}\tt\t{now}\t{now}\n")
                if len(chunk) >= 20_000:
                    copy.write("".join(chunk))
                    chunk.clear()
            copy.write("".join(chunk))
        conn.execute("ALTER TABLE users ENABLE TRIGGER USER")
        conn.execute(
            "INSERT INTO user_names (name_folded, shard, users)"
            " SELECT name_folded, id % 8, count(*) FROM users GROUP BY 1, 2"
        )
        timings["copy_s"] = time.perf_counter() - started
        started = time.perf_counter()
        for _, definition in indexes:
            conn.execute(definition)
        timings["indexes_s"] = time.perf_counter() - started
        started = time.perf_counter()
        conn.execute("VACUUM ANALYZE users")
        conn.execute("VACUUM ANALYZE user_names")
        timings["analyze_s"] = time.perf_counter() - started
        # The seed writes ~0.5 GB of WAL: left alone, it sets off a checkpoint that writes the
        # seed's pages out over the next minutes, during whichever workloads run then (and makes
        # their first writes of each page log the whole page). Written out now, before any is
        # measured. Needs a superuser or pg_checkpoint; without, the run says so and goes on.
        started = time.perf_counter()
        try:
            conn.execute("CHECKPOINT")
            timings["checkpoint_s"] = time.perf_counter() - started
        except psycopg.errors.InsufficientPrivilege:
            print("bench: CHECKPOINT not allowed; the seed's pages are written out during the runs")
        timings["rows"] = conn.execute("SELECT count(*) FROM users").fetchone()[0]  # type: ignore[index]
    return timings
