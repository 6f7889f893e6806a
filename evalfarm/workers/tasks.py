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
from evalfarm.scheduler import ends, records, steps, webhooks
from evalfarm.settings import get_settings
from evalfarm.workers import runtime
from evalfarm.workers.app import DELIVER_TASK, PLAN_TASK, PRC_TILE_TASK, REDUCE_TASK, SHARD_TASK, app
from evalfarm.workers.outages import is_outage

log = logging.getLogger(__name__)

MAX_RETRIES = 3  #: other errors (a bug, a full disk) are retried with backoff this many times, then fail the job
MAX_OUTAGE_RETRIES = 12  #: database or broker unreachable: retried this often (backoff capped) and never fatal
MAX_BACKOFF_S = 30
REFERENCE_WAIT_S = 3  #: how often a reduce waiting for another job's reference looks again

Failure = Callable[..., None]  #: failure(*task_args, message=..., final=...)


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
    Recording needs the database too: when that fails, the task retries rather than lose the step. A final
    failure ends the job (`args[0]`): its webhook is sent after it.
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
            log.warning("%s %s %s: %s", what, args, "failed for good" if final else "failed; will retry", failure)
            try:
                on_failure(*args, message=failure, final=final)
            except Exception as exc:  # could not record it (database down): try again later, never drop it
                if retries >= MAX_OUTAGE_RETRIES:
                    log.warning("%s %s: could not record its failure; the reconciler will resend it", what, args)
                    return
                raise self.retry(exc=exc, countdown=min(MAX_BACKOFF_S, 2**retries)) from exc
            if not final:
                raise self.retry(countdown=min(MAX_BACKOFF_S, 2**retries))
            send_deliveries(args[0])

        task.__doc__ = step.__doc__
        return task

    return decorate


def _fail_job(job_id: str, *, message: str, final: bool) -> None:
    if final:
        ends.fail_job(runtime.context(), job_id, message)


def _fail_planning(job_id: str, *, message: str, final: bool) -> None:
    if final:
        ends.fail_job(runtime.context(), job_id, message)
    else:  # the retry must find the job queued, or it would take it for planned already
        records.release_planning(runtime.context().sessions, job_id)


def _fail_shard(job_id: str, side: str, index: int, *, message: str, final: bool) -> None:
    steps.record_shard_failure(runtime.context(), job_id, side, index, message, final=final)


@farm_task(PLAN_TASK, on_failure=_fail_planning, what="planning")
def plan_job_task(job_id: str) -> None:
    """Plan the job with this farm's weights, then enqueue its shards (or its reduce, if none)."""
    planned = steps.plan_job(runtime.context(), job_id, lambda name: runtime.weights(name).sha256,
                             heartbeat_s=get_settings().heartbeat_s)
    for side, index in planned.shards:
        featurize_shard.delay(job_id, side, index)
    if planned.reduce:
        reduce_job_task.delay(job_id)


@farm_task(SHARD_TASK, on_failure=_fail_shard, what="shard")
def featurize_shard(job_id: str, side: str, index: int) -> None:
    """Featurize one shard; the shard that completes the job enqueues its reduce."""
    ctx, settings = runtime.context(), get_settings()
    config = runtime.job_config(job_id)
    ready = steps.run_shard(
        ctx, job_id, side, index, runtime.featurizers(config.featurizers, config.precision),
        worker=runtime.worker_name(),
        lease_s=settings.lease_s, heartbeat_s=settings.heartbeat_s, num_workers=settings.loader_workers,
    )
    if ready:
        reduce_job_task.delay(job_id)


@farm_task(REDUCE_TASK, on_failure=_fail_job, what="reduce")
def reduce_job_task(job_id: str) -> None:
    """Merge and record; shards whose partials were lost are enqueued again, and they reduce again after.
    Precision/recall's tiles are sent as tasks of their own, and the reduce looks again shortly."""
    settings = get_settings()
    outcome = steps.reduce_job(runtime.context(), job_id, heartbeat_s=settings.heartbeat_s,
                               pending_s=settings.pending_s)
    send_deliveries(job_id)  # succeeded, or failed for good after too many rounds of lost partials
    for side, index in outcome.recompute:
        featurize_shard.delay(job_id, side, index)
    for name in outcome.tiles:
        prc_tile_task.delay(job_id, name)
    if outcome.wait:
        reduce_job_task.apply_async((job_id,), countdown=REFERENCE_WAIT_S)


def _fail_tile(job_id: str, name: str, *, message: str, final: bool) -> None:
    if final:  # else the task is retried; should its worker die, the tile's lease runs out and the reduce resends it
        ends.fail_job(runtime.context(), job_id, f"precision/recall tile {name}: {message}")


@farm_task(PRC_TILE_TASK, on_failure=_fail_tile, what="precision/recall tile")
def prc_tile_task(job_id: str, name: str) -> None:
    """One tile of precision/recall's distance matrices (see `scheduler.prc_tiles`); the polling reduce collects it."""
    settings = get_settings()
    steps.run_prc_tile(runtime.context(), job_id, name, lease_s=settings.lease_s, heartbeat_s=settings.heartbeat_s)


def send_deliveries(job_id: str) -> None:
    """Send the webhook of a job that just ended, if it has one. Should this fail (an outage), the reconciler
    finds the delivery overdue and sends it: the row was written with the job's end."""
    try:
        for delivery_id in webhooks.due(runtime.context().sessions, job_id):
            deliver_webhook.delay(delivery_id)
    except Exception as exc:  # noqa: BLE001 - never let a notification fail the step that ended the job
        log.warning("job %s: webhook not sent now (%s); the reconciler will send it", job_id, type(exc).__name__)


@app.task(name=DELIVER_TASK, bind=True, max_retries=None)
def deliver_webhook(self, delivery_id: str) -> None:  # noqa: ANN001
    """One attempt at a webhook; the next, if any, is this task again after the backoff."""
    settings = get_settings()
    try:
        wait = webhooks.deliver(runtime.context().sessions, delivery_id, secret=settings.webhook_secret,
                                hosts=settings.callback_hosts)
    except Exception as exc:
        if not is_outage(exc) or self.request.retries >= MAX_OUTAGE_RETRIES:
            raise  # the delivery stays pending: the reconciler sends it again once it is overdue
        raise self.retry(exc=exc, countdown=min(MAX_BACKOFF_S, 2**self.request.retries)) from exc
    if wait is not None:
        self.apply_async((delivery_id,), countdown=wait)
