"""The three steps of a job, shared by the embedded runner and the farm's Celery tasks.

`plan_job` → `run_shard` × K → `reduce_job`. Every step is safe to repeat: a redelivered plan finds the job
planned, a shard delivered twice is counted once, and a second reducer finds the job succeeded.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from evalfarm import keys
from evalfarm._version import __version__
from evalfarm.db import JobState, Shard
from evalfarm.errors import JobCancelled, JobError, MetricInputError, SourceError, WeightsError
from evalfarm.metrics import FeatureStats, split_assignment
from evalfarm.models import FeatureExtractor
from evalfarm.models.weights import CANONICAL_SHA256_PREFIX
from evalfarm.pipeline import compute_metrics, featurize_range, kid_subset_size, merge_in_order
from evalfarm.scheduler import records
from evalfarm.scheduler.context import Context
from evalfarm.scheduler.job import JobSnapshot
from evalfarm.scheduler.lease import Lease
from evalfarm.scheduler.plan import (
    REFERENCE,
    SAMPLES,
    SIDES,
    SidePlan,
    SideSource,
    check_sizes,
    plan_reference,
    plan_samples,
)
from evalfarm.scheduler.references import (
    NamedReference,
    load_reference,
    load_stats_file,
    reference_key,
    store_reference,
)
from evalfarm.sources import Source, open_source

MAX_ATTEMPTS = 4  #: a shard started this often (worker deaths included) fails the job: a poison shard
MAX_RECOMPUTES = 3  #: lost partials are recomputed at most this often before the job fails
DEFAULT_HEARTBEAT_S = 10.0  #: see `Settings.heartbeat_s`


# -- plan ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanOutcome:
    """What planning left to do: shards to run, or a reduce straight away when nothing needs featurizing.
    Both are empty when the job was planned already (a redelivered message) or is no longer queued."""

    shards: tuple[tuple[str, int], ...] = ()
    reduce: bool = False


def plan_job(ctx: Context, job_id: str, weights_sha256: str) -> PlanOutcome:
    """Plan the sides, write the shard rows, pin the job to these weights and move it on."""
    if not records.start_planning(ctx.sessions, job_id):
        return PlanOutcome()
    job = records.get_job(ctx.sessions, job_id)
    if job.weights_sha256 and job.weights_sha256 != weights_sha256:
        raise WeightsError(
            f"the job asks for Inception weights with sha256 {job.weights_sha256[:12]}…, and this farm holds "
            f"{weights_sha256[:12]}…; point EVALFARM_WEIGHTS on the workers at that file, or submit without the pin."
        )
    config = job.config
    samples = plan_samples(job.samples_uri, config)
    reference = None
    if not job.is_reference_job and job.reference_uri and config.needs_reference:
        named = records.named_reference(ctx.sessions, job.reference_uri)
        reference = plan_reference(job.reference_uri, config, ctx.store, weights_sha256, named)
    check_sizes(config, samples, reference)
    sides = {SAMPLES: samples, **({REFERENCE: reference} if reference is not None else {})}
    todo = records.record_plan(ctx.sessions, job_id, job.plan.with_(sides=sides), weights_sha256)
    return PlanOutcome(tuple(todo), reduce=not todo)


# -- shards --------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _open_cached(uri: str) -> Source:
    return open_source(uri)


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
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    max_attempts: int = MAX_ATTEMPTS,
) -> bool:
    """Featurize one shard and record it. Returns True for the one call that makes the job ready to reduce.

    With `lease_s`, a shard another worker is running (heartbeat younger than the lease) is left to it:
    duplicate deliveries then cost nothing; a dead worker's shard is requeued once its lease expires.
    """
    claim = records.claim_shard(
        ctx.sessions, job_id, side, index, worker=worker, weights_sha256=extractor.weights.sha256,
        lease_s=lease_s, max_attempts=max_attempts,
    )
    if claim is None:
        return False  # cancelled, failed, finished, or running elsewhere
    job, t0 = claim.job, time.perf_counter()
    uri, n_side = job.uri_of(side), job.n_of(side)
    source = _open_cached(uri)
    if len(source) != n_side:
        raise SourceError(f"{uri} changed since the job was planned: it had {n_side} images, now {len(source)}.")
    config, split_ids = job.config, None
    if side == SAMPLES and not job.is_reference_job and "is" in config.metrics:
        split_ids = split_assignment(n_side, config.splits, config.seed)[claim.start : claim.stop]
    with Lease(ctx.sessions, job_id, claim.shard_id, heartbeat_s) as lease:
        stats = featurize_range(
            source, claim.start, claim.stop, extractor,
            resize=config.resize, batch_size=batch_size or config.batch_size, num_workers=num_workers,
            split_ids=split_ids, splits=config.splits, on_batch=on_batch, should_stop=lease.stopped,
            keep_features=job.keeps_features(side),
        )
        if lease.stopped():
            raise JobCancelled("the job was cancelled")
    ctx.partials.put(job_id, side, index, stats)
    records.finish_shard(ctx.sessions, claim.shard_id, time.perf_counter() - t0)
    return records.try_start_reduce(ctx.sessions, job_id)


def record_shard_failure(ctx: Context, job_id: str, side: str, index: int, error: str, *, final: bool) -> None:
    """A failed attempt goes back to pending for a retry; the final failure fails the job with its reason."""
    records.record_shard_failure(ctx.sessions, job_id, side, index, error, final=final)
    if final:
        fail_job(ctx, job_id, f"shard {side}/{index} failed: {error}")


# -- reduce --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReduceOutcome:
    """What a reduce did: recorded (or found) the result, or sent lost shards back to be recomputed."""

    result: dict[str, Any] | None = None
    """The result document once the job succeeded; None when it did not (yet)."""
    recompute: tuple[tuple[str, int], ...] = ()
    """(side, index) of shards whose partials were lost: run them again, then reduce again."""


def reduce_job(ctx: Context, job_id: str) -> ReduceOutcome:
    """Merge each side in shard order, compute the metrics, record them."""
    job = records.get_job(ctx.sessions, job_id)
    if job.state == JobState.SUCCEEDED:
        return ReduceOutcome(job.result)
    if job.state != JobState.REDUCING:
        return ReduceOutcome()
    sides: dict[str, FeatureStats] = {}
    lost: list[tuple[str, int]] = []
    for side in SIDES:
        plan = job.plan.side(side)
        if plan is None:
            continue
        if plan.how is SideSource.SHARDS:
            merged = _merge_shards(ctx, job, side, plan)
            if isinstance(merged, list):
                lost += [(side, i) for i in merged]
            else:
                sides[side] = merged
        elif plan.how is SideSource.STORED:
            stored = load_reference(ctx.store, plan.store_key, job.weights_sha256, job.config.resize, plan.uri)
            if stored is None:
                raise JobError(f"reference statistics {plan.store_key} are missing from the feature store")
            sides[side] = stored
        else:
            sides[side] = load_stats_file(plan.uri, job.weights_sha256, job.config.resize)
    if lost:
        return ReduceOutcome(recompute=tuple(records.requeue_lost(ctx.sessions, job_id, lost, MAX_RECOMPUTES)))

    values: dict[str, float] = {}
    if job.is_reference_job:
        _cache_reference(ctx, job, job.plan.side(SAMPLES), sides[SAMPLES], job.plan.reference_name)
    else:
        ref_plan = job.plan.side(REFERENCE)
        if ref_plan is not None and ref_plan.how is SideSource.SHARDS and job.config.cache:
            _cache_reference(ctx, job, ref_plan, sides[REFERENCE], None)
        values = compute_metrics(job.config, sides[SAMPLES], sides.get(REFERENCE))
    result = result_document(job, values, records.shards_of(ctx.sessions, job_id))
    won, result = records.finish_job(ctx.sessions, job_id, values, result)
    if won:
        ctx.partials.drop(job_id)
    return ReduceOutcome(result)


def _merge_shards(ctx: Context, job: JobSnapshot, side: str, plan: SidePlan) -> FeatureStats | list[int]:
    """The side's merged statistics, or the indices of shards whose partials were lost."""
    missing: list[int] = []

    def present() -> Iterator[FeatureStats]:
        for index in range(len(plan.shards)):
            part = ctx.partials.get(job.id, side, index, features=job.keeps_features(side))
            if part is None:
                missing.append(index)
            elif not missing:
                yield part

    try:
        merged = merge_in_order(present())
    except MetricInputError:
        if missing:
            return missing
        raise
    return missing or merged


