"""`/metrics`: the farm's state in Prometheus's text format, read from the database and the broker at each scrape.

Nothing is counted in this process: the API may run as several processes, and a scrape may reach any of
them, so every value comes from Postgres (jobs, leases, the `counters` table) and Redis (the queues) when it
is asked for. The counters are written in the transaction of the event they count (a shard finished, a
shard failed for good) and only grow, so `rate()` over them is the farm's throughput, e.g.
`rate(evalfarm_images_featurized_total[5m])` images per second.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from evalfarm.api.auth import require
from evalfarm.db.models import as_utc, utcnow
from evalfarm.scheduler.queries import farm_totals
from evalfarm.scheduler.records import Sessions
from evalfarm.scheduler.tokens import READ, Principal
from evalfarm.workers.app import CPU_QUEUE, GPU_QUEUE

QUEUES = (GPU_QUEUE, CPU_QUEUE)


def queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu's Redis transport keeps a queue in: the queue's name for priority 0, and
    `name + sep + step` for each other priority step (`kombu.transport.redis.Channel._q_for_pri`)."""
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS]


def queue_depth(redis: Any, queue: str) -> int:
    """Messages waiting in `queue` on the broker, every priority counted (those a worker took are not)."""
    with redis.pipeline(transaction=False) as p:
        for key in queue_keys(queue):
            p.llen(key)
        return sum(int(n) for n in p.execute())


class FarmCollector:
    """The farm's metrics, collected when scraped (a prometheus_client custom collector)."""

    def __init__(self, sessions: Sessions, redis: Any, queues: tuple[str, ...] = QUEUES) -> None:
        self.sessions, self.redis, self.queues = sessions, redis, queues

    def collect(self) -> Iterator[Metric]:
        totals = farm_totals(self.sessions)
        jobs = GaugeMetricFamily("evalfarm_jobs", "Jobs in each state (every state is listed, 0 when empty).",
                                 labels=["state"])
        for state, n in totals.jobs_by_state.items():
            jobs.add_metric([state.value], n)
        yield jobs
        yield CounterMetricFamily("evalfarm_shards_done", "Shards featurized to the end (rows in state done).",
                                  value=totals.shards_done)
        yield CounterMetricFamily("evalfarm_shards_failed", "Shards that failed for good and failed their job "
                                  "(attempts that were retried, and shards of cancelled jobs, do not count).",
                                  value=totals.shards_failed)
        yield CounterMetricFamily("evalfarm_images_featurized", "Images in done shards: what the workers featurized. "
                                  "rate() of it is the farm's images per second.", value=totals.images_featurized)
        depth = GaugeMetricFamily("evalfarm_queue_depth", "Messages waiting on the broker in each Celery queue "
                                  "(every priority list), not yet taken by a worker.", labels=["queue"])
        for queue in self.queues:
            depth.add_metric([queue], queue_depth(self.redis, queue))
        yield depth
        age = 0.0 if totals.oldest_heartbeat is None else (utcnow() - as_utc(totals.oldest_heartbeat)).total_seconds()
        yield GaugeMetricFamily("evalfarm_oldest_lease_age_seconds", "Seconds since the oldest last heartbeat among "
                                "running shards and planning or reducing jobs (0 when none); the reconciler "
                                "requeues past EVALFARM_LEASE_S.", value=max(0.0, age))


def metrics(request: Request, _: Principal = Depends(require(READ))) -> Response:
    """The farm's metrics in Prometheus's text format; a `read` token, like every route with data."""
    farm = request.app.state.farm
    registry = CollectorRegistry(auto_describe=False)  # collected once, by generate_latest, not on register
    registry.register(FarmCollector(farm.ctx.sessions, farm.ctx.partials.redis))
    return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
