"""The states of jobs, shards and webhook deliveries: the vocabulary of the lifecycle, light enough for the
HTTP client to import (no SQLAlchemy). The database stores each as its lower-case value."""

from __future__ import annotations

import enum


class _State(str, enum.Enum):
    """A state stored as its lower-case value; prints and formats as that value, compares equal to it."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class JobState(_State):
    """queued → planning → running → reducing → succeeded | failed | cancelled."""

    QUEUED = "queued"
    PLANNING = "planning"
    RUNNING = "running"
    REDUCING = "reducing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


class ShardState(_State):
    """pending → running → done | failed; a failed attempt or a lost worker goes back to pending."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(_State):
    """pending → delivered | failed: a webhook is tried a bounded number of times, then given up."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
