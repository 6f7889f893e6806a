"""Where a job's lifecycle keeps its state: the database, the feature store and the partial store.

The embedded runner and the farm differ only here: SQLite and in-memory partials on one machine,
Postgres and Redis-backed partials on the farm. Every step takes a `Context` and nothing else global.
"""

from __future__ import annotations

from dataclasses import dataclass

from evalfarm.db import session_factory
from evalfarm.scheduler.partials import MemoryPartials, PartialStore, RedisPartials
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


def embedded_context(settings: Settings) -> Context:
    """SQLite (or EVALFARM_DATABASE_URL) for the record, partials in this process's memory; the user's own
    machine, so any path the user names may be read."""
    return Context(session_factory(settings.db_url), FeatureStore(settings.store), MemoryPartials())


def farm_context(settings: Settings) -> Context:
    """The farm's database, and partials whose digests live in Redis (see `scheduler.partials`). Its workers
    read only inside EVALFARM_SAMPLE_ROOTS when that is set, whatever wrote the job's row."""
    import redis

    store = FeatureStore(settings.store)
    partials = RedisPartials(redis.Redis.from_url(settings.redis_url), store)
    roots = SampleRoots.parse(settings.sample_roots) if settings.sample_roots else None
    return Context(session_factory(settings.db_url), store, partials, roots)
