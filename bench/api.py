"""Section 5: the HTTP service's request rate: `GET /v1/jobs/{id}` (token check, job, shards, callback) next
to `GET /health` (the framework alone), with 1 and 2 server processes.

Needs Redis and Postgres as the farm section does (Redis db 14; the `test` database, whose rows this
section creates are deleted at the end). The job polled has 10 shard rows, as a planned job would; no
worker runs. The load comes from threads of this process on keep-alive connections, on the same machine:
on 2 cores the load generator takes CPU from the server, so these are lower bounds.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from common import VENV_BIN, Report, section_header
from farm import DATABASE_URL, REDIS_URL, farm_env, flush_redis, services_missing

CONCURRENCY = 8
DURATION_S = 10.0
QUICK_DURATION_S = 4.0
N_SHARDS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_job(settings) -> tuple[str, str]:  # noqa: ANN001
    """A token and a planned job with N_SHARDS pending shards, made with the lifecycle's own records."""
    from evalfarm.config import EvalConfig
    from evalfarm.farm import Farm
    from evalfarm.scheduler import records
    from evalfarm.scheduler.plan import SAMPLES, JobPlan, SidePlan, SideSource, shard_ranges
    from evalfarm.scheduler.tokens import SUBMIT, create_token, revoke_token

    farm = Farm(settings)
    revoke_token(farm.ctx.sessions, "bench")
    token = create_token(farm.ctx.sessions, "bench", frozenset({SUBMIT}))
    request = records.Submission("/bench/samples.npz", None, EvalConfig(metrics=("is",)))
    job_id = records.create_job(farm.ctx.sessions, request, mode="farm", submitted_by="bench").job_id
    records.start_planning(farm.ctx.sessions, job_id)
    side = SidePlan("/bench/samples.npz", 50_000, "0" * 64, SideSource.SHARDS, shards=shard_ranges(50_000, 5_000))
    records.record_plan(farm.ctx.sessions, job_id, JobPlan({SAMPLES: side}), "0" * 64)
    return token, job_id


def delete_job(settings, job_id: str) -> None:  # noqa: ANN001
    from sqlalchemy import delete

    from evalfarm.db import Job, Token
    from evalfarm.farm import Farm

    with Farm(settings).ctx.sessions.begin() as s:
        s.execute(delete(Job).where(Job.id == job_id))
        s.execute(delete(Token).where(Token.name == "bench"))


def start_api(env: dict[str, str], port: int, processes: int, log: Path) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(VENV_BIN / "evalfarm"), "api", "--port", str(port), "--workers", str(processes),
                             "--log-level", "warning"], env={**os.environ, **env}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                conn.close()
                time.sleep(1.0 * processes)  # every process up, not just the first
                return proc
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"API not serving:\n{log.read_text()[-2000:]}")


def stop_api(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def load(port: int, path: str, headers: dict[str, str], duration_s: float) -> tuple[int, int, list[float]]:
    """CONCURRENCY threads, each on one keep-alive connection, for `duration_s`: (ok, errors, latencies s)."""
    latencies: list[float] = []
    counts = {"ok": 0, "err": 0}
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration_s

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine, ok, err = [], 0, 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                conn.request("GET", path, headers=headers)
                r = conn.getresponse()
                r.read()
                ok, err = (ok + 1, err) if r.status == 200 else (ok, err + 1)
            except OSError:
                err += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)
            counts["ok"] += ok
            counts["err"] += err

    threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts["ok"], counts["err"], latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(report: Report, *, root: Path, weights: Path, quick: bool) -> None:
    section_header("api: GET /v1/jobs/{id} and GET /health, requests/s and latency")
    why = services_missing()
    if why:
        print(f"api: skipped ({why})")
        return
    from evalfarm.settings import Settings

    flush_redis()
    env = {**farm_env(root, weights), "EVALFARM_SAMPLE_ROOTS": str(root)}
    settings = Settings(database_url=DATABASE_URL, redis_url=REDIS_URL, store=env["EVALFARM_STORE"])
    token, job_id = seed_job(settings)
    duration = QUICK_DURATION_S if quick else DURATION_S
    report.note(f"{CONCURRENCY} client threads on keep-alive connections, {duration:.0f} s per figure, "
                f"a job with {N_SHARDS} shards; client and server share this machine's cores")
    try:
        for processes in (1, 2):
            port = free_port()
            proc = start_api(env, port, processes, root / f"api-{processes}.log")
            try:
                for name, path, headers in (
                    ("health", "/health", {}),
                    ("job_status", f"/v1/jobs/{job_id}", {"Authorization": f"Bearer {token}"}),
                ):
                    load(port, path, headers, 1.0)  # warm-up: connections, the engine's pool, caches
                    ok, err, lat = load(port, path, headers, duration)
                    prefix = f"api.{name}.p{processes}"
                    report.figure(f"{prefix}.requests_per_s", ok / duration, "req/s")
                    report.figure(f"{prefix}.p50_ms", 1000 * percentile(lat, 0.50), "ms")
                    report.figure(f"{prefix}.p99_ms", 1000 * percentile(lat, 0.99), "ms")
                    report.figure(f"{prefix}.errors", err, "")
            finally:
                stop_api(proc)
    finally:
        delete_job(settings, job_id)
        flush_redis()
