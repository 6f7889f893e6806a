"""No job may hang: faults injected into a farm of real workers on private Redis and Postgres servers.

Each test breaks something mid-job (a database outage, a broker restart, a killed worker, a damaged cache,
a cancel) and asserts that the job ends `succeeded` with the embedded run's numbers, or fails with a clear
message, within a bound. Jobs are submitted and awaited with the CLI, as training infra would. Each test
adds a row to the fault report printed at the end of the run (jobs completed, numbers identical, recovery).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy

import evalfarm
from evalfarm import keys
from evalfarm.db import get_engine

from .farm import Worker, farm_env
from .helpers import in_home, wait_until, write_images
from .servers import REPORT, PrivatePostgres, PrivateRedis, require_private_servers

pytestmark = [pytest.mark.farm, pytest.mark.faults]

N_SAMPLES, N_REF = 16, 12
CONFIG = {"kid_subset_size": 8, "kid_subsets": 5, "splits": 4}
FLAGS = ["--kid-subset-size", "8", "--kid-subsets", "5", "--splits", "4"]
CLI = [sys.executable, "-m", "evalfarm.cli"]
JOB_BOUND_S = 240  #: every job here ends within this, whatever was broken



# -- servers, data, the farm ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[PrivatePostgres, PrivateRedis]]:
    require_private_servers()
    pg, broker = PrivatePostgres(), PrivateRedis()
    pg.start()
    broker.start()
    yield pg, broker
    pg.close()
    broker.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fault-data")
    return (write_images(root / "samples", N_SAMPLES, 32, seed=61, brightness=1.0),
            write_images(root / "reference", N_REF, 32, seed=62, brightness=0.6))


@pytest.fixture(scope="module")
def expected(data: tuple[Path, Path], weights_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The embedded run every farm result must equal."""
    with in_home(tmp_path_factory.mktemp("fault-embedded")):
        return evalfarm.evaluate(str(data[0]), str(data[1]), weights=str(weights_path), shard_size=1000,
                                 cache=False, **CONFIG)


class Farm:
    """Workers, CLI and database of one test, on the private servers."""

    def __init__(self, pg: PrivatePostgres, broker: PrivateRedis, tmp: Path, weights: Path, data: tuple[Path, Path]):
        self.pg, self.broker, self.tmp, self.data = pg, broker, tmp, data
        self.db_url = pg.create_database(f"faults_{uuid.uuid4().hex[:12]}")
        get_engine(self.db_url)  # the schema, before a test locks one of its tables
        self.env = farm_env(tmp, self.db_url, broker.url, weights)
        self.engine = sqlalchemy.create_engine(self.db_url.replace("postgresql://", "postgresql+psycopg://"),
                                               pool_pre_ping=True, connect_args={"connect_timeout": 2})
        self.workers: list[Worker] = []

    def worker(self) -> Worker:
        w = Worker(self.env, self.tmp / f"worker-{len(self.workers)}.log")
        self.workers.append(w)
        return w.wait_ready()

    def cli(self, *args: str, check: bool = True, timeout: float = JOB_BOUND_S) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout + 30)

    def submit(self, *flags: str, samples: Path | None = None) -> str:
        out = self.cli("submit", str(samples or self.data[0]), "--ref", str(self.data[1]), *FLAGS, *flags)
        return out.stdout.strip().splitlines()[-1]

    def wait(self, job_id: str, timeout: float = JOB_BOUND_S) -> dict:
        out = self.tmp / f"{job_id}.json"
        done = self.cli("wait", job_id, "--json", str(out), "--timeout", str(timeout), check=False, timeout=timeout)
        assert done.returncode == 0, f"job {job_id} did not succeed:\n{done.stderr}\n{self.logs()}"
        return json.loads(out.read_text())

    def sql(self, query: str, **params: object) -> list[tuple]:
        """A query, or [] while the database is down."""
        try:
            with self.engine.connect() as c:
                return list(c.execute(sqlalchemy.text(query), params))
        except sqlalchemy.exc.OperationalError:
            return []

    def state(self, job_id: str) -> str | None:
        rows = self.sql("SELECT state FROM jobs WHERE id = :id", id=job_id)
        return rows[0][0] if rows else None

    def shards_done(self, job_id: str) -> int:
        rows = self.sql("SELECT count(*) FROM shards WHERE job_id = :id AND state = 'done'", id=job_id)
        return rows[0][0] if rows else 0

    def logs(self) -> str:
        return "\n".join(w.log_path.read_text(errors="replace")[-3000:] for w in self.workers)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.engine.dispose()


