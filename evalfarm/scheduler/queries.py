"""What users ask the results database: a job's progress, the history of a run, the named references, and the
farm's totals that its dashboard and `/metrics` show. Every function here only reads."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import lazyload

from evalfarm.db import Counter, Job, JobState, Reference, Result, Shard, ShardState
from evalfarm.db.models import IMAGES_FEATURIZED, SHARDS_DONE, SHARDS_FAILED
from evalfarm.errors import InvalidField
from evalfarm.keys import (
    ALL_METRIC_KEYS,
    EXTRACTOR_NAMES,
    INCEPTION,
    JOB_EVAL,
    METRIC_ALIASES,
    split_qualified,
)
from evalfarm.scheduler.job import JobSnapshot
from evalfarm.scheduler.records import Sessions, get_job, shards_of
from evalfarm.scheduler.webhooks import callback_status

MAX_LIMIT = 1000  #: the most rows one listing returns
LIVE_STATES = tuple(s for s in JobState if not s.final)


def job_status(sessions: Sessions, job_id: str) -> dict[str, Any]:
    """State, shards and images done/total, per-worker speed, ETA, failures, and the result once there."""
    job = get_job(sessions, job_id)
    shards = shards_of(sessions, job_id)
    done = [sh for sh in shards if sh.state == ShardState.DONE]
    images_total = sum(sh.stop - sh.start for sh in shards)
    images_done = sum(sh.stop - sh.start for sh in done)
    busy = sum(sh.seconds or 0.0 for sh in done)
    running = sum(sh.state == ShardState.RUNNING for sh in shards)
    rate, eta = _speed(images_total, images_done, busy, running, job.state)
    return {
        **_summary(job),
        "shards_done": len(done),
        "shards_total": len(shards),
        "images_done": images_done,
        "images_total": images_total,
        "images_per_second_per_worker": rate,
        "eta_seconds": eta,
        "failures": [
            {"side": sh.side, "shard": sh.index, "attempts": sh.attempts, "error": sh.error} for sh in shards if sh.error
        ],
        "shards": [
            {"side": sh.side, "index": sh.index, "state": sh.state.value, "attempts": sh.attempts, "worker": sh.worker}
            for sh in shards
        ],
        "result": job.result,
        "callback": callback_status(sessions, job_id, job.callback_url),
    }


def _speed(images_total: int, images_done: int, busy_s: float, running: int,
           state: JobState) -> tuple[float | None, float | None]:
    """(images/s of one worker over the done shards, seconds left while running): the rate measured so far,
    times the shards running now, spread over what is left."""
    rate = images_done / busy_s if busy_s else None
    eta = (images_total - images_done) / rate / max(1, running) if rate else None
    return rate, (eta if state == JobState.RUNNING else None)


def _summary(job: Job | JobSnapshot) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "state": JobState(job.state).value,
        "kind": job.kind,
        "run": job.run,
        "step": job.step,
        "tags": job.tags or {},
        "samples": job.samples_uri,
        "reference": job.reference_uri,
        "weights_sha256": job.weights_sha256,
        "submitted_by": job.submitted_by,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "error": job.error,
    }


def list_jobs(
    sessions: Sessions, *, run: str | None = None, state: JobState | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Jobs newest first, without their shards or results (`job_status` has those)."""
    q = select(Job).order_by(Job.created_at.desc()).limit(min(limit, MAX_LIMIT))
    if run:
        q = q.where(Job.run == run)
    if state:
        q = q.where(Job.state == state)
    with sessions() as s:
        return [_summary(j) for j in s.scalars(q.options(lazyload(Job.shards), lazyload(Job.results)))]


def _is_result_name(name: str) -> bool:
    key, extractor = split_qualified(name)
    return key in ALL_METRIC_KEYS and extractor in EXTRACTOR_NAMES


