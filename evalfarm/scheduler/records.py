"""Every read and write of a job's rows that the lifecycle makes: the one place that speaks SQL for it.

Each transition is a guarded UPDATE (`WHERE state = ...`), so concurrent workers, redelivered messages
and a second reducer agree on one outcome: shards are keyed by (job, side, index), completion is a state
(never a counter that can be bumped twice), and the move to `reducing` is won by exactly one shard.
"""

from __future__ import annotations

import enum
import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, lazyload, object_session, sessionmaker

from evalfarm.config import EvalConfig
from evalfarm.db import (
    FINAL_STATES,
    Counter,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Reference,
    ReferenceBuild,
    Result,
    Shard,
    ShardState,
)
from evalfarm.db.models import IMAGES_FEATURIZED, SHARDS_DONE, SHARDS_FAILED, as_utc, utcnow
from evalfarm.errors import Conflict, InvalidField, JobError, JobNotFound, WeightsError
from evalfarm.keys import INCEPTION, JOB_EVAL, weights_env_var
from evalfarm.scheduler.job import JobSnapshot
from evalfarm.scheduler.plan import REFERENCE, SAMPLES, JobPlan, SidePlan
from evalfarm.scheduler.references import NamedReference

Sessions = sessionmaker[Session]


@dataclass(frozen=True)
class Submission:
    """What a submitter asks for: everything that makes two requests the same request."""

    samples: str
    ref: str | None
    config: EvalConfig
    kind: str = JOB_EVAL
    run: str | None = None
    step: int | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None
    reference_name: str | None = None
    callback_url: str | None = None

    def digest(self) -> str:
        """What an idempotency key stands for, with the defaults filled in: `{}` and the same fields spelled
        out are one request, whether they came through the API or the CLI."""
        body = {**asdict(self), "config": self.config.to_dict()}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Submitted:
    job_id: str
    created: bool
    """False when an earlier submit with the same idempotency key made the job."""


def create_job(
    sessions: Sessions,
    request: Submission,
    *,
    mode: str,
    submitted_by: str | None = None,
    idempotency_key: str | None = None,
) -> Submitted:
    """Record a queued job; a request that cannot give the metrics it asks for is refused, with no row.

    With an `idempotency_key`, the submitter's earlier job under that key is returned instead of a new one
    (`created` False), if it was the same request; Conflict if it was another.
    """
    config = request.config
    if request.kind == JOB_EVAL and config.needs_reference and not request.ref:
        raise InvalidField("ref", "FID, KID and PRC need a reference: give one (--ref), or ask for IS only")
    if request.kind == JOB_EVAL and not config.metrics:
        raise InvalidField("metrics", "no metrics requested")
    if request.weights_sha256 and INCEPTION not in config.featurizers:
        raise InvalidField("weights_sha256", f"pins {INCEPTION} weights, and this job does not use {INCEPTION} "
                                             f"(it uses {', '.join(config.featurizers)})")
    digest = request.digest() if idempotency_key is not None else None
    for _ in range(3):  # two submits racing with one key: the unique constraint picks one, the other reads it
        if idempotency_key is not None:
            earlier = earlier_job(sessions, request, submitted_by, idempotency_key)
            if earlier is not None:
                return earlier
        job_id = str(uuid.uuid4())
        try:
            with sessions.begin() as s:
                s.add(
                    Job(
                        id=job_id, state=JobState.QUEUED, mode=mode, kind=request.kind, samples_uri=request.samples,
                        reference_uri=request.ref, config=config.to_dict(), weights_sha256=request.weights_sha256,
                        run=request.run, step=request.step, tags=request.tags,
                        plan=JobPlan(reference_name=request.reference_name).to_dict(), enqueued_at=utcnow(),
                        submitted_by=submitted_by, callback_url=request.callback_url,
                        idempotency_key=idempotency_key, request_sha256=digest,
                    )
                )
            return Submitted(job_id, created=True)
        except IntegrityError:
            if idempotency_key is None:
                raise
    raise Conflict(f"idempotency key {idempotency_key!r} is being used by concurrent submits; retry")


def earlier_job(sessions: Sessions, request: Submission, submitted_by: str | None, key: str) -> Submitted | None:
    """The job an earlier submit of `request` under `key` made; None if there was none; Conflict if the key
    was used for another request."""
    with sessions() as s:
        row = s.execute(
            select(Job.id, Job.request_sha256).where(Job.submitted_by == submitted_by, Job.idempotency_key == key)
        ).first()
    if row is None:
        return None
    if row.request_sha256 != request.digest():
        raise Conflict(
            f"idempotency key {key!r} was used for another request (job {row.id}); use a new key for a new job"
        )
    return Submitted(row.id, created=False)