@pytest.fixture
def farm(servers, tmp_path: Path, weights_path: Path, data) -> Iterator[Farm]:
    pg, broker = servers
    if not broker.ping():
        broker.start()
    redis.Redis.from_url(broker.url).flushall()
    f = Farm(pg, broker, tmp_path, weights_path, data)
    yield f
    f.close()


def identical(result: dict, expected: dict) -> bool:
    return all(result[k] == pytest.approx(expected[k], rel=1e-6, abs=1e-12) for k in keys.METRIC_KEYS)


def report(fault: str, results: list[dict], total: int, expected: dict, recovery_s: float | None) -> None:
    same = all(identical(r, expected) for r in results)
    REPORT.append({"fault": fault, "completed": len(results), "total": total, "identical": same,
                   "recovery_s": None if recovery_s is None else round(recovery_s, 1)})
    assert len(results) == total
    assert same, [{k: r[k] for k in keys.METRIC_KEYS} for r in results]


# -- the database --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("down_s", [20, 0], ids=["stopped-20-s", "restarted-fast"])
def test_postgres_down_mid_job_and_the_job_succeeds(farm: Farm, expected: dict, down_s: int) -> None:
    farm.worker()
    job = farm.submit("--shard-size", "4", "--batch-size", "4", "--no-cache")
    wait_until(lambda: farm.shards_done(job) >= 2, 120, "two finished shards")
    farm.pg.stop("fast")
    time.sleep(down_s)
    farm.pg.start()
    back = time.monotonic()
    result = farm.wait(job)
    what = f"stopped {down_s} s" if down_s else "restarted fast"
    report(f"Postgres {what} mid-job", [result], 1, expected, time.monotonic() - back)


# -- the broker ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("empty", [False, True], ids=["with-its-data", "empty"])
def test_redis_killed_and_restarted_mid_job_and_the_job_succeeds(farm: Farm, expected: dict, empty: bool) -> None:
    farm.worker()
    job = farm.submit("--shard-size", "4", "--batch-size", "4", "--no-cache")
    wait_until(lambda: farm.shards_done(job) >= 2, 120, "two finished shards")
    farm.broker.kill()
    farm.broker.start(empty=empty)
    back = time.monotonic()
    result = farm.wait(job)
    report(f"Redis killed, restarted {'empty' if empty else 'with its data'}", [result], 1, expected,
           time.monotonic() - back)


# -- the worker ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "table"), [("planning", "shards"), ("reducing", "results")])
def test_worker_killed_while_planning_or_reducing_is_replaced_and_the_job_succeeds(
    farm: Farm, expected: dict, state: str, table: str
) -> None:
    """A lock on the table the step writes last holds it inside its state (the planner cannot write the shard
    rows, the reducer the result rows), so the kill lands there every time; the lock goes with the worker."""
    worker = farm.worker()
    with farm.engine.connect() as c, c.begin():
        c.execute(sqlalchemy.text(f"LOCK TABLE {table} IN EXCLUSIVE MODE"))
        job = farm.submit("--shard-size", "100", "--no-cache")
        wait_until(lambda: farm.state(job) == state, 120, state)
        time.sleep(1)
        worker.kill()
    killed = time.monotonic()
    farm.worker()
    result = farm.wait(job)
    report(f"worker SIGKILLed while {state}", [result], 1, expected, time.monotonic() - killed)


