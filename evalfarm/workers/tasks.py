"""Thin Celery tasks over `evalfarm.scheduler.jobs`: the same functions the embedded runner calls.

Fan-in without chords: the shard whose completion wins the guarded `running → reducing` UPDATE enqueues
the reducer, after its transaction committed. A periodic reconciler (in each worker's main process,
one at a time through a Redis lock) requeues shards whose worker stopped heart-beating.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta

import redis
from celery import signals
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update

from evalfarm.db import Job, Shard, session_factory
from evalfarm.db.models import utcnow
from evalfarm.errors import EvalfarmError, JobCancelled
from evalfarm.models import FeatureExtractor
from evalfarm.scheduler.jobs import (
    Context,
    fail_job,
    plan_job,
    record_shard_failure,
    reduce_job,
    run_shard,
)
from evalfarm.scheduler.local import load_weights
from evalfarm.settings import get_settings
from evalfarm.store import FeatureStore
from evalfarm.workers.app import app
from evalfarm.workers.partials import RedisPartials

log = logging.getLogger(__name__)

MAX_RETRIES = 3  #: transient errors (I/O, connections) are retried with backoff this many times
MAX_ATTEMPTS = 4  #: a shard started this often (worker deaths included) fails the job: a poison shard
EPOCH_KEY = "evalfarm:epoch"  #: vanishes when Redis restarts without persistence or is flushed

_ctx: Context | None = None
_extractor: FeatureExtractor | None = None
_device: str | None = None


def context() -> Context:
    """Per-process context, created lazily (never before the prefork pool forks)."""
    global _ctx
    if _ctx is None:
        s = get_settings()
        store = FeatureStore(s.store)
        _ctx = Context(session_factory(s.db_url), store, RedisPartials(redis.Redis.from_url(s.redis_url), store))
    return _ctx


def extractor(precision: str) -> FeatureExtractor:
    """The network, loaded once per worker process on its own GPU, kept for the process's life."""
    global _extractor
    if _extractor is None or _extractor.precision != precision:
        s = get_settings()
        _extractor = FeatureExtractor(load_weights(s), _device or s.device, precision)
    return _extractor


@signals.worker_process_init.connect
def _pick_device(**_: object) -> None:
    """One process per GPU: child k of the pool uses GPU k (CUDA is first touched here, after the fork)."""
    global _device
    import multiprocessing

    from billiard.process import current_process

    # Pool children are daemonic, and daemonic processes may not start the DataLoader's decode processes.
    # Those watch their parent and exit with it, so lifting the flag leaks nothing.
    for proc in (current_process(), multiprocessing.current_process()):
        proc._config["daemon"] = False  # noqa: SLF001
    wanted = get_settings().device
    index = getattr(current_process(), "index", 0) or 0
    if wanted in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            _device = f"cuda:{index % torch.cuda.device_count()}"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Heartbeat(threading.Thread):
    """Refreshes the shard's lease while it runs, independent of how long one batch takes."""

    def __init__(self, job_id: str, side: str, index: int) -> None:
        super().__init__(daemon=True)
        self.key, self.done = (job_id, side, index), threading.Event()

    def run(self) -> None:
        job_id, side, index = self.key
        while not self.done.wait(get_settings().heartbeat_s):
            try:
                with context().sessions.begin() as s:
                    s.execute(
                        update(Shard)
                        .where(Shard.job_id == job_id, Shard.side == side, Shard.index == index)
                        .values(heartbeat_at=utcnow())
                    )
            except Exception:  # a missed beat is not fatal; the lease is several beats long
                log.warning("heartbeat failed", exc_info=True)


@app.task(name="evalfarm.plan_job", bind=True, max_retries=MAX_RETRIES)
def plan_job_task(self, job_id: str) -> None:  # noqa: ANN001
    try:
        todo = plan_job(context(), job_id)
    except EvalfarmError as exc:
        fail_job(context(), job_id, str(exc))
        return
    except Exception as exc:
        if self.request.retries >= MAX_RETRIES:
            fail_job(context(), job_id, f"planning failed: {type(exc).__name__}: {exc}")
            return
        raise self.retry(exc=exc, countdown=2**self.request.retries) from exc
    for side, index in todo:
        featurize_shard.delay(job_id, side, index)
    if todo == [] and _state(job_id) == "reducing":
        reduce_job_task.delay(job_id)


def _state(job_id: str) -> str | None:
    with context().sessions() as s:
        return s.scalar(select(Job.state).where(Job.id == job_id))


def _attempts(job_id: str, side: str, index: int) -> int:
    with context().sessions() as s:
        return s.scalar(
            select(Shard.attempts).where(Shard.job_id == job_id, Shard.side == side, Shard.index == index)
        ) or 0


