"""The reconciler's view of the records: which live steps are past their deadline, and which ended jobs
left something behind. Every job state has a deadline here, so that no job can hang."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, true, update

from evalfarm.db import FINAL_STATES, Job, JobState, Shard, ShardState
from evalfarm.db.models import as_utc, utcnow
from evalfarm.scheduler.records import Sessions


@dataclass(frozen=True)
class LostWork:
    """Steps whose message or worker was lost, to send again (after the commit that found them)."""

    shards: list[tuple[str, str, int]]  #: (job, side, index) to featurize
    queued: list[str]  #: jobs to plan
    reducing: list[str]  #: jobs to reduce


def find_lost_work(sessions: Sessions, *, lease_s: float, pending_s: float, broker_lost: bool) -> LostWork:
    """Every live step has a deadline, and this finds the ones past it:

    - a running shard or a planning job whose heartbeat is older than `lease_s` (its worker died); the shard
      goes back to pending, the job back to queued, so that planning starts over;
    - a reducing job whose reducer stopped heart-beating for `lease_s`, or whose reduce message was sent
      more than `pending_s` ago without a reducer starting;
    - a pending shard or a queued job whose message was sent more than `pending_s` ago (a task that died
      before it could record anything, a message dropped by a failing broker);
    - a running job whose shards are all done but which is not reducing: it is moved now. The last shard's
      finish makes that move in its own transaction, so this is a safety net (shards finished by a worker of
      an earlier version, which moved the job in a second transaction that an outage could lose);
    - with `broker_lost` (the broker restarted empty or was flushed), every unfinished step at once.

    What it returns is marked as sent now, so the next pass does not send it again before its deadline.
    Steps are idempotent: a duplicate costs time, never correctness.
    """
    now = utcnow()
    lease_cutoff, pending_cutoff = now - timedelta(seconds=lease_s), now - timedelta(seconds=pending_s)
    shards: list[tuple[str, str, int]] = []
    queued: list[str] = []
    reducing: list[str] = []
    with sessions.begin() as s:
        dead = (Shard.state == ShardState.RUNNING) & (Shard.heartbeat_at < lease_cutoff)
        unsent = (Shard.state == ShardState.PENDING) & (
            true() if broker_lost else (Shard.enqueued_at.is_(None) | (Shard.enqueued_at < pending_cutoff))
        )
        for shard_id, job_id, side, index in s.execute(
            select(Shard.id, Shard.job_id, Shard.side, Shard.index)
            .join(Job, Job.id == Shard.job_id)
            .where(Job.state == JobState.RUNNING, dead | unsent)
            .with_for_update(of=Shard, skip_locked=True)
        ).all():
            s.execute(
                update(Shard)
                .where(Shard.id == shard_id, Shard.state != ShardState.DONE)
                .values(state=ShardState.PENDING, error="worker or message lost; requeued", enqueued_at=now)
            )
            shards.append((job_id, side, index))
        unfinished = select(Shard.id).where(Shard.job_id == Job.id, Shard.state != ShardState.DONE).exists()
        for job_id in s.scalars(select(Job.id).where(Job.state == JobState.RUNNING, ~unfinished)):
            if s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING)
                .values(state=JobState.REDUCING, enqueued_at=now, heartbeat_at=None, attempts=0)
            ).rowcount:
                reducing.append(job_id)
        live = (JobState.QUEUED, JobState.PLANNING, JobState.REDUCING)
        for job_id, state, heartbeat_at, enqueued_at in s.execute(
            select(Job.id, Job.state, Job.heartbeat_at, Job.enqueued_at)
            .where(Job.state.in_(live))
            .with_for_update(skip_locked=True)
        ).all():
            seen = state
            if state == JobState.PLANNING:
                if not _before(heartbeat_at, lease_cutoff):
                    continue
                state = JobState.QUEUED  # the planner died: plan again from the start
            elif not broker_lost:
                started = heartbeat_at is not None and not _before(heartbeat_at, enqueued_at)
                if not (_before(heartbeat_at, lease_cutoff) if started else _before(enqueued_at, pending_cutoff)):
                    continue
            if s.execute(
                update(Job).where(Job.id == job_id, Job.state == seen).values(state=state, enqueued_at=now)
            ).rowcount:
                (queued if state == JobState.QUEUED else reducing).append(job_id)
    return LostWork(shards, queued, reducing)


def _before(t: datetime | None, cutoff: datetime | None) -> bool:
    """`t` is older than `cutoff` (a missing time is older than anything)."""
    if t is None:
        return True
    if cutoff is None:
        return False
    return as_utc(t) < as_utc(cutoff)


def ended_before(sessions: Sessions, job_ids: set[str], cutoff: datetime) -> set[str]:
    """Of `job_ids`, those that ended before `cutoff`. A job this database does not know is left alone: it
    may belong to another farm sharing the feature store (Redis' TTL still expires its keys)."""
    if not job_ids:
        return set()
    with sessions() as s:
        rows = s.execute(select(Job.id, Job.finished_at).where(Job.id.in_(job_ids), Job.state.in_(FINAL_STATES)))
        return {job_id for job_id, finished in rows if finished is None or _before(finished, cutoff)}
