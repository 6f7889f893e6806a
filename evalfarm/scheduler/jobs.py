"""The job state machine, shared by the embedded runner and the farm's Celery tasks.

queued → planning → running → reducing → succeeded | failed | cancelled. Every step is safe to repeat:
shards are keyed by (job, side, index), completion is a state (never a counter that can be bumped twice),
and the move to `reducing` is a guarded UPDATE that exactly one finishing shard wins.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from evalfarm import __version__, keys
from evalfarm.config import EvalConfig
from evalfarm.db.models import FINAL_STATES, Job, Reference, Result, Shard, utcnow
from evalfarm.errors import JobError, SourceError, WeightsError
from evalfarm.metrics import split_assignment
from evalfarm.models import FeatureExtractor
from evalfarm.models.weights import CANONICAL_SHA256_PREFIX
from evalfarm.pipeline import SideMerge, SideStats, compute_metrics, featurize_range, kid_subset_size
from evalfarm.references import StoredReference, load_cached, load_stats_file
from evalfarm.scheduler.partials import PartialStore
from evalfarm.scheduler.plan import REFERENCE, SAMPLES, check_sizes, plan_reference, plan_samples
from evalfarm.sources import Source, open_source
from evalfarm.store import FeatureStore, reference_key

MAX_RECOMPUTES = 3  #: lost partials are recomputed at most this often before the job fails
CANCEL_POLL_S = 2.0  #: how often a running shard looks for cancellation (and heart-beats)


@dataclass
class Context:
    sessions: sessionmaker[Session]
    store: FeatureStore
    partials: PartialStore


def create_job(
    ctx: Context,
    *,
    samples: str,
    ref: str | None,
    config: EvalConfig,
    weights_sha256: str,
    mode: str,
    kind: str = "eval",
    run: str | None = None,
    step: int | None = None,
    tags: dict[str, Any] | None = None,
    reference_name: str | None = None,
) -> str:
    if kind == "eval" and config.needs_reference and not ref:
        raise JobError("FID and KID need a reference: pass --ref, or request --metrics is only.")
    if kind == "eval" and not config.metrics:
        raise JobError("no metrics requested.")
    job_id = str(uuid.uuid4())
    with ctx.sessions.begin() as s:
        s.add(
            Job(
                id=job_id,
                state="queued",
                mode=mode,
                kind=kind,
                samples_uri=samples,
                reference_uri=ref,
                config=config.to_dict(),
                weights_sha256=weights_sha256,
                run=run,
                step=step,
                tags=tags or {},
                plan={"reference_name": reference_name} if reference_name else {},
            )
        )
    return job_id


def load_job(ctx: Context, job_id: str) -> Job:
    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise JobError(f"no job {job_id}")
        return job


def plan_job(ctx: Context, job_id: str) -> list[tuple[str, int]]:
    """Plan the sides, write shard rows, move to `running`; returns the shards to run, in order."""
    with ctx.sessions.begin() as s:
        if s.execute(
            update(Job).where(Job.id == job_id, Job.state == "queued").values(state="planning", started_at=utcnow())
        ).rowcount == 0:
            return []  # planned already (a redelivered plan task) or cancelled
    job = load_job(ctx, job_id)
    config = EvalConfig.from_dict(job.config)
    samples = plan_samples(job.samples_uri, config)
    reference = None
    if job.kind == "eval" and job.reference_uri and config.needs_reference:
        with ctx.sessions() as s:
            named = s.get(Reference, job.reference_uri)
        reference = plan_reference(job.reference_uri, config, ctx.store, job.weights_sha256, named)
    check_sizes(config, samples, reference)
    todo: list[tuple[str, int]] = []
    with ctx.sessions.begin() as s:
        for side, plan in ((SAMPLES, samples), (REFERENCE, reference)):
            for i, (start, stop) in enumerate((plan.shards or []) if plan else []):
                s.add(Shard(job_id=job_id, side=side, index=i, start=start, stop=stop, state="pending", attempts=0))
                todo.append((side, i))
        job = s.get(Job, job_id, with_for_update=True)
        if job.state != "planning":
            raise JobError(f"job {job_id} changed state to {job.state} while planning")
        job.plan = {**(job.plan or {}), SAMPLES: samples.to_dict(), REFERENCE: reference.to_dict() if reference else None}
        job.samples_hash, job.n_samples = samples.content_hash, samples.n
        if reference is not None:
            job.reference_hash, job.n_reference = reference.content_hash, reference.n
        job.state = "running" if todo else "reducing"
    return todo


@functools.lru_cache(maxsize=8)
def _open_cached(uri: str) -> Source:
    return open_source(uri)


def _job_state(ctx: Context, job_id: str) -> str:
    with ctx.sessions() as s:
        return s.scalar(select(Job.state).where(Job.id == job_id))


def run_shard(
    ctx: Context,
    job_id: str,
    side: str,
    index: int,
    extractor: FeatureExtractor,
    *,
    worker: str = "embedded",
    batch_size: int | None = None,
    num_workers: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    lease_s: float | None = None,
) -> bool:
    """Featurize one shard and record it. Returns True for the one call that makes the job ready to reduce.

    With `lease_s`, a shard another worker is running (heartbeat younger than the lease) is left to it:
    duplicate deliveries then cost nothing; a dead worker's shard is requeued once its lease expires.
    """
    with ctx.sessions.begin() as s:
        job = s.get(Job, job_id)
        shard = s.scalar(select(Shard).where(Shard.job_id == job_id, Shard.side == side, Shard.index == index))
        if job is None or shard is None or job.state != "running" or shard.state == "done":
            return False  # cancelled, failed, finished, or a duplicate delivery of a finished shard
        if lease_s is not None and shard.state == "running" and _age_s(shard.heartbeat_at) < lease_s:
            return False  # alive elsewhere
        if job.weights_sha256 != extractor.weights.sha256:
            raise WeightsError(
                f"this worker's Inception weights (sha256 {extractor.weights.sha256[:12]}…) differ from the job's "
                f"({job.weights_sha256[:12]}…); refusing to compute numbers with other weights. Point "
                "EVALFARM_WEIGHTS on every worker at the same file."
            )
        shard.state, shard.attempts, shard.worker = "running", shard.attempts + 1, worker
        shard.started_at = shard.heartbeat_at = utcnow()
        shard.error = None
        config = EvalConfig.from_dict(job.config)
        uri, n_side = (job.samples_uri, job.n_samples) if side == SAMPLES else (job.reference_uri, job.n_reference)
        start, stop, shard_id, kind = shard.start, shard.stop, shard.id, job.kind
    source = _open_cached(uri)
    if len(source) != n_side:
        raise SourceError(f"{uri} changed since the job was planned: it had {n_side} images, now {len(source)}.")
    split_ids = None
    if side == SAMPLES and kind == "eval" and "is" in config.metrics:
        split_ids = split_assignment(n_side, config.splits, config.seed)[start:stop]

    last_poll = [time.monotonic()]

    def should_stop() -> bool:
        if time.monotonic() - last_poll[0] < CANCEL_POLL_S:
            return False
        last_poll[0] = time.monotonic()
        with ctx.sessions.begin() as s:
            s.execute(update(Shard).where(Shard.id == shard_id).values(heartbeat_at=utcnow()))
            return s.scalar(select(Job.state).where(Job.id == job_id)) != "running"

    output = featurize_range(
        source,
        start,
        stop,
        extractor,
        resize=config.resize,
        batch_size=batch_size or config.batch_size,
        num_workers=num_workers,
        split_ids=split_ids,
        splits=config.splits,
        on_batch=on_batch,
        should_stop=should_stop,
    )
    ctx.partials.put(job_id, side, index, output)
    with ctx.sessions.begin() as s:
        s.execute(
            update(Shard)
            .where(Shard.id == shard_id)
            .values(state="done", finished_at=utcnow(), seconds=output.seconds, error=None)
        )
    return _try_start_reduce(ctx, job_id)


def _age_s(t: datetime | None) -> float:
    if t is None:
        return float("inf")
    if t.tzinfo is None:  # SQLite drops the zone; we always store UTC
        t = t.replace(tzinfo=timezone.utc)
    return (utcnow() - t).total_seconds()


def _try_start_reduce(ctx: Context, job_id: str) -> bool:
    with ctx.sessions.begin() as s:
        left = s.scalar(select(func.count()).select_from(Shard).where(Shard.job_id == job_id, Shard.state != "done"))
        if left:
            return False
        return s.execute(
            update(Job).where(Job.id == job_id, Job.state == "running").values(state="reducing")
        ).rowcount == 1


def record_shard_failure(ctx: Context, job_id: str, side: str, index: int, error: str, *, final: bool) -> None:
    """A failed attempt goes back to pending for a retry; the final failure fails the job with its reason."""
    with ctx.sessions.begin() as s:
        s.execute(
            update(Shard)
            .where(Shard.job_id == job_id, Shard.side == side, Shard.index == index, Shard.state != "done")
            .values(state="failed" if final else "pending", error=error, finished_at=utcnow())
        )
    if final:
        fail_job(ctx, job_id, f"shard {side}/{index} failed: {error}")


def fail_job(ctx: Context, job_id: str, error: str) -> None:
    with ctx.sessions.begin() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.not_in(FINAL_STATES))
            .values(state="failed", error=error, finished_at=utcnow())
        )
    ctx.partials.drop(job_id)


def cancel_job(ctx: Context, job_id: str) -> bool:
    with ctx.sessions.begin() as s:
        changed = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.not_in(FINAL_STATES))
            .values(state="cancelled", finished_at=utcnow(), error="cancelled by user")
        ).rowcount
        s.execute(update(Shard).where(Shard.job_id == job_id, Shard.state.in_(("pending", "running"))).values(
            state="failed", error="job cancelled"
        ))
    ctx.partials.drop(job_id)
    return bool(changed)


def _load_side(ctx: Context, job: Job, side: str, shards: list[Shard], need_features: bool) -> SideStats | list[int]:
    """Merged statistics of a featurized side, or the indices of shards whose partials were lost."""
    merge, missing = SideMerge(keep_features=need_features), []
    for sh in sorted((x for x in shards if x.side == side), key=lambda x: x.index):
        out = ctx.partials.get(job.id, side, sh.index, features=need_features)
        if out is None:
            missing.append(sh.index)
        elif not missing:
            merge.add(out)
    return missing or merge.result()


def reduce_job(ctx: Context, job_id: str) -> dict[str, Any] | list[tuple[str, int]]:
    """Merge, compute, record. Returns the result, or the shards to run again when partials were lost."""
    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise JobError(f"no job {job_id}")
        if job.state == "succeeded":
            return job.result
        if job.state != "reducing":
            return []
        shards = list(s.scalars(select(Shard).where(Shard.job_id == job_id)))
    config = EvalConfig.from_dict(job.config)
    plan = job.plan or {}
    need_kid = "kid" in config.metrics or job.kind == "reference"
    sides: dict[str, SideStats] = {}
    lost: list[tuple[str, int]] = []
    for side in (SAMPLES, REFERENCE):
        p = plan.get(side)
        if not p:
            continue
        if p["how"] == "shards":
            got = _load_side(ctx, job, side, shards, need_kid or (side == REFERENCE and config.cache))
            if isinstance(got, list):
                lost += [(side, i) for i in got]
            else:
                sides[side] = got
        elif p["how"] == "stored":
            stored = load_cached(ctx.store, p["store_key"])
            if stored is None:
                raise JobError(f"reference statistics {p['store_key']} are missing from the feature store")
            stored.check(job.weights_sha256, config.resize, p["uri"])
            sides[side] = stored.side()
        else:
            sides[side] = load_stats_file(p["uri"], job.weights_sha256, config.resize)
    if lost:
        return _requeue_lost(ctx, job_id, lost)

    if job.kind == "reference":
        _store_reference(ctx, job, plan, sides[SAMPLES], plan.get("reference_name"))
        values: dict[str, float] = {}
    else:
        ref_plan = plan.get(REFERENCE)
        if ref_plan and ref_plan["how"] == "shards" and config.cache:
            _store_reference(ctx, job, {SAMPLES: ref_plan}, sides[REFERENCE], None)
        values = compute_metrics(config, sides[SAMPLES], sides.get(REFERENCE))
    result = _result_document(job, config, values, shards)
    with ctx.sessions.begin() as s:
        j = s.get(Job, job_id, with_for_update=True)
        if j.state != "reducing":
            return j.result or []
        for name, value in values.items():
            s.add(Result(job_id=job_id, name=name, value=value))
        j.result, j.state, j.finished_at = result, "succeeded", utcnow()
    ctx.partials.drop(job_id)
    return result


def _requeue_lost(ctx: Context, job_id: str, lost: list[tuple[str, int]]) -> list[tuple[str, int]]:
    with ctx.sessions.begin() as s:
        job = s.get(Job, job_id, with_for_update=True)
        recomputes = (job.plan or {}).get("recomputes", 0) + 1
        if recomputes > MAX_RECOMPUTES:
            job.state, job.finished_at = "failed", utcnow()
            job.error = f"partial statistics of shards {lost} were lost {MAX_RECOMPUTES} times; giving up"
            return []
        job.plan = {**job.plan, "recomputes": recomputes}
        job.state = "running"
        for side, index in lost:
            s.execute(
                update(Shard)
                .where(Shard.job_id == job_id, Shard.side == side, Shard.index == index)
                .values(state="pending", error="partial statistics lost; recomputing")
            )
    return lost


def _store_reference(ctx: Context, job: Job, plan: dict, side: SideStats, name: str | None) -> None:
    p = plan[SAMPLES]
    resize = EvalConfig.from_dict(job.config).resize
    stored = StoredReference(side.feature_stats, side.features, p["content_hash"], job.weights_sha256, resize)
    key = p.get("store_key") or reference_key(p["content_hash"], job.weights_sha256, resize)
    ctx.store.put_bytes(key, stored.to_bytes())
    if name:
        with ctx.sessions.begin() as s:
            s.merge(
                Reference(
                    name=name,
                    uri=p["uri"],
                    content_hash=p["content_hash"],
                    weights_sha256=job.weights_sha256,
                    resize=resize,
                    n=side.n,
                    store_key=key,
                    created_at=utcnow(),
                )
            )


def _result_document(job: Job, config: EvalConfig, values: dict[str, float], shards: list[Shard]) -> dict[str, Any]:
    featurized = sum(sh.stop - sh.start for sh in shards)
    starts = [sh.started_at for sh in shards if sh.started_at]
    ends = [sh.finished_at for sh in shards if sh.finished_at]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0
    return {
        **values,
        "job_id": job.id,
        "n_samples": job.n_samples,
        "n_reference": job.n_reference,
        "samples": job.samples_uri,
        "samples_sha256": job.samples_hash,
        "reference": job.reference_uri,
        "reference_sha256": job.reference_hash,
        "weights_sha256": job.weights_sha256,
        "weights_canonical": job.weights_sha256.startswith(CANONICAL_SHA256_PREFIX),
        "resize": config.resize,
        "settings": config.to_dict(),
        **(
            {"kid_subset_size_used": kid_subset_size(config, job.n_samples, job.n_reference)}
            if keys.KEY_KID_MEAN in values
            else {}
        ),
        "images_featurized": featurized,
        "featurize_seconds": wall,
        "images_per_second": featurized / wall if wall > 0 else None,
        "run": job.run,
        "step": job.step,
        "tags": job.tags,
        "evalfarm_version": __version__,
        "metric_keys": [k for k in keys.METRIC_KEYS if k in values],
    }
