"""Private Redis and Postgres servers for the fault tests: started, killed and restarted at will.

They listen on free ports of 127.0.0.1 with their data in temporary directories, so a test may stop,
kill, flush or restart them without touching the machine's shared servers (5432, 6379).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from .helpers import wait_until

#: rows of the fault report (tests/test_faults.py), printed at the end of the run by conftest.py
REPORT: list[dict] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def require_private_servers() -> None:
    """Skip (locally) or fail (under CI) when redis-server or the Postgres binaries are missing."""
    missing = [name for name, ok in (("redis-server", shutil.which("redis-server")), ("pg_ctl", _postgres_bin()))
               if not ok]
    if missing:
        msg = f"private servers need {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


class PrivateRedis:
    """`redis-server` with AOF in its own directory: kill it, restart it with its data or empty."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="evalfarm-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def _pid(self) -> int | None:
        try:
            return int((self.dir / "redis.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def start(self, *, empty: bool = False) -> None:
        if empty:
            for entry in self.dir.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        subprocess.run(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "yes",
             "--pidfile", str(self.dir / "redis.pid"), "--logfile", str(self.dir / "redis.log")],
            check=True,
        )
        wait_until(self.ping, 15, "private redis")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        pid = self._pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not _alive(pid), 10, "private redis to die")
            (self.dir / "redis.pid").unlink(missing_ok=True)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres:
    """A cluster made by `initdb` in a temporary directory, run by `pg_ctl` as the postgres user."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="evalfarm-pg-"))
        os.chmod(self.dir, 0o755)
        self.data = self.dir / "data"
        self.data.mkdir()
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root
        if self._as_postgres:
            shutil.chown(self.dir, "postgres")
            shutil.chown(self.data, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self, name: str) -> str:
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name],
                       check=True, capture_output=True, timeout=60)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
