"""Processes the benchmark starts: the servers, their workers, and what /proc says about them.

Every process is started in a session of its own and stopped by its own id (then its group,
which only it and its workers are in): nothing else on the machine is touched.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process listening on 127.0.0.1:port, with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int,
        env: Mapping[str, str],
        cwd: Path,
        log_dir: Path,
        ready_path: str = "/health",
        expected_workers: int = 1,
    ) -> None:
        self.name = name
        self.expected_workers = expected_workers
        self.port = port
        self.ready_path = ready_path
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log_path}")
            try:
                status = get_status(self.port, self.ready_path)
            except OSError:
                status = 0
            # Every worker must answer, not merely exist: otherwise the first seconds of load hit
            # one of them, and a worker still starting does its connection setup in a count.
            workers = self.workers()
            if (
                status == 200
                and len(workers) >= self.expected_workers
                and len(get_from_each_worker(self.port, self.ready_path, workers)) >= self.expected_workers
            ):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; see {self.log_path}")

    def workers(self) -> list[int]:
        """Pids of the worker processes: the children of the server (not multiprocessing's
        resource tracker). A single-process server is its own worker."""
        kids = [pid for pid in children(self.proc.pid) if "resource_tracker" not in cmdline(pid)]
        return kids or [self.proc.pid]

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # Workers are in the server's own process group; reap any it left behind.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


def get_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: the ppid follows the last ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return inodes
    for fd in entries:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def owner_of_connection(pids: Sequence[int], server_port: int, client_port: int) -> int | None:
    """Which of ``pids`` holds the accepted end of the TCP connection from ``client_port``."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (
                int(local.rsplit(":", 1)[1], 16) == server_port
                and int(remote.rsplit(":", 1)[1], 16) == client_port
            ):
                inode = int(fields[9])
                break
        if inode is not None:
            break
    if inode is None:
        return None
    for pid in pids:
        if inode in _socket_inodes(pid):
            return pid
    return None


def get_from_each_worker(port: int, path: str, workers: Sequence[int], attempts: int = 40) -> dict[int, str]:
    """GET ``path`` once from every worker: new connections until each worker answered one.

    Workers share the listening socket, so which one serves a connection is the kernel's
    choice; the connection's owner is read from /proc.
    """
    bodies: dict[int, str] = {}
    open_conns = []
    try:
        for _ in range(attempts):
            if len(bodies) == len(workers):
                break
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.connect()
            open_conns.append(conn)  # held open so the kernel spreads the next ones
            client_port = conn.sock.getsockname()[1]
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read().decode()
            owner = owner_of_connection(workers, port, client_port)
            if owner is not None and owner not in bodies:
                bodies[owner] = body
    finally:
        for conn in open_conns:
            conn.close()
    return bodies
