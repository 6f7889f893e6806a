"""The Celery app. Every setting here answers a failure mode of long GPU tasks on a Redis broker.

- JSON only: partials never travel in messages (they go to Redis/the store), and nothing is unpickled.
- acks_late + reject_on_worker_lost + prefetch 1: a task whose worker dies is delivered again, and a
  worker holds no backlog another worker could have run.
- visibility_timeout > task_time_limit: Redis redelivers unacked tasks after the timeout counted from
  delivery (celery #5306), so a shard must always end, or be killed, well before it.
- No result backend: outcomes live in Postgres; Celery results would only duplicate them in Redis.
- Socket timeouts on every Redis connection: without one, a publish on a connection the broker's restart
  left dead can block for ever (celery #4296, #2741), and a worker of one process then never runs again.
"""

from __future__ import annotations

from celery import Celery

from evalfarm.scheduler.context import REDIS_CONNECT_TIMEOUT_S, REDIS_SOCKET_TIMEOUT_S
from evalfarm.settings import Settings, get_settings

GPU_QUEUE, CPU_QUEUE = "gpu", "cpu"
PLAN_TASK, SHARD_TASK, REDUCE_TASK = "evalfarm.plan_job", "evalfarm.featurize_shard", "evalfarm.reduce_job"
PRC_TILE_TASK = "evalfarm.prc_tile"  #: on the gpu queue with the shards: the workers that are many
DELIVER_TASK = "evalfarm.deliver_webhook"  #: on the cpu queue (the default): a slow receiver holds no GPU
SHARD_TIME_LIMIT_S = 2 * 3600  #: hard limit of one shard; size shards to take minutes
VISIBILITY_TIMEOUT_S = 3 * SHARD_TIME_LIMIT_S  #: must exceed the time limit (see module docstring)


def make_app(settings: Settings | None = None) -> Celery:
    """The farm's Celery app on the broker of `settings` (by default, the environment's)."""
    settings = settings or get_settings()
    app = Celery("evalfarm", broker=settings.redis_url, include=["evalfarm.workers.tasks", "evalfarm.workers.reconciler"])
    transport = {"visibility_timeout": VISIBILITY_TIMEOUT_S, "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
                 "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S, "socket_keepalive": True}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=SHARD_TIME_LIMIT_S,
        task_soft_time_limit=SHARD_TIME_LIMIT_S - 60,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        visibility_timeout=VISIBILITY_TIMEOUT_S,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        task_default_queue=CPU_QUEUE,
        task_routes={SHARD_TASK: {"queue": GPU_QUEUE}, PRC_TILE_TASK: {"queue": GPU_QUEUE}},
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
    )
    return app


app = make_app()