def mark_unsent(sessions: Sessions, job_id: str) -> None:
    """The plan message of a queued job could not be sent (the broker was down): with no send time, it is
    past its deadline at once, and the reconciler's next pass sends it (see `deadlines.find_lost_work`)."""
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED).values(enqueued_at=None))


def get_job(sessions: Sessions, job_id: str) -> JobSnapshot:
    with sessions() as s:  # the row alone: a snapshot holds neither shards nor results
        job = s.get(Job, job_id, options=[lazyload(Job.shards), lazyload(Job.results)])
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        return JobSnapshot.of(job)


def job_state(sessions: Sessions, job_id: str) -> JobState | None:
    with sessions() as s:
        return s.scalar(select(Job.state).where(Job.id == job_id))


def shards_of(sessions: Sessions, job_id: str) -> list[Shard]:
    """The job's shard rows (detached), by side and index."""
    with sessions() as s:
        return list(s.scalars(select(Shard).where(Shard.job_id == job_id).order_by(Shard.side, Shard.index)))


# -- planning ----------------------------------------------------------------------------------------------------


class StepLost(Exception):
    """The job left the state this step holds it in (cancelled, or reset by the reconciler): stop quietly."""


def start_planning(sessions: Sessions, job_id: str) -> int | None:
    """queued → planning; returns how often planning has started, or None when the job was planned already
    (a redelivered message) or cancelled. A planner that died leaves `planning`; the reconciler puts such a
    job back to `queued` to resume it, and the count tells a poison job from a few bad nights."""
    with sessions.begin() as s:
        now = utcnow()
        started = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(state=JobState.PLANNING, started_at=now, heartbeat_at=now, attempts=Job.attempts + 1)
        ).rowcount == 1
        return s.scalar(select(Job.attempts).where(Job.id == job_id)) if started else None


def release_planning(sessions: Sessions, job_id: str) -> None:
    """planning → queued after a planner failed in a way worth retrying, so that the retry can start it."""
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.PLANNING).values(state=JobState.QUEUED))


def start_reducing(sessions: Sessions, job_id: str) -> int | None:
    """A reducer starts: its lease begins, and it is counted; None when the job is not reducing."""
    with sessions.begin() as s:
        started = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.REDUCING)
            .values(heartbeat_at=utcnow(), attempts=Job.attempts + 1)
        ).rowcount == 1
        return s.scalar(select(Job.attempts).where(Job.id == job_id)) if started else None


def await_reference(sessions: Sessions, job_id: str) -> None:
    """A reducer found its reference still being built by another job, and sends itself again shortly: that
    is not an attempt that failed, and the reconciler should watch the message, not a lease."""
    with sessions.begin() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.REDUCING)
            .values(attempts=Job.attempts - 1, heartbeat_at=None, enqueued_at=utcnow())
        )


def beat_job(sessions: Sessions, job_id: str) -> JobState | None:
    """Refresh the lease of a running planner or reducer; returns the job's state."""
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow()))
        return s.scalar(select(Job.state).where(Job.id == job_id))


def named_reference(sessions: Sessions, name: str) -> NamedReference | None:
    with sessions() as s:
        r = s.get(Reference, name)
        if r is None:
            return None
        extractors = {e: (str(v["weights_sha256"]), str(v["store_key"])) for e, v in (r.extractors or {}).items()}
        return NamedReference(r.name, r.uri, r.content_hash, r.weights_sha256, r.resize, r.n, r.store_key, extractors)


def record_plan(sessions: Sessions, job_id: str, plan: JobPlan, weights_sha256: str) -> list[tuple[str, int]]:
    """Write the shard rows and the plan, pin the weights, and move on: to `running`, or straight to
    `reducing` when nothing needs featurizing. Returns the shards to run, in order."""
    todo: list[tuple[str, int]] = []
    with sessions.begin() as s:
        now = utcnow()  # the caller sends the shards' messages (or the reduce's) right after this commits
        for side, side_plan in plan.sides.items():
            for i, (start, stop) in enumerate(side_plan.shards):
                s.add(Shard(job_id=job_id, side=side, index=i, start=start, stop=stop, state=ShardState.PENDING,
                            attempts=0, enqueued_at=now))
                todo.append((side, i))
        job = s.get(Job, job_id, with_for_update=True)
        if job.state != JobState.PLANNING:
            raise StepLost(f"job {job_id} changed state to {job.state} while planning")  # rolls the shards back
        job.plan = plan.to_dict()
        job.weights_sha256 = weights_sha256
        samples, reference = plan.side(SAMPLES), plan.side(REFERENCE)
        job.samples_hash, job.n_samples = samples.content_hash, samples.n
        if reference is not None:
            job.reference_hash, job.n_reference = reference.content_hash, reference.n
        job.state = JobState.RUNNING if todo else JobState.REDUCING
        job.enqueued_at, job.heartbeat_at, job.attempts = now, None, 0
    return todo


