"""Persistence: SQLAlchemy models and sessions (Postgres in the farm, SQLite embedded)."""

from evalfarm.db.models import FINAL_STATES, Job, Reference, Result, Shard
from evalfarm.db.session import get_engine, session_factory

__all__ = ["FINAL_STATES", "Job", "Reference", "Result", "Shard", "get_engine", "session_factory"]