@app.task(name="evalfarm.featurize_shard", bind=True, max_retries=MAX_RETRIES)
def featurize_shard(self, job_id: str, side: str, index: int) -> None:  # noqa: ANN001
    ctx = context()
    if _attempts(job_id, side, index) >= MAX_ATTEMPTS:
        record_shard_failure(ctx, job_id, side, index, f"started {MAX_ATTEMPTS} times without finishing "
                             "(its worker died each time: out of memory?)", final=True)
        return
    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        precision = job.config.get("precision", "fp32") if job else "fp32"
    beat = _Heartbeat(job_id, side, index)
    beat.start()
    try:
        ready = run_shard(
            ctx, job_id, side, index, extractor(precision), worker=worker_name(), lease_s=get_settings().lease_s,
            num_workers=get_settings().loader_workers,
        )
    except JobCancelled:
        return
    except EvalfarmError as exc:  # bad input or wrong weights: deterministic, retrying cannot help
        record_shard_failure(ctx, job_id, side, index, str(exc), final=True)
        return
    except SoftTimeLimitExceeded:
        record_shard_failure(ctx, job_id, side, index, "shard exceeded its time limit; use smaller --shard-size",
                             final=True)
        return
    except Exception as exc:
        final = self.request.retries >= MAX_RETRIES
        record_shard_failure(ctx, job_id, side, index, f"{type(exc).__name__}: {exc}", final=final)
        if final:
            return
        raise self.retry(exc=exc, countdown=2**self.request.retries) from exc
    finally:
        beat.done.set()
    if ready:
        reduce_job_task.delay(job_id)


@app.task(name="evalfarm.reduce_job", bind=True, max_retries=MAX_RETRIES)
def reduce_job_task(self, job_id: str) -> None:  # noqa: ANN001
    ctx = context()
    try:
        outcome = reduce_job(ctx, job_id)
    except EvalfarmError as exc:
        fail_job(ctx, job_id, str(exc))
        return
    except Exception as exc:
        if self.request.retries >= MAX_RETRIES:
            fail_job(ctx, job_id, f"reduce failed: {type(exc).__name__}: {exc}")
            return
        raise self.retry(exc=exc, countdown=2**self.request.retries) from exc
    if isinstance(outcome, list):  # partials were lost: recompute those shards, then reduce again
        for side, index in outcome:
            featurize_shard.delay(job_id, side, index)


def reconcile(ctx: Context, client: redis.Redis, lease_s: float) -> list[tuple[str, str, int]]:
    """Requeue work whose message or worker was lost; returns the shards requeued.

    Expired leases: shards of running jobs whose worker stopped heart-beating (killed, machine lost);
    Celery alone would redeliver them only after the visibility timeout. A restarted or flushed broker:
    queued messages are gone, so every unfinished step of every live job is enqueued again (steps are
    idempotent, so a duplicate costs time, never correctness).
    """
    broker_lost = client.set(EPOCH_KEY, worker_name(), nx=True)
    cutoff = utcnow() - timedelta(seconds=lease_s)
    requeued = []
    with ctx.sessions.begin() as s:
        lost = (Shard.state == "running") & (Shard.heartbeat_at < cutoff)
        if broker_lost:
            lost = lost | (Shard.state == "pending")
        stale = s.execute(
            select(Shard.id, Shard.job_id, Shard.side, Shard.index)
            .join(Job, Job.id == Shard.job_id)
            .where(Job.state == "running", lost)
            .with_for_update(skip_locked=True)
        ).all()
        for shard_id, job_id, side, index in stale:
            s.execute(
                update(Shard)
                .where(Shard.id == shard_id, Shard.state != "done")
                .values(state="pending", error="worker or message lost; requeued")
            )
            requeued.append((job_id, side, index))
        queued = list(s.scalars(select(Job.id).where(Job.state == "queued"))) if broker_lost else []
        reducing = list(s.scalars(select(Job.id).where(Job.state == "reducing"))) if broker_lost else []
    for job_id, side, index in requeued:  # after commit
        featurize_shard.delay(job_id, side, index)
    for job_id in queued:
        plan_job_task.delay(job_id)
    for job_id in reducing:
        reduce_job_task.delay(job_id)
    return requeued


def _reconcile_loop() -> None:
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url)
    while True:
        time.sleep(settings.reconcile_s)
        try:
            if client.set("evalfarm:reconciler", worker_name(), nx=True, px=int(settings.reconcile_s * 1000)):
                for job_id, side, index in reconcile(context(), client, settings.lease_s):
                    log.warning("requeued shard %s/%s of job %s", side, index, job_id)
        except Exception:
            log.warning("reconciler pass failed", exc_info=True)


@signals.worker_ready.connect
def _start_reconciler(**_: object) -> None:
    threading.Thread(target=_reconcile_loop, name="evalfarm-reconciler", daemon=True).start()
