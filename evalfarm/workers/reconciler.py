"""The reconciler: sends again every step whose message or worker was lost, from each worker's main process.

One worker at a time runs a pass (a Redis lock that expires with the pass). Every live step has a deadline
(`scheduler.deadlines.find_lost_work`): a shard, planner or reducer that stopped heart-beating (killed,
machine lost), which Celery alone would redeliver only after the visibility timeout; and a message sent
long ago that no worker started. A restarted or flushed broker is seen by the epoch key vanishing: its
queued messages are gone, so every unfinished step of every live job is sent again. The same pass sends
webhooks whose attempt is overdue, and runs the janitor, which removes what ended jobs left in Redis and
the feature store. Every worker, lock or not, announces the weights it holds (`workers.registry`).
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from celery import signals

from evalfarm.errors import EvalfarmError
from evalfarm.scheduler import deadlines, ends, webhooks
from evalfarm.scheduler.context import Context, redis_client
from evalfarm.settings import Settings, get_settings
from evalfarm.workers import registry, runtime
from evalfarm.workers.tasks import deliver_webhook, featurize_shard, plan_job_task, reduce_job_task

log = logging.getLogger(__name__)

EPOCH_KEY = "evalfarm:epoch"  #: vanishes when Redis restarts without persistence or is flushed
LOCK_KEY = "evalfarm:reconciler"


def reconcile(ctx: Context, client: redis.Redis, settings: Settings) -> deadlines.LostWork:
    """One pass: find lost work (committing what it changed), then send it again."""
    broker_lost = bool(client.set(EPOCH_KEY, runtime.worker_name(), nx=True))
    lost = deadlines.find_lost_work(
        ctx.sessions, lease_s=settings.lease_s, pending_s=settings.pending_s, broker_lost=broker_lost
    )
    for job_id, side, index in lost.shards:
        featurize_shard.delay(job_id, side, index)
    for job_id in lost.queued:
        plan_job_task.delay(job_id)
    for job_id in lost.reducing:
        reduce_job_task.delay(job_id)
    for delivery_id in webhooks.overdue(ctx.sessions, grace_s=settings.lease_s):
        deliver_webhook.delay(delivery_id)
    ends.sweep(ctx, retention_s=settings.retention_s, index_retention_s=settings.index_retention_s)
    return lost


def _announce(client: redis.Redis, settings: Settings) -> None:
    try:
        sha = runtime.weights().sha256
    except EvalfarmError as exc:
        log.warning("this worker has no usable weights: %s", exc)
        return
    registry.announce(client, sha, runtime.worker_name(), ttl_s=int(max(60.0, 4 * settings.reconcile_s)))


def _loop() -> None:
    settings = get_settings()
    client = redis_client(settings.redis_url)
    while True:
        try:
            _announce(client, settings)
        except Exception:
            log.warning("announcing this worker's weights failed", exc_info=True)
        time.sleep(settings.reconcile_s)
        try:
            if client.set(LOCK_KEY, runtime.worker_name(), nx=True, px=int(settings.reconcile_s * 1000)):
                lost = reconcile(runtime.context(), client, settings)
                for job_id, side, index in lost.shards:
                    log.warning("sent shard %s/%s of job %s again", side, index, job_id)
                for job_id in (*lost.queued, *lost.reducing):
                    log.warning("sent the next step of job %s again", job_id)
        except Exception:
            log.warning("reconciler pass failed", exc_info=True)


@signals.worker_ready.connect
def _start(**_: object) -> None:
    threading.Thread(target=_loop, name="evalfarm-reconciler", daemon=True).start()
