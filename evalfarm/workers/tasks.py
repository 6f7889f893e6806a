"""The farm's Celery tasks: thin shells over `evalfarm.scheduler.steps`, the functions `evalfarm eval` calls.

Fan-in without chords: the shard whose completion wins the guarded `running → reducing` UPDATE enqueues
the reducer, after its transaction committed. Every task shares one retry/failure policy (`farm_task`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from evalfarm.errors import EvalfarmError, JobCancelled
from evalfarm.scheduler import records, steps
from evalfarm.settings import get_settings
from evalfarm.workers import runtime
from evalfarm.workers.app import PLAN_TASK, REDUCE_TASK, SHARD_TASK, app

log = logging.getLogger(__name__)

MAX_RETRIES = 3  #: other errors (a bug, a full disk) are retried with backoff this many times, then fail the job
MAX_OUTAGE_RETRIES = 12  #: database or broker unreachable: retried this often (backoff capped) and never fatal
MAX_BACKOFF_S = 30
REFERENCE_WAIT_S = 3  #: how often a reduce waiting for another job's reference looks again

Failure = Callable[..., None]  #: failure(*task_args, message=..., final=...)


def is_outage(exc: BaseException) -> bool:
    """The database or the broker could not be reached: the job is not at fault, and must not fail for it."""
    import kombu.exceptions
    import redis.exceptions
    import sqlalchemy.exc

    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        return exc.connection_invalidated or isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)
    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError
                      | kombu.exceptions.OperationalError | ConnectionError)


def farm_task(name: str, *, on_failure: Failure, what: str) -> Callable[[Callable[..., None]], Any]:
    """Register `step` as a Celery task under one policy, so no task carries a retry ladder of its own:

    - a cancel ends the task quietly;
    - evalfarm's own errors (bad input, other weights, a poison shard) are deterministic: fail at once;
    - the time limit fails at once (retrying would hit it again);
    - an outage of the database or the broker is retried with capped backoff and never fails the job; if it
      outlasts the retries, the message is dropped and the reconciler sends the step again (every live step
      has a deadline it watches);
    - anything else is retried with exponential backoff, and fails the job after MAX_RETRIES.

    `on_failure` records an attempt (final=False) or the end (final=True); `what` names the step in messages.
    Recording needs the database too: when that fails, the task retries rather than lose the step.
    """

    def decorate(step: Callable[..., None]) -> Any:
        @app.task(name=name, bind=True, max_retries=None)
        def task(self, *args: Any) -> None:  # noqa: ANN001
            retries = self.request.retries
            try:
                step(*args)
                return
            except JobCancelled:
                return
            except EvalfarmError as exc:
                failure, final = str(exc), True
            except SoftTimeLimitExceeded:
                failure, final = f"{what} exceeded its time limit; use smaller --shard-size", True
            except Exception as exc:
                if is_outage(exc):
                    if retries >= MAX_OUTAGE_RETRIES:
                        log.warning("%s %s: outage outlasted %d retries; the reconciler will resend it", what, args,
                                    retries)
                        return
                    log.warning("%s %s: %s; retrying", what, args, type(exc).__name__)
                    raise self.retry(exc=exc, countdown=min(MAX_BACKOFF_S, 2**retries)) from exc
                failure, final = f"{what} failed: {type(exc).__name__}: {exc}", retries >= MAX_RETRIES
            try:
                on_failure(*args, message=failure, final=final)
            except Exception as exc:  # could not record it (database down): try again later, never drop it
                if retries >= MAX_OUTAGE_RETRIES:
                    log.warning("%s %s: could not record its failure; the reconciler will resend it", what, args)
                    return
                raise self.retry(exc=exc, countdown=min(MAX_BACKOFF_S, 2**retries)) from exc
            if not final:
                raise self.retry(countdown=min(MAX_BACKOFF_S, 2**retries))

        task.__doc__ = step.__doc__
        return task

    return decorate


def _fail_job(job_id: str, *, message: str, final: bool) -> None:
    if final:
        steps.fail_job(runtime.context(), job_id, message)


def _fail_planning(job_id: str, *, message: str, final: bool) -> None:
    if final:
        steps.fail_job(runtime.context(), job_id, message)
    else:  # the retry must find the job queued, or it would take it for planned already
        records.release_planning(runtime.context().sessions, job_id)


def _fail_shard(job_id: str, side: str, index: int, *, message: str, final: bool) -> None:
    steps.record_shard_failure(runtime.context(), job_id, side, index, message, final=final)


@farm_task(PLAN_TASK, on_failure=_fail_planning, what="planning")
def plan_job_task(job_id: str) -> None:
    """Plan the job with this farm's weights, then enqueue its shards (or its reduce, if none)."""
    planned = steps.plan_job(runtime.context(), job_id, runtime.weights().sha256,
                             heartbeat_s=get_settings().heartbeat_s)
    for side, index in planned.shards:
        featurize_shard.delay(job_id, side, index)
    if planned.reduce:
        reduce_job_task.delay(job_id)


@farm_task(SHARD_TASK, on_failure=_fail_shard, what="shard")
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


@farm_task(REDUCE_TASK, on_failure=_fail_job, what="reduce")
def reduce_job_task(job_id: str) -> None:
    """Merge and record; shards whose partials were lost are enqueued again, and they reduce again after."""
    outcome = steps.reduce_job(runtime.context(), job_id, heartbeat_s=get_settings().heartbeat_s)
    for side, index in outcome.recompute:
        featurize_shard.delay(job_id, side, index)
    if outcome.wait:
        reduce_job_task.apply_async((job_id,), countdown=REFERENCE_WAIT_S)