def claim_reference_build(sessions: Sessions, store_key: str, job_id: str) -> str:
    """The job that featurizes the reference cached at `store_key`: `job_id` itself, unless another live job
    is doing it already (single flight). A builder that ended without leaving the cache is taken over."""
    for _ in range(3):  # two planners inserting at once: one wins the key, the other reads it
        try:
            with sessions.begin() as s:
                build = s.get(ReferenceBuild, store_key, with_for_update=True)
                if build is None:
                    s.add(ReferenceBuild(store_key=store_key, job_id=job_id, created_at=utcnow()))
                    return job_id
                state = s.scalar(select(Job.state).where(Job.id == build.job_id))
                if build.job_id != job_id and state is not None and state not in FINAL_STATES:
                    return build.job_id
                build.job_id, build.created_at = job_id, utcnow()
                return job_id
        except IntegrityError:
            continue
    return job_id  # cannot tell who builds it: featurize it here, never wait on a guess


# -- shards --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardClaim:
    """A shard this worker now runs: its row, its range, and the job it belongs to."""

    shard_id: int
    start: int
    stop: int
    attempt: int
    job: JobSnapshot


def claim_shard(
    sessions: Sessions,
    job_id: str,
    side: str,
    index: int,
    *,
    worker: str,
    weights: dict[str, str],
    lease_s: float | None,
    max_attempts: int,
) -> ShardClaim | None:
    """pending/running → running under this worker, or None when there is nothing to do: the job is no longer
    running, the shard is done (a duplicate delivery), or another worker holds a live lease on it."""
    with sessions.begin() as s:  # the job's row alone, not its (thousands of) shards and results
        job = s.get(Job, job_id, options=[lazyload(Job.shards), lazyload(Job.results)])
        shard = s.scalar(select(Shard).where(Shard.job_id == job_id, Shard.side == side, Shard.index == index))
        if job is None or shard is None or job.state != JobState.RUNNING or shard.state == ShardState.DONE:
            return None
        # This worker's own claim, left running by an attempt that ended in an outage, is taken up again
        # without counting as a new start; another worker's live claim is left to it.
        resumed = shard.state == ShardState.RUNNING and shard.worker == worker
        if lease_s is not None and shard.state == ShardState.RUNNING and not resumed \
                and _age_s(shard.heartbeat_at) < lease_s:
            return None
        if shard.attempts >= max_attempts and not resumed:
            raise JobError(f"started {max_attempts} times without finishing (its worker died each time: out of memory?)")
        snapshot = JobSnapshot.of(job)
        pinned = snapshot.extractor_weights
        for name in snapshot.config.featurizers:
            if pinned.get(name) != weights.get(name):
                raise WeightsError(
                    f"this worker's {name} weights (sha256 {(weights.get(name) or '')[:12]}…) differ from the job's "
                    f"({(pinned.get(name) or '')[:12]}…); refusing to compute numbers with other weights. Point "
                    f"{weights_env_var(name)} on every worker at the same file."
                )
        shard.state, shard.attempts, shard.worker = ShardState.RUNNING, shard.attempts + (not resumed), worker
        shard.started_at = shard.heartbeat_at = utcnow()
        shard.error = None
        return ShardClaim(shard.id, shard.start, shard.stop, shard.attempts, snapshot)


def beat(sessions: Sessions, claim: ShardClaim) -> JobState | None:
    """Refresh the claim's lease; returns its job's state, so the shard can notice a cancel, or None when
    the claim was lost (its lease expired and the shard went to another attempt): then it stops too."""
    with sessions.begin() as s:
        held = s.execute(
            update(Shard)
            .where(Shard.id == claim.shard_id, Shard.state == ShardState.RUNNING, Shard.attempts == claim.attempt)
            .values(heartbeat_at=utcnow())
        ).rowcount == 1
        return s.scalar(select(Job.state).where(Job.id == claim.job.id)) if held else None


class Finish(enum.Enum):
    """What `finish_shard` did with a claim."""

    LOST = "lost"  #: nothing: the job ended, or the lease expired and another attempt holds the shard
    DONE = "done"  #: the shard is done, and others are left
    LAST = "last"  #: the shard is done, it was the job's last, and the job is now reducing (this caller reduces)


