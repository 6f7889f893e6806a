"""The three steps of a job, shared by the embedded runner and the farm's Celery tasks.

`plan_job` → `run_shard` × K → `reduce_job`. Every step is safe to repeat: a redelivered plan finds the job
planned, a shard delivered twice is counted once, and a second reducer finds the job succeeded.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from evalfarm import keys
from evalfarm._version import __version__
from evalfarm.config import EvalConfig
from evalfarm.db import FINAL_STATES, JobState, Shard
from evalfarm.errors import JobCancelled, JobError, MetricInputError, SourceError, WeightsError
from evalfarm.metrics import FeatureStats, split_assignment
from evalfarm.metrics.rows import RowNotKept
from evalfarm.metrics.stats import encoded_size
from evalfarm.models.featurizers import Featurizer, canonical_weights
from evalfarm.pipeline import compute_metrics, featurize_extractors, kid_subset_size, merge_in_order
from evalfarm.scheduler import kid_rows, prc_tiles, records
from evalfarm.scheduler.context import Context
from evalfarm.scheduler.job import FARM, JobSnapshot
from evalfarm.scheduler.lease import Lease
from evalfarm.scheduler.plan import (
    REFERENCE,
    SAMPLES,
    SIDES,
    SidePlan,
    SideSource,
    check_sizes,
    index_key,
    plan_reference,
    plan_samples,
    shard_ranges,
)
from evalfarm.scheduler.references import (
    CorruptCache,
    NamedReference,
    load_reference,
    load_stats_file,
    reference_key,
    store_reference,
)
from evalfarm.scheduler.store import FeatureStore
from evalfarm.scheduler.tokens import LOCAL_SUBMITTER
from evalfarm.sources import SampleRoots, Source, open_source

log = logging.getLogger(__name__)

WeightsOf = Callable[[str], str]
"""The SHA-256 of this machine's weights for an extractor (loading, or downloading, them on first use)."""

DEFAULT_LEASE_S = 45.0  #: see `Settings.lease_s`
DEFAULT_PENDING_S = 600.0  #: see `Settings.pending_s`
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


def plan_job(
    ctx: Context, job_id: str, weights_of: WeightsOf | Mapping[str, str], *, heartbeat_s: float = DEFAULT_HEARTBEAT_S
) -> PlanOutcome:
    """Plan the sides, write the shard rows, pin the job to these weights and move it on. `weights_of` gives
    the SHA-256 of this machine's weights per extractor; only the job's extractors are asked for."""
    if isinstance(weights_of, Mapping):
        weights_of = weights_of.__getitem__
    started = records.start_planning(ctx.sessions, job_id)
    if started is None:
        return PlanOutcome()
    if started > MAX_ATTEMPTS:
        raise JobError(f"planning started {MAX_ATTEMPTS} times without finishing (its worker died each time)")
    try:
        with Lease(functools.partial(records.beat_job, ctx.sessions, job_id), JobState.PLANNING, heartbeat_s):
            todo = _plan(ctx, job_id, weights_of)
    except records.StepLost:
        return PlanOutcome()  # cancelled meanwhile, or presumed dead and handed to another planner
    return PlanOutcome(tuple(todo), reduce=not todo)


def _plan(ctx: Context, job_id: str, weights_of: WeightsOf) -> list[tuple[str, int]]:
    job = records.get_job(ctx.sessions, job_id)
    config = job.config
    weights = {e: weights_of(e) for e in config.featurizers}
    inception = weights.get(keys.INCEPTION)
    if job.weights_sha256 and inception and job.weights_sha256 != inception:
        raise WeightsError(
            f"the job asks for Inception weights with sha256 {job.weights_sha256[:12]}…, and this farm holds "
            f"{inception[:12]}…; point EVALFARM_WEIGHTS on the workers at that file, or submit without the pin."
        )
    roots = read_policy(ctx, job)
    samples = plan_samples(job.samples_uri, config, roots, ctx.store)
    reference = None
    if not job.is_reference_job and job.reference_uri and config.needs_reference:
        named = records.named_reference(ctx.sessions, job.reference_uri)
        reference = plan_reference(job.reference_uri, config, ctx.store, weights, named, roots)
    check_sizes(config, samples, reference)
    if reference is not None and reference.how is SideSource.SHARDS and config.cache and job.mode == FARM:
        builder = records.claim_reference_build(ctx.sessions, reference.build_key, job_id)
        if builder != job_id:  # the same images, weights and resize are being featurized by that job
            reference = replace(reference, how=SideSource.STORED, shards=(), builder=builder)
    sides = {SAMPLES: samples, **({REFERENCE: reference} if reference is not None else {})}
    return records.record_plan(ctx.sessions, job_id, job.plan.with_(sides=sides, weights=weights), inception)


