"""The results database: jobs, their shards, metric results and named references.

Postgres in the farm, SQLite in embedded mode; the same models serve both. Postgres is the source of
truth: Redis only carries messages and transient partials.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Enum, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from evalfarm.states import DeliveryState, JobState, ShardState, _State


def _state_column(states: type[_State]) -> Enum:
    # VARCHAR(16) holding the value, exactly the column the initial migration created (no native enum type).
    return Enum(states, native_enum=False, create_constraint=False, length=16,
                values_callable=lambda members: [m.value for m in members])


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(t: datetime) -> datetime:
    """A stored time as an aware UTC time: SQLite drops the zone, and we always store UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    state: Mapped[JobState] = mapped_column(_state_column(JobState), index=True)
    mode: Mapped[str] = mapped_column(String(16))  # embedded | farm
    kind: Mapped[str] = mapped_column(String(16), default="eval")  # eval | reference (creates a named reference)
    samples_uri: Mapped[str] = mapped_column(Text)
    samples_hash: Mapped[str | None] = mapped_column(String(64))
    reference_uri: Mapped[str | None] = mapped_column(Text)
    reference_hash: Mapped[str | None] = mapped_column(String(64))
    n_samples: Mapped[int | None] = mapped_column(Integer)
    n_reference: Mapped[int | None] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    """The weights the job is pinned to: asked for by the submitter, or else those of the farm that plans it."""
    run: Mapped[str | None] = mapped_column(String(200), index=True)
    step: Mapped[int | None] = mapped_column(Integer)
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """How each side is obtained (featurized shards, cached/named reference, stats file), fixed at planning."""
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]
    """When the message of the job's current step (plan or reduce) was last sent: the reconciler's deadline."""
    heartbeat_at: Mapped[datetime | None]
    """The lease of a running planner or reducer, refreshed while it works."""
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """How often the current job-level step (planning, then reducing) was started: a poison job ends."""
    submitted_by: Mapped[str | None] = mapped_column(String(100), index=True)
    """The API token's name (or `local:USER` for a submit straight to the database): who may cancel it."""
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    """Digest of the submitted request, so that a reused idempotency key with another body is refused."""
    callback_url: Mapped[str | None] = mapped_column(Text)
    """Where the job's end is posted (a signed webhook), if anywhere."""

    __table_args__ = (UniqueConstraint("submitted_by", "idempotency_key", name="uq_job_idempotency"),)

    shards: Mapped[list[Shard]] = relationship(back_populates="job", order_by="Shard.side, Shard.index", lazy="selectin")
    results: Mapped[list[Result]] = relationship(back_populates="job", lazy="selectin")


class Shard(Base):
    __tablename__ = "shards"
    __table_args__ = (UniqueConstraint("job_id", "side", "index", name="uq_shard"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    side: Mapped[str] = mapped_column(String(16))  # samples | reference
    index: Mapped[int] = mapped_column(Integer)
    start: Mapped[int] = mapped_column(Integer)
    stop: Mapped[int] = mapped_column(Integer)
    state: Mapped[ShardState] = mapped_column(_state_column(ShardState), default=ShardState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]
    """When the shard's message was last sent; a pending shard past EVALFARM_PENDING_S is sent again."""

    job: Mapped[Job] = relationship(back_populates="shards")


class Result(Base):
    """One metric value per row, so history queries filter and sort in SQL."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_result"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)

    job: Mapped[Job] = relationship(back_populates="results")


class ReferenceBuild(Base):
    """Which job featurizes a reference's content right now: jobs planned meanwhile wait for its statistics
    instead of featurizing the same images again (single flight)."""

    __tablename__ = "reference_builds"

    store_key: Mapped[str] = mapped_column(String(300), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Reference(Base):
    """A named reference set whose statistics are in the feature store, reused without featurizing."""

    __tablename__ = "references"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    uri: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    resize: Mapped[str] = mapped_column(String(16))
    n: Mapped[int] = mapped_column(Integer)
    store_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    extractors: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """{extractor: {"weights_sha256", "store_key"}} of a reference made with several extractors; NULL: Inception's
    alone, in the columns above (which always hold the first extractor's)."""


class Token(Base):
    """An API token, stored only as the SHA-256 of its secret; revoked tokens stay for the record."""

    __tablename__ = "tokens"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(100))  # comma-separated: read, submit, admin
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Delivery(Base):
    """The webhook of one ended job: written in the transaction that ends the job (an outbox), then sent."""

    __tablename__ = "deliveries"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    """Sent as X-Evalfarm-Delivery, the same on every attempt, so that a receiver can drop duplicates."""
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    url: Mapped[str] = mapped_column(Text)
    state: Mapped[DeliveryState] = mapped_column(_state_column(DeliveryState), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_at: Mapped[datetime]
    """When the next attempt is due; while an attempt runs, when it is presumed lost (its lease)."""
    delivered_at: Mapped[datetime | None]


SHARDS_DONE, SHARDS_FAILED, IMAGES_FEATURIZED = "shards_done", "shards_failed", "images_featurized"
COUNTERS = (SHARDS_DONE, SHARDS_FAILED, IMAGES_FEATURIZED)


class Counter(Base):
    """A farm-wide total that only grows, written in the transaction of the event it counts (a shard done, a
    shard failed for good): Prometheus's counters. Shard rows cannot serve: a recompute sets a done shard
    back to pending, and a side planned again deletes its shards."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