def query_results(
    sessions: Sessions, *, run: str | None = None, metric: str | None = None, limit: int = 50, offset: int = 0
) -> list[dict[str, Any]]:
    """Succeeded jobs, newest first; with a run, ordered by step so a training curve reads top to bottom.
    `offset` pages through longer histories (the order is total: ties are broken by job id)."""
    if metric and metric not in METRIC_ALIASES and not _is_result_name(metric):
        raise InvalidField("metric", f"{metric!r} is none of {', '.join((*METRIC_ALIASES, *ALL_METRIC_KEYS))}, "
                           "nor KEY@EXTRACTOR", where="query")
    with sessions() as s:
        q = select(Job).where(Job.state == JobState.SUCCEEDED, Job.kind == JOB_EVAL)
        if run is not None:
            q = q.where(Job.run == run).order_by(Job.step.asc().nulls_last(), Job.finished_at.asc(), Job.id)
        else:
            q = q.order_by(Job.finished_at.desc(), Job.id)
        rows = []
        for j in s.scalars(q.limit(min(limit, MAX_LIMIT)).offset(max(0, offset))):
            values = {r.name: r.value for r in j.results}
            if metric:
                key = METRIC_ALIASES.get(metric, metric)
                values = {
                    k: v
                    for k, v in values.items()
                    if k == key or (metric in METRIC_ALIASES and "@" not in k and k.startswith(key.rsplit("_", 1)[0]))
                }
            rows.append(
                {
                    "job_id": j.id,
                    "finished_at": j.finished_at,
                    "run": j.run,
                    "step": j.step,
                    "tags": j.tags,
                    "samples": j.samples_uri,
                    "reference": j.reference_uri,
                    "weights_sha256": j.weights_sha256,
                    "weights_canonical": (j.result or {}).get("weights_canonical"),
                    "metrics": values,
                }
            )
        return rows


def list_references(sessions: Sessions) -> list[dict[str, Any]]:
    with sessions() as s:
        return [
            {"name": r.name, "n": r.n, "resize": r.resize, "weights_sha256": r.weights_sha256, "uri": r.uri,
             "extractors": {e: v["weights_sha256"] for e, v in (r.extractors or {}).items()}
             or {INCEPTION: r.weights_sha256}}
            for r in s.scalars(select(Reference).order_by(Reference.name))
        ]


def job_detail(sessions: Sessions, job_id: str) -> dict[str, Any]:
    """`job_status` and what a person checking a job wants besides: its settings (the stored `EvalConfig`),
    the content hashes and sizes of its samples and reference, and when it started."""
    status = job_status(sessions, job_id)
    with sessions() as s:
        job = s.get(Job, job_id, options=[lazyload(Job.shards), lazyload(Job.results)])
        return {**status, "config": dict(job.config or {}), "mode": job.mode, "samples_sha256": job.samples_hash,
                "reference_sha256": job.reference_hash, "n_samples": job.n_samples, "n_reference": job.n_reference,
                "started_at": job.started_at}


def live_jobs(sessions: Sessions, *, limit: int = 100) -> list[dict[str, Any]]:
    """Jobs not ended (queued, planning, running, reducing), oldest first, each with its progress as
    `job_status` reckons it (shards and images done/total, speed, ETA) and its count of shards that failed
    an attempt, from one query."""
    images = Shard.stop - Shard.start
    done = Shard.state == ShardState.DONE
    progress = (
        select(
            Shard.job_id,
            func.count().label("shards_total"),
            func.sum(case((done, 1), else_=0)).label("shards_done"),
            func.sum(images).label("images_total"),
            func.sum(case((done, images), else_=0)).label("images_done"),
            func.sum(case((done, func.coalesce(Shard.seconds, 0.0)), else_=0.0)).label("busy"),
            func.sum(case((Shard.state == ShardState.RUNNING, 1), else_=0)).label("running"),
            func.sum(case((Shard.error.is_not(None), 1), else_=0)).label("failures"),
        )
        .group_by(Shard.job_id)
        .subquery()
    )
    q = (
        select(Job, progress)
        .outerjoin(progress, progress.c.job_id == Job.id)
        .where(Job.state.in_(LIVE_STATES))
        .order_by(Job.created_at.asc())
        .limit(min(limit, MAX_LIMIT))
        .options(lazyload(Job.shards), lazyload(Job.results))
    )
    rows = []
    with sessions() as s:
        for row in s.execute(q):
            job = row.Job
            total, images_total, images_done = row.shards_total or 0, row.images_total or 0, row.images_done or 0
            rate, eta = _speed(images_total, images_done, float(row.busy or 0.0), row.running or 0,
                               JobState(job.state))
            rows.append({**_summary(job), "shards_done": row.shards_done or 0, "shards_total": total,
                         "images_done": images_done, "images_total": images_total,
                         "images_per_second_per_worker": rate, "eta_seconds": eta, "failures": row.failures or 0})
    return rows


