"""unique_id: event and request ids, unique across processes forked from one parent."""

from __future__ import annotations

import os
import re

from otpcore.domain.ids import unique_id


def test_ids_are_128_bits_in_hex_and_do_not_repeat() -> None:
    ids = [unique_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_worker_draws_ids_of_its_own() -> None:
    # Workers forked from one parent must not repeat each other's ids (the generator is reseeded).
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.write(write, "".join(unique_id() for _ in range(4)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 128).decode()
    parent = "".join(unique_id() for _ in range(4))
    assert len(child) == len(parent) == 128 and child != parent
