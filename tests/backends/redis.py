"""Redis for the tests: a key prefix of its own per test, and throwaway servers and clusters.

``redis_keyspace`` uses the server at ``OTP_TEST_REDIS_URL`` (default 127.0.0.1:6379) and deletes
only the keys under its own ``otptest-<hex>`` prefix. ``redis_cluster`` starts a three-master
cluster from the ``redis-server`` binary on free loopback ports for the test session.
``temporary_keyspace``, ``RedisServer``, ``start_redis_cluster`` and ``free_port`` are plain
helpers other suites reuse (e.g. to stop and restart a server under a running service).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis

from otpcore.adapters.redis import RedisKeyspace

DEFAULT_URL = "redis://127.0.0.1:6379/0"
PREFIX = "otptest-"
START_TIMEOUT = 10.0
CLUSTER_TIMEOUT = 30.0


def redis_url() -> str:
    return os.environ.get("OTP_TEST_REDIS_URL", DEFAULT_URL)


def new_prefix() -> str:
    return f"{PREFIX}{secrets.token_hex(6)}"


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def delete_prefixed(keyspace: RedisKeyspace) -> None:
    """Delete the keys under a test keyspace's prefix (on every master of a cluster)."""
    if not keyspace.prefix.startswith(PREFIX):
        raise ValueError(f"refusing to clean {keyspace.prefix!r}: not a test prefix")
    client = keyspace.client
    # SCAN on a cluster client walks every primary; each key is deleted on its own slot.
    keys = [key async for key in client.scan_iter(match=f"{keyspace.prefix}:*", count=1000)]
    for key in keys:
        await client.unlink(key)


class RedisServer:
    """A throwaway ``redis-server`` on a loopback port; it can be stopped and started again."""

    def __init__(self, directory: Path, port: int | None = None, *args: str) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.directory / f"redis-{self.port}.log"

    def start(self) -> None:
        command = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.directory),
            *self.args,
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log.read_text()[-2000:]}")
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"redis-server on {self.port} did not start") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


def start_redis_cluster(directory: Path, masters: int = 3) -> tuple[list[str], Callable[[], None]]:
    """Start a cluster of ``masters`` nodes (no replicas); returns their URLs and a stop function."""
    nodes = []
    for _ in range(masters):
        port, bus_port = free_port(), free_port()
        config = str(directory / f"nodes-{port}.conf")
        cluster = ("--cluster-enabled", "yes", "--cluster-config-file", config)
        nodes.append(RedisServer(directory, port, *cluster, "--cluster-port", str(bus_port)))

    def stop() -> None:
        for node in nodes:
            node.stop()

    try:
        for node in nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        create = ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"]
        subprocess.run(create, check=True, capture_output=True, timeout=CLUSTER_TIMEOUT)
        _wait_for_cluster(nodes)
    except BaseException:
        stop()
        raise
    return [node.url for node in nodes], stop


def _wait_for_cluster(nodes: list[RedisServer]) -> None:
    """Until every node sees every other and all slots served (``cluster_state:ok``)."""
    deadline = time.monotonic() + CLUSTER_TIMEOUT
    pending = list(nodes)
    while pending:
        node = pending[0]
        with node.client() as client:
            info = client.execute_command("CLUSTER INFO")
        if isinstance(info, bytes):
            info = dict(line.split(":", 1) for line in info.decode().split() if ":" in line)
        if info.get("cluster_state") == "ok" and int(info["cluster_known_nodes"]) == len(nodes):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Redis cluster did not settle: {info}")
        time.sleep(0.1)


@asynccontextmanager
async def temporary_keyspace(url: str, *, cluster: bool) -> AsyncIterator[RedisKeyspace]:
    """A keyspace under a fresh test prefix; its keys are deleted and its client closed after."""
    keyspace = RedisKeyspace.from_url(url, cluster=cluster, prefix=new_prefix(), pool_size=16)
    try:
        yield keyspace
    finally:
        try:
            await delete_prefixed(keyspace)
        finally:
            await keyspace.aclose()


@pytest.fixture
async def redis_keyspace() -> AsyncIterator[RedisKeyspace]:
    async with temporary_keyspace(redis_url(), cluster=False) as keyspace:
        yield keyspace


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """URLs of the nodes of a three-master cluster that lives as long as the test session."""
    urls, stop = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield urls
    finally:
        stop()


@pytest.fixture
async def redis_cluster_keyspace(redis_cluster: list[str]) -> AsyncIterator[RedisKeyspace]:
    async with temporary_keyspace(redis_cluster[0], cluster=True) as keyspace:
        yield keyspace