def ended_jobs(sessions: Sessions, *, limit: int = 20) -> list[dict[str, Any]]:
    """The jobs that ended last (succeeded, failed or cancelled), latest first."""
    q = (select(Job).where(Job.state.not_in(LIVE_STATES)).order_by(Job.finished_at.desc().nulls_last())
         .limit(min(limit, MAX_LIMIT)).options(lazyload(Job.shards), lazyload(Job.results)))
    with sessions() as s:
        return [_summary(j) for j in s.scalars(q)]


def list_runs(sessions: Sessions, *, limit: int = MAX_LIMIT) -> list[dict[str, Any]]:
    """Every run with a succeeded evaluation, most recently finished first: its number of results, its last
    step, and the metric values of the result at that step (the latest one, when results have no step)."""
    ranked = (
        select(
            Job.id, Job.run, Job.step,
            func.count().over(partition_by=Job.run).label("results"),
            func.max(Job.finished_at).over(partition_by=Job.run).label("last_finished_at"),
            func.row_number().over(partition_by=Job.run,
                                   order_by=(Job.step.desc().nulls_last(), Job.finished_at.desc())).label("rank"),
        )
        .where(Job.state == JobState.SUCCEEDED, Job.kind == JOB_EVAL, Job.run.is_not(None))
        .subquery()
    )
    q = (select(ranked).where(ranked.c.rank == 1)
         .order_by(ranked.c.last_finished_at.desc().nulls_last(), ranked.c.run).limit(min(limit, MAX_LIMIT)))
    with sessions() as s:
        latest = s.execute(q).all()
        values: dict[str, dict[str, float]] = {}
        ids = [r.id for r in latest]
        for job_id, name, value in s.execute(select(Result.job_id, Result.name, Result.value)
                                             .where(Result.job_id.in_(ids))):
            values.setdefault(job_id, {})[name] = value
    return [{"run": r.run, "results": r.results, "last_step": r.step, "last_finished_at": r.last_finished_at,
             "job_id": r.id, "metrics": values.get(r.id, {})} for r in latest]


@dataclass(frozen=True)
class FarmTotals:
    """The farm's counts at one moment, from the database: what `/metrics` exports."""

    jobs_by_state: dict[JobState, int]
    """Every state, with 0 where no job is in it."""
    shards_done: int
    """Shards finished, ever: a shard computed again after its partial was lost counts again."""
    shards_failed: int
    """Shards that failed for good (their job failed with them)."""
    images_featurized: int
    """Images in the shards finished, ever: what the workers featurized (a cached reference is not featurized
    again; a recomputed shard's images count again, since they were featurized again)."""
    oldest_heartbeat: datetime | None
    """The oldest last heartbeat among running shards and planning/reducing jobs; None when none holds a lease."""


def farm_totals(sessions: Sessions) -> FarmTotals:
    """Jobs by state, the farm's counters and the oldest live lease: small queries, whatever the history."""
    with sessions() as s:
        by_state = dict.fromkeys(JobState, 0)
        for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
            by_state[JobState(state)] = n
        counters = dict(s.execute(select(Counter.name, Counter.value)).all())
        shard_beat = s.scalar(select(func.min(Shard.heartbeat_at)).where(Shard.state == ShardState.RUNNING))
        job_beat = s.scalar(select(func.min(Job.heartbeat_at))
                            .where(Job.state.in_((JobState.PLANNING, JobState.REDUCING))))
    beats = [t for t in (shard_beat, job_beat) if t is not None]
    return FarmTotals(by_state, int(counters.get(SHARDS_DONE, 0)), int(counters.get(SHARDS_FAILED, 0)),
                      int(counters.get(IMAGES_FEATURIZED, 0)), min(beats) if beats else None)