def read_policy(ctx: Context, job: JobSnapshot) -> SampleRoots:
    """What this job's steps may read: the context's roots (EVALFARM_SAMPLE_ROOTS, or everything on the
    user's own machine). A farm worker without roots trusts what came straight through the database, but not
    a job submitted through the API with a token: that one it refuses, naming the variable, rather than read
    what the API would have been asked to guard."""
    if ctx.roots is not None:
        return ctx.roots
    if job.submitted_by is None or job.submitted_by.startswith(LOCAL_SUBMITTER):
        return SampleRoots.unrestricted()
    return SampleRoots.parse(())


# -- shards --------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _open_cached(uri: str, roots: SampleRoots, store_root: str, content_hash: str | None) -> Source:
    """A shard's source, opened once per process: from the planner's listing when it kept one (a tar's)."""
    index = None
    if content_hash is not None:
        try:
            index = FeatureStore(store_root).get_bytes(index_key(content_hash))
        except FileNotFoundError:
            pass
        except Exception as exc:  # the index only saves time: without it, the source is listed
            log.warning("cannot read the listing of %s from the feature store (%s); listing it", uri, exc)
    return open_source(uri, roots=roots, index=index)


def run_shard(
    ctx: Context,
    job_id: str,
    side: str,
    index: int,
    featurizers: Sequence[Featurizer] | Featurizer,
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
    `featurizers` must hold every extractor the job names (more are ignored).
    """
    held = {f.name: f for f in ([featurizers] if not isinstance(featurizers, Sequence) else featurizers)}
    claim = records.claim_shard(
        ctx.sessions, job_id, side, index, worker=worker, weights={n: f.weights.sha256 for n, f in held.items()},
        lease_s=lease_s, max_attempts=max_attempts,
    )
    if claim is None:  # cancelled, failed, running elsewhere, or done (a redelivery). The last finish moved the
        return records.try_start_reduce(ctx.sessions, job_id)  # job on; should it not have, this does
    job = claim.job
    side_plan = job.plan.side(side)  # its uri is the resolved one (a named reference's images, not its name)
    uri, n_side = side_plan.uri, side_plan.n
    source = _open_cached(uri, read_policy(ctx, job), ctx.store.root, side_plan.content_hash)
    if len(source) != n_side:
        raise SourceError(f"{uri} changed since the job was planned: it had {n_side} images, now {len(source)}.")
    config, split_ids = job.config, None
    missing = [e for e in config.featurizers if e not in held]
    if missing:
        raise JobError(f"this worker was not given the {', '.join(missing)} extractor the job needs")
    if side == SAMPLES and not job.is_reference_job and "is" in config.metrics:
        split_ids = _split_ids(n_side, config.splits, config.seed)[claim.start : claim.stop]
    beat = functools.partial(records.beat, ctx.sessions, claim)
    kept = {e for e in config.featurizers if job.keeps_features(side, e)}
    with contextlib.ExitStack() as spooled:
        with Lease(beat, JobState.RUNNING, heartbeat_s) as lease:
            # Rows that serve KID alone: only those it draws are kept (the first shard of a new draw computes it,
            # 7 s at a million samples: under the lease).
            thinned = [e for e in kept if kid_rows.kid_only(job, side, e)]  # one draw serves every extractor
            drawn = dict.fromkeys(thinned, kid_rows.shard_rows(ctx.store, job, side, claim.start, claim.stop)
                                  if thinned else None)
            rows = {}  # the kept rows stream to their files while the shard runs; a shard that fails leaves none
            for e in sorted(kept):
                n_rows = len(drawn[e]) if e in drawn else claim.stop - claim.start
                spool = ctx.partials.spool_rows(job_id, side, index, e, n_rows, held[e].dim)
                if spool is not None:
                    rows[e] = spool
                    spooled.callback(spool.abort)
            reserved = {}  # the statistics' files, their pages written while the shard runs (`store.Reserved`)
            for e in config.featurizers:
                held_file = ctx.partials.reserve_stats(job_id, side, index, e, encoded_size(held[e].dim))
                if held_file is not None:
                    reserved[e] = held_file
                    spooled.callback(held_file.abort)
            t0 = time.perf_counter()
            stats = featurize_extractors(
                source, claim.start, claim.stop, [held[e] for e in config.featurizers],
                resize=config.resize, batch_size=batch_size or config.batch_size, num_workers=num_workers,
                split_ids=split_ids, splits=config.splits, on_batch=on_batch, should_stop=lease.stopped,
                keep_features=kept, row_sinks=rows, row_subsets=drawn,
            )
            seconds = time.perf_counter() - t0  # featurizing alone: status and benchmarks split the rest off
        if lease.stopped():  # a beat saw the job end, or the claim lost, after the loop's last check
            raise JobCancelled("the job was cancelled")
        try:
            ctx.partials.put(job_id, side, index, stats, rows, reserved)
        except OSError:  # a cancel drops the job's directory, perhaps under the files being written
            if not _ended(ctx, job_id):
                raise
            ctx.partials.discard(job_id, side, index)
            raise JobCancelled("the job ended while the shard ran") from None
    # finish_shard holds only while the job runs (and moves it to reducing after its last shard): a shard of a job
    # that ended meanwhile (a one-batch shard never saw the loop's check) takes its files back below, instead of
    # a query before writing them.
    finished = records.finish_shard(ctx.sessions, claim, seconds)
    if finished is records.Finish.LOST:
        if _ended(ctx, job_id):
            ctx.partials.discard(job_id, side, index)  # the job ended meanwhile: leave nothing behind
            raise JobCancelled("the job ended while the shard ran")
        # Else another attempt holds the shard, or finished it (the job may be reducing): its write is the one
        # its row stands for, and should the two writes have interleaved, the digests tell the reducer, which
        # recomputes the shard. Never discard here: the files may be the finished attempt's.
        return False
    return finished is records.Finish.LAST  # the move to reducing was made with the finish


@functools.lru_cache(maxsize=2)
def _split_ids(n: int, splits: int, seed: int) -> np.ndarray:
    """Every sample's IS split, once per process and job: the permutation behind it costs 70 ms at 1M samples,
    which every shard of the job would pay again. Kept as int32 (4 MB at 1M), read-only: the slices handed
    out share it."""
    ids = split_assignment(n, splits, seed).astype(np.int32)
    ids.setflags(write=False)
    return ids


def _ended(ctx: Context, job_id: str) -> bool:
    state = records.job_state(ctx.sessions, job_id)
    return state is None or state in FINAL_STATES


def record_shard_failure(ctx: Context, job_id: str, side: str, index: int, error: str, *, final: bool) -> None:
    """A failed attempt goes back to pending for a retry; the final failure fails the job with its reason."""
    records.record_shard_failure(ctx.sessions, job_id, side, index, error, final=final)
    if final:
        ctx.partials.drop(job_id)


# -- reduce --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReduceOutcome:
    """What a reduce did: recorded (or found) the result, or sent lost shards back to be recomputed."""

    result: dict[str, Any] | None = None
    """The result document once the job succeeded; None when it did not (yet)."""
    recompute: tuple[tuple[str, int], ...] = ()
    """(side, index) of shards whose partials were lost: run them again, then reduce again."""
    wait: bool = False
    """The reference is being featurized by another job, or precision/recall tiles run: reduce again shortly."""
    tiles: tuple[str, ...] = ()
    """Precision/recall tiles to run (`run_prc_tile`), leased to the caller: send them, then reduce again."""


def reduce_job(ctx: Context, job_id: str, *, heartbeat_s: float = DEFAULT_HEARTBEAT_S,
               pending_s: float = DEFAULT_PENDING_S) -> ReduceOutcome:
    """Merge each side in shard order, compute the metrics, record them. Precision/recall first sends its tiles
    (`ReduceOutcome.tiles`), a tile not sent again for `pending_s` unless its worker died, and the job is
    reduced again once they are done."""
    job = records.get_job(ctx.sessions, job_id)
    if job.state == JobState.SUCCEEDED:
        return ReduceOutcome(job.result)
    if job.state != JobState.REDUCING:
        return ReduceOutcome()
    started = records.start_reducing(ctx.sessions, job_id)  # from now on its lease is watched
    if started is None:
        return ReduceOutcome()
    if started > MAX_ATTEMPTS:
        raise JobError(f"the reduce started {MAX_ATTEMPTS} times without finishing (its worker died each time: "
                       "out of memory?)")
    with Lease(functools.partial(records.beat_job, ctx.sessions, job_id), JobState.REDUCING, heartbeat_s):
        outcome = _reduce(ctx, job, pending_s)
    if outcome.wait:
        records.await_reference(ctx.sessions, job_id)
    return outcome


def run_prc_tile(ctx: Context, job_id: str, name: str, *, lease_s: float = DEFAULT_LEASE_S,
                 heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> None:
    """One precision/recall tile: its lease renewed while it runs, its result stored for the reducer. A tile
    started MAX_ATTEMPTS times (its worker died each time) fails the job; a duplicate delivery of a tile that
    runs elsewhere or is done, or a tile of a job that is no longer reducing, does nothing and counts no start."""
    job = records.get_job(ctx.sessions, job_id)
    if job.state != JobState.REDUCING:
        return
    if not prc_tiles.start_tile(ctx.partials, job_id, name, lease_s):
        return
    if ctx.partials.attempt(job_id, name) > MAX_ATTEMPTS:
        raise JobError(f"precision/recall tile {name} started {MAX_ATTEMPTS} times without finishing (its worker "
                       "died each time: out of memory? a smaller --prc-tile needs less)")

    def beat() -> JobState | None:
        ctx.partials.lease(job_id, name, lease_s, renew=True)
        return records.job_state(ctx.sessions, job_id)

    with Lease(beat, JobState.REDUCING, heartbeat_s) as lease:
        prc_tiles.run_tile(ctx.partials, job_id, job.config, job.n_samples, job.n_reference,
                           prc_tiles.TileWork.parse(name))
    if not lease.stopped():
        ctx.partials.release(job_id, name)


def _prc_progress(ctx: Context, job: JobSnapshot, pending_s: float) -> dict[str, prc_tiles.Progress]:
    if job.is_reference_job:
        return {}
    return {e: prc_tiles.advance(ctx.partials, job.id, job.config, e, job.n_samples, job.n_reference, pending_s)
            for e in job.config.featurizers if "prc" in job.config.metrics_on(e)}


def _reduce(ctx: Context, job: JobSnapshot, pending_s: float) -> ReduceOutcome:
    """One extractor at a time, so that memory holds one extractor's features of both sides, never all.
    While precision/recall tiles run, a pass only looks at their progress (no merging)."""
    job_id, config, weights = job.id, job.config, job.extractor_weights
    prc = _prc_progress(ctx, job, pending_s)
    if prc and not any(p.rewrite for p in prc.values()) and any(p.values is None for p in prc.values()):
        return ReduceOutcome(tiles=tuple(t for p in prc.values() for t in p.run), wait=True)
    lost: set[tuple[str, int]] = set()
    computed: dict[str, dict[str, float]] = {}
    for extractor in config.featurizers:
        sides: dict[str, FeatureStats] = {}
        for side in SIDES:
            plan = job.plan.side(side)
            if plan is None:
                continue
            if plan.how is SideSource.SHARDS:
                merged = _merge_shards(ctx, job, side, plan, extractor)
                if isinstance(merged, list):
                    lost.update((side, i) for i in merged)
                else:
                    sides[side] = merged
            elif plan.how is SideSource.STORED:
                key = plan.store_keys.get(extractor)
                try:
                    stored = None if key is None else load_reference(ctx.store, key, weights[extractor], config.resize,
                                                                     plan.uri)
                    problem = None if stored is not None else (
                        f"cached {extractor} reference statistics "
                        f"{ctx.store.describe(key) if key else 'of ' + plan.uri} are missing")
                except CorruptCache as exc:
                    stored, problem = None, str(exc)
                if stored is None and plan.builder and _live(ctx, plan.builder):
                    return ReduceOutcome(wait=True)  # its builder has not written it yet
                if stored is None:
                    return ReduceOutcome(recompute=tuple(_featurize_instead(ctx, job, side, plan, problem)))
                sides[side] = stored
            else:
                read_policy(ctx, job).check(plan.uri, "ref")
                sides[side] = load_stats_file(plan.uri, weights[extractor], config.resize)
        if lost:
            continue  # nothing of this extractor is computed: the job goes back to recompute those shards
        if extractor in prc and prc[extractor].rewrite:  # the tiles' inputs: written now, computed next pass
            for side in SIDES:
                prc_tiles.write_features(ctx.partials, job_id, extractor, side, sides[side].rows, config.prc_block)
            del sides
            continue
        if any(p.values is None for p in prc.values()):
            del sides
            continue  # precision/recall of another extractor is not done: every metric is computed together
        if job.is_reference_job:
            _cache_reference(ctx, job, job.plan.side(SAMPLES), sides[SAMPLES], extractor)
        else:
            ref_plan = job.plan.side(REFERENCE)
            if ref_plan is not None and ref_plan.how is SideSource.SHARDS and config.cache:
                _cache_reference(ctx, job, ref_plan, sides[REFERENCE], extractor)
            done = prc[extractor].values if extractor in prc else None
            try:
                computed[extractor] = compute_metrics(config, sides[SAMPLES], sides.get(REFERENCE), extractor,
                                                      prc=done)
            except RowNotKept as exc:
                return _kept_other_rows(ctx, job, extractor, exc)
        del sides
    if lost:
        return ReduceOutcome(recompute=tuple(records.requeue_lost(ctx.sessions, job_id, sorted(lost), MAX_RECOMPUTES)))
    if any(p.values is None for p in prc.values()):
        prc = _prc_progress(ctx, job, pending_s)  # the inputs are written: hand out the first tiles
        return ReduceOutcome(tiles=tuple(t for p in prc.values() for t in p.run), wait=True)

    if job.is_reference_job and job.plan.reference_name:
        _register_reference(ctx, job, job.plan.side(SAMPLES), job.plan.reference_name)
    values = {keys.qualified_key(k, e): v for e, vs in computed.items() for k, v in vs.items()}
    result = result_document(job, computed, records.shards_of(ctx.sessions, job_id))
    won, result = records.finish_job(ctx.sessions, job_id, values, result)
    if won:
        ctx.partials.drop(job_id)
    return ReduceOutcome(result)


def _kept_other_rows(ctx: Context, job: JobSnapshot, extractor: str, exc: RowNotKept) -> ReduceOutcome:
    """KID drew a row its shards did not keep. When the stored draw they read was wrong (another draw's rows in
    a whole file: nothing else writes one), the right one replaces it and those sides' shards run again;
    anything else is a fault of the farm's, reported as such rather than recomputed for ever."""
    draw = kid_rows.draw_of(job)
    if not kid_rows.redraw(ctx.store, draw):
        raise JobError(f"{exc}, although the stored KID draw {ctx.store.describe(draw.key)} is this job's: "
                       "an evalfarm fault; please report it") from exc
    log.warning("job %s: the stored KID draw %s was not this job's; replaced, and the shards run again", job.id,
                draw.key)
    again = [(side, i) for side in SIDES if kid_rows.kid_only(job, side, extractor)
             and job.plan.side(side).how is SideSource.SHARDS for i in range(len(job.plan.side(side).shards))]
    return ReduceOutcome(recompute=tuple(records.requeue_lost(
        ctx.sessions, job.id, again, MAX_RECOMPUTES, why=f"the KID draw {draw.key} in the feature store was wrong")))


def _live(ctx: Context, job_id: str) -> bool:
    state = records.job_state(ctx.sessions, job_id)
    return state is not None and state not in FINAL_STATES


def _featurize_instead(ctx: Context, job: JobSnapshot, side: str, plan: SidePlan, problem: str) -> list[tuple[str, int]]:
    """Stored statistics were unusable: featurize that side from its images instead, if they are still the
    images the statistics were made from."""
    log.warning("job %s: %s; featurizing %s again", job.id, problem, plan.uri)
    try:
        source = open_source(plan.uri, roots=read_policy(ctx, job))
        unchanged = source.content_hash() == plan.content_hash
    except SourceError:
        unchanged = False
    if not unchanged:
        raise JobError(f"{problem}, and {plan.uri} is gone or changed since they were made; "
                       "recreate the reference (`evalfarm ref create`)")
    shards = shard_ranges(len(source), job.config.shard_size)
    again = replace(plan, how=SideSource.SHARDS, shards=shards)
    return records.replan_side(ctx.sessions, job.id, side, again, f"{problem}; featurized again", MAX_RECOMPUTES)


def _merge_shards(
    ctx: Context, job: JobSnapshot, side: str, plan: SidePlan, extractor: str
) -> FeatureStats | list[int]:
    """The side's merged statistics of one extractor, or the indices of shards whose partials were lost."""
    missing: list[int] = []

    def present() -> Iterator[FeatureStats]:
        for index in range(len(plan.shards)):
            part = ctx.partials.get(job.id, side, index, features=job.keeps_features(side, extractor),
                                     extractor=extractor)
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


def _cache_reference(ctx: Context, job: JobSnapshot, plan: SidePlan, stats: FeatureStats, extractor: str) -> None:
    resize, weights = job.config.resize, job.extractor_weights[extractor]
    key = plan.store_keys.get(extractor) or reference_key(plan.content_hash, weights, resize)
    store_reference(ctx.store, key, stats, content_hash=plan.content_hash, weights_sha256=weights, resize=resize)


def _register_reference(ctx: Context, job: JobSnapshot, plan: SidePlan, name: str) -> None:
    """Name the statistics a reference job cached, one file per extractor."""
    resize, weights = job.config.resize, job.extractor_weights
    stored = {e: (weights[e], plan.store_keys.get(e) or reference_key(plan.content_hash, weights[e], resize))
              for e in job.config.featurizers}
    first_weights, first_key = next(iter(stored.values()))
    records.register_reference(
        ctx.sessions,
        NamedReference(name, plan.uri, plan.content_hash, first_weights, resize, plan.n, first_key,
                       stored if list(stored) != [keys.INCEPTION] else {}),
    )


def reported_values(config: EvalConfig, computed: dict[str, dict[str, float]]) -> dict[str, float]:
    """What torch-fidelity's `calculate_metrics` would return under its own keys: each metric on its first
    extractor (Inception for IS, FID and KID and VGG16 for PRC when none is named; else the first named)."""
    out: dict[str, float] = {}
    for metric, metric_keys in keys.KEYS_OF_METRIC.items():
        on = config.extractors_for(metric)
        if on and on[0] in computed:
            out.update({k: computed[on[0]][k] for k in metric_keys if k in computed[on[0]]})
    return out


def result_document(job: JobSnapshot, computed: dict[str, dict[str, float]], shards: list[Shard]) -> dict[str, Any]:
    """The record of a finished evaluation: the values under torch-fidelity's keys, every extractor's values under
    the names of the results database, and what they depend on (each extractor's weights)."""
    values = {keys.qualified_key(k, e): v for e, vs in computed.items() for k, v in vs.items()}
    reported = reported_values(job.config, computed)
    weights = job.extractor_weights
    featurized = sum(sh.stop - sh.start for sh in shards)
    starts = [sh.started_at for sh in shards if sh.started_at]
    ends = [sh.finished_at for sh in shards if sh.finished_at]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0
    config = job.config
    canonical = {e: canonical_weights(e, weights.get(e)) for e in config.featurizers}
    return {
        # torch-fidelity's key holds the first extractor's value where no value of the same name is stored:
        # a name means one thing in the document and in the results database
        **reported,
        **values,
        "job_id": job.id,
        "n_samples": job.n_samples,
        "n_reference": job.n_reference,
        "samples": job.samples_uri,
        "samples_sha256": job.samples_hash,
        "reference": job.reference_uri,
        "reference_sha256": job.reference_hash,
        "weights_sha256": job.weights_sha256,
        # False when any extractor's weights are known not to be the published file (DINOv2's have no hash)
        "weights_canonical": all(c is not False for c in canonical.values()),
        "extractors": {
            e: {"weights_sha256": weights.get(e), "weights_canonical": canonical[e], "metrics": computed.get(e, {})}
            for e in config.featurizers
        },
        "resize": config.resize,
        "settings": config.to_dict(),
        **(
            {"kid_subset_size_used": kid_subset_size(config, job.n_samples, job.n_reference)}
            if "kid" in config.metrics
            else {}
        ),
        "images_featurized": featurized,
        "featurize_seconds": wall,
        "images_per_second": featurized / wall if wall > 0 else None,
        "run": job.run,
        "step": job.step,
        "tags": job.tags,
        "evalfarm_version": __version__,
        "metric_keys": sorted(values, key=lambda name: (keys.ALL_METRIC_KEYS.index(keys.split_qualified(name)[0]), name)),
        **({"warnings": list(job.plan.notes)} if job.plan.notes else {}),
    }