def test_worker_killed_mid_shard_is_replaced_and_the_job_succeeds(farm: Farm, expected: dict) -> None:
    worker = farm.worker()
    job = farm.submit("--shard-size", "100", "--batch-size", "2", "--no-cache")
    wait_until(lambda: bool(farm.sql("SELECT 1 FROM shards WHERE job_id = :id AND state = 'running' "
                                     "AND heartbeat_at > started_at", id=job)), 120, "a shard heart-beating")
    worker.kill()
    killed = time.monotonic()
    farm.worker()
    result = farm.wait(job)
    report("worker SIGKILLed mid-shard", [result], 1, expected, time.monotonic() - killed)


PRC_FLAGS = ["--metrics", "is,fid,kid,prc", "--extractor", keys.INCEPTION, "--prc-block", "4", "--prc-tile", "4"]


def test_worker_killed_mid_precision_recall_tile_is_replaced_and_the_job_succeeds(
    farm: Farm, data: tuple[Path, Path], weights_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The worker is frozen as soon as a tile has started (its attempt counted) and has not stored its result,
    then killed: the tile's lease runs out, it is handed out again, and precision/recall equals the embedded
    run's. Tiles take milliseconds, so the freeze is retried on the next tile until it lands inside one."""
    with in_home(tmp_path_factory.mktemp("fault-prc-embedded")):
        expected = evalfarm.evaluate(str(data[0]), str(data[1]), weights=str(weights_path), shard_size=1000,
                                     cache=False, metrics=("is", "fid", "kid", "prc"), extractors=(keys.INCEPTION,),
                                     prc_block=4, prc_tile=4, **CONFIG)
    worker = farm.worker()
    job = farm.submit("--shard-size", "100", "--no-cache", *PRC_FLAGS)
    r = redis.Redis.from_url(farm.broker.url)
    attempts_key, blobs_key = f"evalfarm:partial:{job}:attempts", f"evalfarm:partial:{job}:blobs"

    def caught_mid_tile() -> str | None:
        os.killpg(worker.proc.pid, signal.SIGSTOP)
        started = {k.decode() for k in r.hkeys(attempts_key)}
        unfinished = sorted(started - {k.decode() for k in r.hkeys(blobs_key)})
        if unfinished:
            return unfinished[0]
        os.killpg(worker.proc.pid, signal.SIGCONT)
        return None

    deadline, tile = time.monotonic() + 180, None
    while tile is None and time.monotonic() < deadline and farm.state(job) not in ("succeeded", "failed"):
        if r.exists(attempts_key):
            tile = caught_mid_tile()
        else:
            time.sleep(0.005)
    assert tile is not None, f"no tile was caught running; job {farm.state(job)}:\n{farm.logs()}"
    worker.kill()
    killed = time.monotonic()
    farm.worker()
    restarts = 0  # the job's partials (the attempt counts with them) are dropped as it ends: watch until then
    while farm.state(job) not in ("succeeded", "failed") and time.monotonic() - killed < JOB_BOUND_S:
        restarts = max(restarts, int(r.hget(attempts_key, tile) or 0))
        time.sleep(0.01)
    result = farm.wait(job)
    assert restarts == 2, f"tile {tile} was started {restarts} times"
    for name in keys.KEYS_OF_METRIC["prc"]:
        assert result[name] == expected[name], name
    report("worker SIGKILLed mid precision/recall tile", [result], 1, expected, time.monotonic() - killed)


def test_a_replaced_pool_child_runs_jobs_without_database_errors(farm: Farm, expected: dict) -> None:
    """The child forked after its parent connected (the reconciler's engine) must not share its sockets."""
    worker = farm.worker()
    farm.wait(farm.submit("--shard-size", "100", "--no-cache", "--metrics", "is"))
    time.sleep(3)  # the reconciler has run in the main process: it holds an engine and a Redis client
    [child] = _children(worker.proc.pid)
    os.kill(child, signal.SIGKILL)
    wait_until(lambda: bool(_children(worker.proc.pid)) and _children(worker.proc.pid) != [child], 60,
               "a replacement pool child")
    killed = time.monotonic()
    result = farm.wait(farm.submit("--shard-size", "4", "--no-cache"))
    log = worker.log_path.read_text(errors="replace")
    for symptom in ("DuplicatePreparedStatement", "can't change 'autocommit'", "heartbeat failed",
                    "reconciler pass failed"):
        assert symptom not in log
    report("pool child SIGKILLed, next job on its replacement", [result], 1, expected, time.monotonic() - killed)


def _children(pid: int) -> list[int]:
    """Direct children that are Celery pool processes (DataLoader decoders are their children, not these)."""
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return []
    return [int(c) for c in found]


# -- caches, cancel, load ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["tampered", "truncated"])
def test_a_damaged_reference_cache_is_recomputed_never_used(farm: Farm, expected: dict, damage: str) -> None:
    import io

    import numpy as np

    farm.worker()
    farm.wait(farm.submit("--shard-size", "100", "--metrics", "is"))  # warms the worker; IS needs no reference
    first = farm.wait(farm.submit("--shard-size", "100"))  # caches the reference statistics
    [cache] = (farm.tmp / "store" / "refs").glob("*.npz")
    if damage == "tampered":  # a valid file with other numbers
        arrays = dict(np.load(cache))
        arrays["sum"] = arrays["sum"] * 1.01
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        cache.write_bytes(buf.getvalue())
    else:
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    started = time.monotonic()
    second = farm.wait(farm.submit("--shard-size", "100"))
    assert second["images_featurized"] == N_SAMPLES + N_REF  # the reference was featurized again
    assert any(str(cache) in w for w in second["warnings"])
    report(f"reference cache {damage}", [first, second], 2, expected, time.monotonic() - started)


def test_cancel_during_a_single_batch_shard_leaves_no_partials(farm: Farm) -> None:
    farm.worker()
    job = farm.submit("--shard-size", "16", "--batch-size", "16", "--no-cache", "--metrics", "is")
    wait_until(lambda: bool(farm.sql("SELECT 1 FROM shards WHERE job_id = :id AND state = 'running'", id=job)), 120,
               "the shard to start")
    farm.cli("cancel", job)
    wait_until(lambda: not farm.sql("SELECT 1 FROM shards WHERE job_id = :id AND state = 'running'", id=job), 60,
               "the shard to stop")
    time.sleep(3)  # the shard's one batch ends; it must then write nothing
    assert farm.sql("SELECT state FROM shards WHERE job_id = :id", id=job) == [("failed",)]
    assert list(redis.Redis.from_url(farm.broker.url).scan_iter(match=f"evalfarm:partial:{job}:*")) == []
    assert not (farm.tmp / "store" / "jobs" / job).exists()
    assert farm.state(job) == "cancelled"
    REPORT.append({"fault": "cancel during a single-batch shard", "completed": 0, "total": 1, "identical": None,
                   "recovery_s": None, "partials_left": 0})


def test_twelve_concurrent_jobs_on_two_workers_all_succeed_identical(farm: Farm, expected: dict) -> None:
    farm.worker()
    farm.worker()
    started = time.monotonic()
    jobs = [farm.submit("--shard-size", "8") for _ in range(12)]
    results = [farm.wait(job) for job in jobs]
    featurized_reference = farm.sql(
        "SELECT count(*) FROM shards WHERE side = 'reference' AND state = 'done'")[0][0]
    assert featurized_reference == 2  # one job built the reference (12 images, 2 shards); the rest waited for it
    report("12 concurrent jobs on 2 workers", results, 12, expected, time.monotonic() - started)
