"""The farm's Celery tasks: thin shells over `evalfarm.scheduler.steps`, the functions `evalfarm eval` calls.

Fan-in without chords: the shard whose completion wins the guarded `running → reducing` UPDATE enqueues
the reducer, after its transaction committed. Every task shares one retry/failure policy (`farm_task`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from evalfarm.errors import EvalfarmError, JobCancelled
from evalfarm.scheduler import records, steps
from evalfarm.settings import get_settings
from evalfarm.workers import runtime
from evalfarm.workers.app import app

MAX_RETRIES = 3  #: transient errors (I/O, connections) are retried with backoff this many times

Failure = Callable[..., None]  #: failure(*task_args, message=..., final=...)


def farm_task(name: str, *, on_failure: Failure, what: str) -> Callable[[Callable[..., None]], Any]:
    """Register `step` as a Celery task under one policy, so no task carries a retry ladder of its own:

    - a cancel ends the task quietly;
    - evalfarm's own errors (bad input, other weights, a poison shard) are deterministic: fail at once;
    - the time limit fails at once (retrying would hit it again);
    - anything else is transient: retry with exponential backoff, and fail after MAX_RETRIES.

    `on_failure` records an attempt (final=False) or the end (final=True); `what` names the step in messages.
    """

    def decorate(step: Callable[..., None]) -> Any:
        @app.task(name=name, bind=True, max_retries=MAX_RETRIES)
        def task(self, *args: Any) -> None:  # noqa: ANN001
            try:
                step(*args)
            except JobCancelled:
                return
            except EvalfarmError as exc:
                on_failure(*args, message=str(exc), final=True)
            except SoftTimeLimitExceeded:
                on_failure(*args, message=f"{what} exceeded its time limit; use smaller --shard-size", final=True)
            except Exception as exc:
                final = self.request.retries >= MAX_RETRIES
                on_failure(*args, message=f"{what} failed: {type(exc).__name__}: {exc}", final=final)
                if not final:
                    raise self.retry(exc=exc, countdown=2**self.request.retries) from exc

        task.__doc__ = step.__doc__
        return task

    return decorate


def _fail_job(job_id: str, *, message: str, final: bool) -> None:
    if final:
        steps.fail_job(runtime.context(), job_id, message)


def _fail_shard(job_id: str, side: str, index: int, *, message: str, final: bool) -> None:
    steps.record_shard_failure(runtime.context(), job_id, side, index, message, final=final)


@farm_task("evalfarm.plan_job", on_failure=_fail_job, what="planning")
def plan_job_task(job_id: str) -> None:
    """Plan the job with this farm's weights, then enqueue its shards (or its reduce, if none)."""
    planned = steps.plan_job(runtime.context(), job_id, runtime.weights().sha256)
    for side, index in planned.shards:
        featurize_shard.delay(job_id, side, index)
    if planned.reduce:
        reduce_job_task.delay(job_id)


@farm_task("evalfarm.featurize_shard", on_failure=_fail_shard, what="shard")
def featurize_shard(job_id: str, side: str, index: int) -> None:
    """Featurize one shard; the shard that completes the job enqueues its reduce."""
    ctx, settings = runtime.context(), get_settings()
    precision = records.get_job(ctx.sessions, job_id).config.precision
    ready = steps.run_shard(
        ctx, job_id, side, index, runtime.extractor(precision), worker=runtime.worker_name(),
        lease_s=settings.lease_s, heartbeat_s=settings.heartbeat_s, num_workers=settings.loader_workers,
    )
    if ready:
        reduce_job_task.delay(job_id)


@farm_task("evalfarm.reduce_job", on_failure=_fail_job, what="reduce")
def reduce_job_task(job_id: str) -> None:
    """Merge and record; shards whose partials were lost are enqueued again, and they reduce again after."""
    for side, index in steps.reduce_job(runtime.context(), job_id).recompute:
        featurize_shard.delay(job_id, side, index)
