"""Real services and real worker processes for the farm tests (no mocks, no eager mode).

Redis and Postgres must be running (127.0.0.1:6379 and :5432, database `test`; override with
EVALFARM_TEST_REDIS_URL / EVALFARM_TEST_DATABASE_URL). Locally the farm tests skip when they are absent;
under CI=true they fail instead, so a green CI always means the farm was exercised.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import sqlalchemy

from .helpers import home_env

DATABASE_URL = os.environ.get("EVALFARM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("EVALFARM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
#: short leases and deadlines keep recovery tests short (production defaults: 10, 45, 15 and 600 s)
FAST_LEASES = {"EVALFARM_HEARTBEAT_S": "1", "EVALFARM_LEASE_S": "6", "EVALFARM_RECONCILE_S": "2",
               "EVALFARM_PENDING_S": "15"}


def farm_env(root: Path, database_url: str, redis_url: str, weights: Path) -> dict[str, str]:
    """The environment of a farm process (worker, CLI) in a test: its servers, a store and home under `root`,
    the seeded weights, the CPU, and short leases."""
    return {
        **home_env(root / "home"),
        "EVALFARM_DATABASE_URL": database_url,
        "EVALFARM_REDIS_URL": redis_url,
        "EVALFARM_STORE": str(root / "store"),
        "EVALFARM_WEIGHTS": str(weights),
        "OMP_NUM_THREADS": "2",
        **FAST_LEASES,
    }


def require_services() -> None:
    problems = []
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"Redis at {REDIS_URL}: {exc}")
    try:
        url = DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1)
        with sqlalchemy.create_engine(url, connect_args={"connect_timeout": 3}).connect() as c:
            c.exec_driver_sql("SELECT 1")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"Postgres at {DATABASE_URL}: {exc}")
    if problems:
        msg = "farm services unavailable: " + "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def reset_services() -> None:
    """Empty the test database's evalfarm tables and the test Redis database."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    url = DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as c:
        c.exec_driver_sql('DROP TABLE IF EXISTS counters, deliveries, tokens, results, shards, "references", reference_builds, jobs, '
                          'alembic_version CASCADE')
    engine.dispose()
    from evalfarm.db import session as db_session

    db_session._engines.clear()  # noqa: SLF001 - a fresh schema needs a fresh (migrating) engine


class Process:
    """A subprocess in its own process group with its log in a file, so that a test can kill all of it."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self.log = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _died(self, what: str) -> RuntimeError:
        return RuntimeError(f"{what} exited early:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole group (main process and its children): a machine lost mid-step."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


class Worker(Process):
    """An `evalfarm worker` subprocess (its main process and pool children in one group)."""

    def __init__(self, env: dict[str, str], log: Path, queues: str = "gpu,cpu") -> None:
        super().__init__([sys.executable, "-m", "evalfarm.cli", "worker", "-c", "1", "--queues", queues,
                          "--loglevel", "info"], env, log)

    def wait_ready(self, timeout: float = 60) -> Worker:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b" ready." in self.log_path.read_bytes():
                return self
            if not self.alive():
                raise self._died("worker")
            time.sleep(0.3)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log_path.read_text()[-3000:]}")


class ApiServer(Process):
    """`evalfarm api` as a subprocess (uvicorn), on a free port of 127.0.0.1."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        from .servers import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([sys.executable, "-m", "evalfarm.cli", "api", "--host", "127.0.0.1", "--port",
                          str(self.port)], env, log)

    def wait_ready(self, timeout: float = 60) -> ApiServer:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise self._died("API")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"API not serving after {timeout} s:\n{self.log_path.read_text()[-3000:]}")


class TcpProxy:
    """A TCP forwarder on a free port of 127.0.0.1 to `target_port`: a process connected through it loses its
    server when the proxy closes (every connection cut, new ones refused), while the server itself, shared
    with other tests, runs on untouched."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        import socket
        import threading

        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self.closed:
            try:
                client, _ = self.listener.accept()
                if self.closed:
                    client.close()
                    return
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:  # noqa: ANN001
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        """Cut every connection and refuse new ones: an outage, as the process behind the proxy sees it."""
        import socket

        self.closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        except OSError:
            pass
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def create_token(env: dict[str, str], name: str, scopes: str) -> str:
    """`evalfarm token create NAME --scopes SCOPES` as an operator runs it; the token it prints."""
    from .helpers import run_cli

    out = run_cli("token", "create", name, "--scopes", scopes, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]