def finish_shard(sessions: Sessions, claim: ShardClaim, seconds: float) -> Finish:
    """running → done for the claim that still holds the shard in a running job, and running → reducing for
    the job when no shard is left, in one transaction: a final row never changes.

    The job's row is locked first, so the finishes of one job's shards take turns: the last one's count sees
    every other as done, and exactly one finish makes the move (a count in the finishing transaction without
    the lock would let two concurrent last shards each see the other as running, and neither move the job)."""
    running = select(Job.id).where(Job.id == claim.job.id, Job.state == JobState.RUNNING)
    with sessions.begin() as s:
        if s.scalar(select(Job.state).where(Job.id == claim.job.id).with_for_update()) != JobState.RUNNING:
            return Finish.LOST
        # The state again in the UPDATE itself: SQLite has no row lock, and its SELECT above runs outside the
        # write transaction, so a job failed meanwhile would otherwise get a shard done.
        done = s.execute(
            update(Shard)
            .where(Shard.id == claim.shard_id, Shard.state == ShardState.RUNNING, Shard.attempts == claim.attempt,
                   Shard.job_id.in_(running))
            .values(state=ShardState.DONE, finished_at=utcnow(), seconds=seconds, error=None)
        ).rowcount == 1
        if not done:
            return Finish.LOST
        last = _start_reduce(s, claim.job.id)
        _count(s, {SHARDS_DONE: 1, IMAGES_FEATURIZED: claim.stop - claim.start})  # farm-wide rows: locked last
        return Finish.LAST if last else Finish.DONE


def _count(s: Session, increments: dict[str, int]) -> None:
    """Add to farm-wide counters in the caller's transaction (the migration made their rows)."""
    for name, n in increments.items():
        if n and s.execute(update(Counter).where(Counter.name == name).values(value=Counter.value + n)).rowcount == 0:
            s.add(Counter(name=name, value=n))


def try_start_reduce(sessions: Sessions, job_id: str) -> bool:
    """running → reducing once no shard is left; True for exactly one caller."""
    with sessions.begin() as s:
        return _start_reduce(s, job_id)


def _start_reduce(s: Session, job_id: str) -> bool:
    left = s.scalar(
        select(func.count()).select_from(Shard).where(Shard.job_id == job_id, Shard.state != ShardState.DONE)
    )
    if left:
        return False
    return s.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING)
        .values(state=JobState.REDUCING, enqueued_at=utcnow(), heartbeat_at=None, attempts=0)
    ).rowcount == 1


def record_shard_failure(sessions: Sessions, job_id: str, side: str, index: int, error: str, *, final: bool) -> None:
    """A failed attempt goes back to pending for a retry; a final one marks the shard failed and fails the job
    with its reason, in one transaction (a failed shard in a running job would wait for ever). Shards of a
    job that has ended, and finished shards, keep their state."""
    live = select(Job.id).where(Job.id == job_id, Job.state.not_in(FINAL_STATES))
    with sessions.begin() as s:
        s.execute(select(Job.id).where(Job.id == job_id).with_for_update())  # finish_shard's lock order: job, shard
        changed = s.execute(
            update(Shard)
            .where(Shard.job_id.in_(live), Shard.side == side, Shard.index == index,
                   Shard.state.in_((ShardState.PENDING, ShardState.RUNNING)))
            .values(state=ShardState.FAILED if final else ShardState.PENDING, error=error, finished_at=utcnow())
        ).rowcount
        if final:
            _count(s, {SHARDS_FAILED: changed})
            _fail(s, job_id, f"shard {side}/{index} failed: {error}")


def requeue_lost(sessions: Sessions, job_id: str, lost: list[tuple[str, int]], max_recomputes: int, *,
                 why: str | None = None) -> list[tuple[str, int]]:
    """reducing → running with the shards whose partials were lost (or unusable: `why`) back to pending; after
    `max_recomputes` such rounds the job fails instead. Returns the shards to run again (none when it failed)."""
    with sessions.begin() as s:
        job = s.get(Job, job_id, with_for_update=True)
        plan = _another_round(job, why or f"partial statistics of shards {lost} were lost", max_recomputes)
        if plan is None:
            return []
        job.plan = plan.to_dict()
        for side, index in lost:
            s.execute(
                update(Shard)
                .where(Shard.job_id == job_id, Shard.side == side, Shard.index == index)
                .values(state=ShardState.PENDING, error="partial statistics lost; recomputing", enqueued_at=utcnow())
            )
    return lost


