"""Section 4: the farm's overhead over the embedded runner, on the same job, with 1 then 2 workers.

Needs Redis at 127.0.0.1:6379 and Postgres at 127.0.0.1:5432 (database `test`); skipped otherwise.
Redis db 14 is this benchmark's (flushed before and after; other test suites use db 15). The workers run
with the reconciler effectively off (EVALFARM_RECONCILE_S=1 day): the `test` database is shared, and a
reconciler on a freshly flushed broker requeues *every* running job's shards in it, other suites' included.
The jobs this section creates are deleted from Postgres at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common import OUT_DIR, VENV_BIN, Report, ratio, section_header, timed

REDIS_URL = "redis://127.0.0.1:6379/14"
DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
READY_TIMEOUT_S = 240
JOB_TIMEOUT_S = 3600


def services_missing() -> str | None:
    """Why the farm cannot run here, or None when Redis and Postgres both answer."""
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2).ping()
    except Exception as exc:
        return f"Redis at {REDIS_URL} does not answer: {type(exc).__name__}: {exc}"
    try:
        import psycopg

        psycopg.connect(DATABASE_URL, connect_timeout=3).close()
    except Exception as exc:
        return f"Postgres at {DATABASE_URL} does not answer: {type(exc).__name__}: {exc}"
    return None


def flush_redis() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


def farm_env(root: Path, weights: Path) -> dict[str, str]:
    return {
        "EVALFARM_DATABASE_URL": DATABASE_URL,
        "EVALFARM_REDIS_URL": REDIS_URL,
        "EVALFARM_STORE": str(root / "farm-store"),
        "EVALFARM_HOME": str(root / "farm-home"),
        "EVALFARM_WEIGHTS": str(weights),
        "EVALFARM_DEVICE": "cpu",
        "EVALFARM_ALLOW_DOWNLOAD": "0",
        "EVALFARM_RECONCILE_S": "86400",
    }


@contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------- workers


def _wait_ready(log: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if " ready." in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"worker not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each worker's process group (the worker, its pool child, their DataLoader workers), then KILL."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)


@contextmanager
def workers(count: int, env: dict[str, str], logdir: Path) -> Iterator[list[subprocess.Popen]]:
    """`count` separate `evalfarm worker -c 1` processes, each in its own session so killpg reaches all."""
    logdir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        for i in range(count):
            log = logdir / f"worker{count}-{i}.log"
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(
                    [str(VENV_BIN / "evalfarm"), "worker", "-c", "1", "--queues", "gpu,cpu"],
                    env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                ))
            _wait_ready(log, procs[-1])
        yield procs
    finally:
        _stop(procs)


# ---------------------------------------------------------------------------------------------- jobs


def submit_and_wait(client: Any, samples: Path, ref: Path, config: Any) -> tuple[str, dict[str, float]]:
    """Submit, wait; client-side wall clock of each step (UTC, to line up with the database's timestamps)."""
    t = {"submit_start": time.time()}
    job_id = client.submit(str(samples), str(ref), config)
    t["submit_end"] = time.time()
    client.wait(job_id, timeout=JOB_TIMEOUT_S, poll_s=0.1)
    t["done"] = time.time()
    return job_id, t


def _ts(dt: datetime | None) -> float | None:
    if dt is None:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def breakdown(report: Report, sessions: Any, job_id: str, t: dict[str, float], prefix: str) -> None:
    """Split the job's wall time with the database's timestamps, as far as they allow (see README).

    Works for embedded jobs too (their SQLite rows have the same timestamps), where "planning + first shard
    queue wait" is planning + building the network, and there is no queue.
    """
    from sqlalchemy import select

    from evalfarm.db import Job, Shard

    with sessions() as s:
        job = s.get(Job, job_id)
        shards = sorted(s.scalars(select(Shard).where(Shard.job_id == job_id)), key=lambda x: _ts(x.started_at))
        created, started, finished = _ts(job.created_at), _ts(job.started_at), _ts(job.finished_at)
    f = report.figure
    if "submit_end" in t:
        f(f"{prefix}.submit_s", t["submit_end"] - t["submit_start"], "s")
    else:
        f(f"{prefix}.before_job_row_s", created - t["submit_start"], "s")
    f(f"{prefix}.plan_queue_wait_s", started - created, "s")
    first_start = _ts(shards[0].started_at)
    f(f"{prefix}.planning_plus_first_shard_queue_wait_s", first_start - started, "s")
    for sh in shards:
        busy = _ts(sh.finished_at) - _ts(sh.started_at)
        f(f"{prefix}.shard.{sh.side}{sh.index}.featurize_s", sh.seconds, "s")
        f(f"{prefix}.shard.{sh.side}{sh.index}.open_source_write_partials_s", busy - sh.seconds, "s")
    gaps = [(_ts(b.started_at) - _ts(a.finished_at)) for a, b in zip(shards, shards[1:], strict=False)]
    f(f"{prefix}.between_shards_s", sum(max(g, 0.0) for g in gaps), "s")
    last_end = max(_ts(sh.finished_at) for sh in shards)
    f(f"{prefix}.featurize_span_s", last_end - first_start, "s")
    f(f"{prefix}.reduce_queue_wait_plus_reduce_s", finished - last_end, "s")
    f(f"{prefix}.after_finish_s", t["done"] - finished, "s")
    f(f"{prefix}.total_s", t["done"] - t["submit_start"], "s")


def delete_jobs(client: Any, job_ids: list[str]) -> None:
    from sqlalchemy import delete

    from evalfarm.db import Job

    if job_ids:
        with client.ctx.sessions.begin() as s:
            s.execute(delete(Job).where(Job.id.in_(job_ids)))


# ---------------------------------------------------------------------------------------------- the section


WARM_BATCH = 64  #: the job's batch size: CPU convolution kernels are built per batch shape, on first use


def warm_samples(root: Path) -> Any:
    """Two full batches of 32x32 PNGs: a warm-up job of two shards gives each of two workers a full batch."""
    import featurize
    from common import write_image_set

    folder = root / "images" / "warm-farm-png32"
    if not folder.is_dir():
        write_image_set(folder, 2 * WARM_BATCH, 32, "png", seed=5)
    return featurize.ImageSet("warm-farm-png32", folder, 2 * WARM_BATCH)


def embedded_baseline(report: Report, w: Any, root: Path, weights: Path) -> float:
    """The same job embedded (`evaluate`), after the farm's warm-up job run embedded; plus pure featurization."""
    import featurize

    from evalfarm.db import session_factory

    settings = featurize.evalfarm_settings(root / "farm-embedded-home", weights, "cpu")
    featurize.evalfarm_evaluate(w, warm_samples(root), w.warm_b, settings)
    t = {"submit_start": time.time()}
    result, t_embedded = featurize.evalfarm_evaluate(w, w.a, w.b, settings)
    t["done"] = time.time()
    report.figure("farm.embedded_evaluate_wall_s", t_embedded, "s")
    breakdown(report, session_factory(settings.db_url), result["job_id"], t, "farm.embedded")
    extractor = featurize.evalfarm_extractor(weights, "cpu")
    t_pure = sum(featurize.evalfarm_featurize(s, extractor, "cpu")[1] for s in w.sets)
    report.figure("farm.pure_featurize_both_sets_s", t_pure, "s")
    return t_embedded


def farm_runs(report: Report, w: Any, root: Path, weights: Path, env: dict[str, str], t_embedded: float) -> None:
    from evalfarm.config import EvalConfig
    from evalfarm.farm import Farm

    client = Farm()
    config = EvalConfig(metrics=("is", "fid"), cache=False, batch_size=64)
    warm_config = config.with_(shard_size=WARM_BATCH)
    job_ids: list[str] = []
    try:
        for count in (1, 2):
            with workers(count, env, OUT_DIR / "farm-logs"):
                # Warm-up, as the embedded run had: every worker loads its network and runs full batches once.
                job_ids.append(submit_and_wait(client, warm_samples(root).folder, w.warm_b.folder, warm_config)[0])
                job_id, t = submit_and_wait(client, w.a.folder, w.b.folder, config)
                job_ids.append(job_id)
                prefix = f"farm.w{count}"
                breakdown(report, client.ctx.sessions, job_id, t, prefix)
                total = t["done"] - t["submit_start"]
                report.figure(f"{prefix}.ratio_over_embedded", ratio(total, t_embedded), "x")
    finally:
        delete_jobs(client, job_ids)


def run(report: Report, *, root: Path, weights: Path, quick: bool, workload: Any = None) -> None:
    section_header("4. farm: Celery workers (Redis db 14, Postgres `test`) vs embedded, same job")
    missing = services_missing()
    if missing:
        print(f"farm: skipped ({missing})", flush=True)
        return
    import featurize

    w = workload or featurize.make_workload(root / "images", quick)
    report.note(f"job: IS+FID of {w.a.label} ({w.a.n}) against {w.b.label} ({w.b.n}), cache off, default shard "
                "size (one shard per side); workers are `evalfarm worker -c 1`, device cpu")
    with timed() as t_section:
        t_embedded = embedded_baseline(report, w, root, weights)
        env = farm_env(root, weights)
        flush_redis()
        try:
            with patched_environ(env):
                farm_runs(report, w, root, weights, env, t_embedded)
        finally:
            flush_redis()
    report.note(f"farm section took {t_section[0]:.0f} s")
    report.note("not derivable from the recorded timestamps: planning vs the first shard's queue wait, "
                "reduce queue wait vs reduce compute, source opening vs partial writing (see README)")