def _cache_reference(ctx: Context, job: JobSnapshot, plan: SidePlan, stats: FeatureStats, name: str | None) -> None:
    resize = job.config.resize
    key = plan.store_key or reference_key(plan.content_hash, job.weights_sha256, resize)
    store_reference(ctx.store, key, stats, content_hash=plan.content_hash, weights_sha256=job.weights_sha256,
                    resize=resize)
    if name:
        records.register_reference(
            ctx.sessions, NamedReference(name, plan.uri, plan.content_hash, job.weights_sha256, resize, stats.n, key)
        )


def result_document(job: JobSnapshot, values: dict[str, float], shards: list[Shard]) -> dict[str, Any]:
    """The record of a finished evaluation: the values under torch-fidelity's keys, and what they depend on."""
    featurized = sum(sh.stop - sh.start for sh in shards)
    starts = [sh.started_at for sh in shards if sh.started_at]
    ends = [sh.finished_at for sh in shards if sh.finished_at]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0
    config = job.config
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


# -- ends ----------------------------------------------------------------------------------------------------------


def fail_job(ctx: Context, job_id: str, error: str) -> None:
    records.fail_job(ctx.sessions, job_id, error)
    ctx.partials.drop(job_id)


def cancel_job(ctx: Context, job_id: str) -> bool:
    """Cooperative: queued shards are skipped when they start, running ones stop at their next batch."""
    changed = records.cancel_job(ctx.sessions, job_id)
    ctx.partials.drop(job_id)
    return changed

