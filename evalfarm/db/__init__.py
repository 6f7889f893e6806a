"""Persistence: SQLAlchemy models, typed states and sessions (Postgres in the farm, SQLite embedded)."""

from evalfarm.db.models import Counter, Delivery, Job, Reference, ReferenceBuild, Result, Shard, Token
from evalfarm.db.session import get_engine, session_factory
from evalfarm.states import FINAL_STATES, DeliveryState, JobState, ShardState

__all__ = [
    "FINAL_STATES",
    "Counter",
    "Delivery",
    "DeliveryState",
    "Job",
    "JobState",
    "Reference",
    "ReferenceBuild",
    "Result",
    "Shard",
    "ShardState",
    "Token",
    "get_engine",
    "session_factory",
]