def replan_side(
    sessions: Sessions, job_id: str, side: str, side_plan: SidePlan, note: str, max_recomputes: int
) -> list[tuple[str, int]]:
    """reducing → running with `side` to be featurized after all (its stored statistics were unusable):
    its shard rows are written and returned. After `max_recomputes` rounds the job fails instead."""
    with sessions.begin() as s:
        job = s.get(Job, job_id, with_for_update=True)
        plan = _another_round(job, f"the stored statistics of the {side} side were unusable", max_recomputes)
        if plan is None:
            return []
        now, todo = utcnow(), []
        s.execute(delete(Shard).where(Shard.job_id == job_id, Shard.side == side))
        for i, (start, stop) in enumerate(side_plan.shards):
            s.add(Shard(job_id=job_id, side=side, index=i, start=start, stop=stop, state=ShardState.PENDING,
                        attempts=0, enqueued_at=now))
            todo.append((side, i))
        job.plan = plan.with_(sides={**plan.sides, side: side_plan}, notes=(*plan.notes, note)).to_dict()
    return todo


def _another_round(job: Job, problem: str, max_recomputes: int) -> JobPlan | None:
    """Send a reducing job (locked by the caller) back to `running` for one more round of featurizing, and
    return its plan with the round counted; None when it is not reducing (cancelled or failed while the
    reducer merged: it stays so) or when it has had `max_recomputes` rounds (then it fails)."""
    if job.state != JobState.REDUCING:
        return None
    plan = JobPlan.from_dict(job.plan)
    if plan.recomputes + 1 > max_recomputes:
        job.state, job.finished_at = JobState.FAILED, utcnow()
        job.error = f"{problem} {max_recomputes} times; giving up"
        _ended(object_session(job), job.id)
        return None
    job.state = JobState.RUNNING
    return plan.with_(recomputes=plan.recomputes + 1)


# -- ends ----------------------------------------------------------------------------------------------------------


def finish_job(sessions: Sessions, job_id: str, values: dict[str, float], result: dict[str, Any]) -> tuple[bool, Any]:
    """reducing → succeeded with one Result row per metric. Returns (True, result) for the reducer that
    recorded it, (False, the stored result or None) when another got there first or the job ended."""
    with sessions.begin() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job.state != JobState.REDUCING:
            return False, job.result
        for name, value in values.items():
            s.add(Result(job_id=job_id, name=name, value=value))
        job.result, job.state, job.finished_at = result, JobState.SUCCEEDED, utcnow()
        _ended(s, job_id)
    return True, result


def fail_job(sessions: Sessions, job_id: str, error: str) -> bool:
    with sessions.begin() as s:
        return _fail(s, job_id, error)


def _fail(s: Session, job_id: str, error: str) -> bool:
    failed = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.not_in(FINAL_STATES))
        .values(state=JobState.FAILED, error=error, finished_at=utcnow())
    ).rowcount == 1
    if failed:
        _ended(s, job_id)
    return failed


def _ended(s: Session, job_id: str) -> None:
    """In the transaction that ends a job: its webhook, if it has one, is written to the outbox with the end
    itself, so that no crash between the two can lose it (`scheduler.webhooks` sends it)."""
    url = s.scalar(select(Job.callback_url).where(Job.id == job_id))
    if url:
        s.add(Delivery(id=str(uuid.uuid4()), job_id=job_id, url=url, state=DeliveryState.PENDING, attempts=0,
                       next_at=utcnow()))


def cancel_job(sessions: Sessions, job_id: str) -> bool:
    with sessions.begin() as s:
        changed = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.not_in(FINAL_STATES))
            .values(state=JobState.CANCELLED, finished_at=utcnow(), error="cancelled by user")
        ).rowcount
        if changed:
            _ended(s, job_id)
        s.execute(
            update(Shard)
            .where(Shard.job_id == job_id, Shard.state.in_((ShardState.PENDING, ShardState.RUNNING)))
            .values(state=ShardState.FAILED, error="job cancelled")
        )
    return bool(changed)


def register_reference(sessions: Sessions, ref: NamedReference) -> None:
    with sessions.begin() as s:
        s.merge(
            Reference(name=ref.name, uri=ref.uri, content_hash=ref.content_hash, weights_sha256=ref.weights_sha256,
                      resize=ref.resize, n=ref.n, store_key=ref.store_key, created_at=utcnow(),
                      extractors={e: {"weights_sha256": w, "store_key": k} for e, (w, k) in ref.extractors.items()}
                      or None)
        )


def _age_s(t: datetime | None) -> float:
    return float("inf") if t is None else (utcnow() - as_utc(t)).total_seconds()
