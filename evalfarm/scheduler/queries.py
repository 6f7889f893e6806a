"""What users ask the results database: a job's progress, the history of a run, the named references."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import lazyload

from evalfarm.db import Job, JobState, Reference, ShardState
from evalfarm.errors import InvalidField
from evalfarm.keys import JOB_EVAL, METRIC_ALIASES, METRIC_KEYS
from evalfarm.scheduler.job import JobSnapshot
from evalfarm.scheduler.records import Sessions, get_job, shards_of
from evalfarm.scheduler.webhooks import callback_status

MAX_LIMIT = 1000  #: the most rows one listing returns


def job_status(sessions: Sessions, job_id: str) -> dict[str, Any]:
    """State, shards and images done/total, per-worker speed, ETA, failures, and the result once there."""
    job = get_job(sessions, job_id)
    shards = shards_of(sessions, job_id)
    done = [sh for sh in shards if sh.state == ShardState.DONE]
    images_total = sum(sh.stop - sh.start for sh in shards)
    images_done = sum(sh.stop - sh.start for sh in done)
    busy = sum(sh.seconds or 0.0 for sh in done)
    rate = images_done / busy if busy else None
    running = max(1, sum(sh.state == ShardState.RUNNING for sh in shards))
    eta = (images_total - images_done) / rate / running if rate else None
    return {
        **_summary(job),
        "shards_done": len(done),
        "shards_total": len(shards),
        "images_done": images_done,
        "images_total": images_total,
        "images_per_second_per_worker": rate,
        "eta_seconds": eta if job.state == JobState.RUNNING else None,
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


def query_results(
    sessions: Sessions, *, run: str | None = None, metric: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Succeeded jobs, newest first; with a run, ordered by step so a training curve reads top to bottom."""
    if metric and metric not in METRIC_ALIASES and metric not in METRIC_KEYS:
        raise InvalidField("metric", f"{metric!r} is none of {', '.join((*METRIC_ALIASES, *METRIC_KEYS))}",
                           where="query")
    with sessions() as s:
        q = select(Job).where(Job.state == JobState.SUCCEEDED, Job.kind == JOB_EVAL)
        if run:
            q = q.where(Job.run == run).order_by(Job.step.asc().nulls_last(), Job.finished_at.asc())
        else:
            q = q.order_by(Job.finished_at.desc())
        rows = []
        for j in s.scalars(q.limit(min(limit, MAX_LIMIT))):
            values = {r.name: r.value for r in j.results}
            if metric:
                key = METRIC_ALIASES.get(metric, metric)
                values = {
                    k: v
                    for k, v in values.items()
                    if k == key or (metric in METRIC_ALIASES and k.startswith(key.rsplit("_", 1)[0]))
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
                    "metrics": values,
                }
            )
        return rows


def list_references(sessions: Sessions) -> list[dict[str, Any]]:
    with sessions() as s:
        return [
            {"name": r.name, "n": r.n, "resize": r.resize, "weights_sha256": r.weights_sha256, "uri": r.uri}
            for r in s.scalars(select(Reference).order_by(Reference.name))
        ]
