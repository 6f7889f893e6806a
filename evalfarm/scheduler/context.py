"""Where a job's lifecycle keeps its state: the database, the feature store and the partial store.

The embedded runner and the farm differ only here: SQLite and partials recorded in this process on one
machine, Postgres and Redis-backed partials on the farm. Every step takes a `Context` and nothing else global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evalfarm.db import session_factory
from evalfarm.scheduler.partials import LocalPartials, PartialStore, RedisPartials
from evalfarm.scheduler.records import Sessions
from evalfarm.scheduler.store import FeatureStore
from evalfarm.settings import Settings
from evalfarm.sources import SampleRoots


@dataclass(frozen=True)
class Context:
    sessions: Sessions
    store: FeatureStore
    partials: PartialStore
    roots: SampleRoots | None = SampleRoots.unrestricted()
    """What the steps may read: everything on the user's own machine; EVALFARM_SAMPLE_ROOTS on the farm, or
    None where a farm has none (see `steps.read_policy`)."""


def embedded_context(settings: Settings, spill: str | None = None) -> Context:
    """SQLite (or EVALFARM_DATABASE_URL) for the record; the shards' partial files in the private directory
    `spill` (in memory without one), their records in this process; the user's own machine, so any path the
    user names may be read."""
    partials = LocalPartials(FeatureStore(spill) if spill is not None else None)
    return Context(session_factory(settings.db_url), FeatureStore(settings.store), partials)


REDIS_SOCKET_TIMEOUT_S = 30  #: a Redis reply slower than this is an outage (retried), never a hang
REDIS_CONNECT_TIMEOUT_S = 10


def redis_client(url: str) -> Any:
    """A Redis client that fails instead of waiting for ever on a connection a restart left dead."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=REDIS_SOCKET_TIMEOUT_S,
                                socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S, socket_keepalive=True,
                                health_check_interval=REDIS_SOCKET_TIMEOUT_S)


def farm_context(settings: Settings) -> Context:
    """The farm's database, and partials whose digests live in Redis (see `scheduler.partials`). Its workers
    read only inside EVALFARM_SAMPLE_ROOTS when that is set, whatever wrote the job's row."""
    store = FeatureStore(settings.store)
    partials = RedisPartials(redis_client(settings.redis_url), store)
    roots = SampleRoots.parse(settings.sample_roots) if settings.sample_roots else None
    return Context(session_factory(settings.db_url), store, partials, roots)
