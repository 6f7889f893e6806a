"""Persistence: SQLAlchemy models, typed states and sessions (Postgres in the farm, SQLite embedded)."""

from evalfarm.db.models import FINAL_STATES, Job, JobState, Reference, ReferenceBuild, Result, Shard, ShardState
from evalfarm.db.session import get_engine, session_factory

__all__ = [
    "FINAL_STATES",
    "Job",
    "JobState",
    "Reference",
    "ReferenceBuild",
    "Result",
    "Shard",
    "ShardState",
    "get_engine",
    "session_factory",
]
