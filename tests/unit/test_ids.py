"""unique_id: event and request ids, unique across threads and processes forked from one parent."""

from __future__ import annotations

import os
import re

from otpcore.domain.ids import unique_id


def test_ids_are_128_bits_in_hex_and_do_not_repeat() -> None:
    ids = [unique_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_worker_draws_ids_of_its_own() -> None:
    # Workers forked from one parent must not repeat each other's ids (what was drawn is dropped).
    unique_id()  # the parent has randomness in hand when it forks
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent, and nothing else
        try:
            os.write(write, "".join(unique_id() for _ in range(4)).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = pipe.read()
    parent = "".join(unique_id() for _ in range(4))
    assert len(child) == len(parent) == 128 and child != parent


def test_ids_stay_unique_across_threads_and_refills() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda _: [unique_id() for _ in range(2_000)], range(8)))
    ids = [i for batch in batches for i in batch]
    assert len(set(ids)) == len(ids) == 16_000
