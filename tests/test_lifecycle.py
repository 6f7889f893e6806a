"""The job state machine, step by step: `plan_job` → `run_shard` × K → `reduce_job`, and what each step does
when something goes wrong in between.

These are unit tests of `evalfarm.scheduler.steps` and `records` on a real SQLite database and the in-memory
partial store, with no server: a lost partial is recomputed (a limited number of times), a corrupted one is
recomputed rather than used, a duplicate delivery counts once, a cancel stops the job and its running shard, a
poison shard fails the job after the attempt limit, a second reducer changes nothing, and the reconciler sends
again the steps whose worker or message was lost, but not those still alive. A worker or planner "that died" is
simulated by what it leaves in the database: a claimed step whose heartbeat stopped, moved an hour back.

Every job here is 8 samples and 6 reference images in shards of 3 (samples 3+3+2, reference 3+3), without the
reference cache so both sides are featurized in shards; one extractor serves the module. Featurizing them takes
seconds; FID's 2048-d eigendecomposition takes several more per reduce on a shared CPU, so the jobs ask for IS and
KID, and only the lost-partial test (and the undisturbed run it is compared to) asks for FID as well.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select, update

from evalfarm.config import EvalConfig
from evalfarm.db import Job, JobState, Result, Shard, ShardState, session_factory
from evalfarm.db.models import utcnow
from evalfarm.errors import JobCancelled, JobError, WeightsError
from evalfarm.keys import INCEPTION, JOB_EVAL, METRIC_KEYS
from evalfarm.metrics import FeatureStats
from evalfarm.models import FeatureExtractor, Weights
from evalfarm.models.weights import file_sha256
from evalfarm.scheduler import deadlines, lease, records, steps
from evalfarm.scheduler.context import Context
from evalfarm.scheduler.ends import cancel_job, fail_job, sweep
from evalfarm.scheduler.job import EMBEDDED
from evalfarm.scheduler.partials import LocalPartials, PartialStore
from evalfarm.scheduler.plan import REFERENCE, SAMPLES, index_key
from evalfarm.scheduler.queries import farm_totals
from evalfarm.scheduler.records import ShardClaim
from evalfarm.scheduler.steps import (
    MAX_ATTEMPTS,
    MAX_RECOMPUTES,
    PlanOutcome,
    ReduceOutcome,
    plan_job,
    record_shard_failure,
    reduce_job,
    run_shard,
)
from evalfarm.scheduler.store import FeatureStore
from evalfarm.sources import TarSource

from .helpers import write_images

CONFIG = EvalConfig(
    metrics=("is", "kid"), splits=2, kid_subsets=3, kid_subset_size=4, shard_size=3, batch_size=3, cache=False
)
WITH_FID = CONFIG.with_(metrics=("is", "fid", "kid"))
SAMPLE_COUNT, REFERENCE_COUNT = 8, 6
ALL_SHARDS = ((SAMPLES, 0), (SAMPLES, 1), (SAMPLES, 2), (REFERENCE, 0), (REFERENCE, 1))
#: The reconciler's deadlines here: a lease (heartbeat age) and the wait for a sent step to start. Both are long,
#: so a step claimed or sent during a test stays live however slow a loaded CPU makes the test; a step that died
#: is one whose time is moved AN_HOUR back, far past both.
LEASE_S, PENDING_S = 300.0, 600.0
AN_HOUR = timedelta(hours=1)

ShardKey = tuple[str, int]


# -- a test double of the partial store's contract -----------------------------------------------------------------


class DigestPartials:
    """A test double of the `PartialStore` contract as the farm keeps it (not of Redis): each partial is
    stored as `FeatureStats.to_bytes()` beside its SHA-256, and `get` answers None, "lost", when the bytes no
    longer match their digest. `corrupt` flips one byte of a stored partial, as a bad disk or a torn write would.
    """

    def __init__(self) -> None:
        self._blobs: dict[tuple[str, str, int], bytes] = {}
        self._digests: dict[tuple[str, str, int], str] = {}

    def spool_rows(self, job_id: str, side: str, shard: int, extractor: str, n: int, dim: int) -> None:
        return None  # rows stay in the statistics, encoded with them

    def reserve_stats(self, job_id: str, side: str, shard: int, extractor: str, nbytes: int) -> None:
        return None  # statistics are bytes in memory here

    def put(self, job_id: str, side: str, shard: int, parts: dict[str, FeatureStats], rows: object = None,
            reserved: object = None) -> None:
        assert not rows and not reserved
        data = parts[INCEPTION].to_bytes()  # these jobs use Inception alone
        self._blobs[(job_id, side, shard)] = data
        self._digests[(job_id, side, shard)] = hashlib.sha256(data).hexdigest()

    def get(self, job_id: str, side: str, shard: int, *, features: bool,
            extractor: str = INCEPTION) -> FeatureStats | None:
        assert extractor == INCEPTION
        data = self._blobs.get((job_id, side, shard))
        if data is None or hashlib.sha256(data).hexdigest() != self._digests.get((job_id, side, shard)):
            return None
        return FeatureStats.from_bytes(data, features=features)

    def discard(self, job_id: str, side: str, shard: int) -> None:
        self._blobs.pop((job_id, side, shard), None)
        self._digests.pop((job_id, side, shard), None)

    def job_ids(self) -> set[str]:
        return {k[0] for k in self._blobs}

    def drop(self, job_id: str) -> None:
        for key in [k for k in self._blobs if k[0] == job_id]:
            self.discard(*key)

    def corrupt(self, job_id: str, side: str, shard: int) -> None:
        data = bytearray(self._blobs[(job_id, side, shard)])
        data[len(data) // 2] ^= 0xFF
        self._blobs[(job_id, side, shard)] = bytes(data)


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("lifecycle-images")
    samples = write_images(root / "samples", SAMPLE_COUNT, 32, seed=11, brightness=1.0)
    reference = write_images(root / "reference", REFERENCE_COUNT, 32, seed=12, brightness=0.7)
    return str(samples), str(reference)


@pytest.fixture(scope="module")
def extractor(weights_path: Path) -> FeatureExtractor:
    return FeatureExtractor(Weights(weights_path, file_sha256(weights_path)), "cpu")


def make_context(root: Path, partials: PartialStore | None = None) -> Context:
    """SQLite and a feature store under `root`; partials in memory unless given."""
    return Context(session_factory(f"sqlite:///{root}/jobs.sqlite"), FeatureStore(str(root / "store")),
                   partials if partials is not None else LocalPartials())


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    return make_context(tmp_path)


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory, image_sets: tuple[str, str],
             extractor: FeatureExtractor) -> dict[str, float]:
    """The metric values (all of them) of an undisturbed run: what every recovered job must reproduce."""
    ctx = make_context(tmp_path_factory.mktemp("lifecycle-reference-run"))
    job_id = planned_job(ctx, image_sets, extractor, WITH_FID)
    run_all(ctx, job_id, extractor)
    return metrics_of(reduce_job(ctx, job_id).result)


# -- helpers -------------------------------------------------------------------------------------------------------


def new_job(ctx: Context, image_sets: tuple[str, str], weights_sha256: str | None, config: EvalConfig = CONFIG
            ) -> str:
    samples, reference = image_sets
    request = records.Submission(samples, reference, config, kind=JOB_EVAL, weights_sha256=weights_sha256)
    return records.create_job(ctx.sessions, request, mode=EMBEDDED).job_id


def planned_job(ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor,
                config: EvalConfig = CONFIG) -> str:
    """A job created and planned with the extractor's weights; its shards are all pending."""
    job_id = new_job(ctx, image_sets, extractor.weights.sha256, config)
    assert plan_job(ctx, job_id, {INCEPTION: extractor.weights.sha256}).shards == ALL_SHARDS
    return job_id


def run(ctx: Context, job_id: str, shard: ShardKey, extractor: FeatureExtractor, **kwargs: Any) -> bool:
    side, index = shard
    return run_shard(ctx, job_id, side, index, extractor, num_workers=0, **kwargs)


def run_all(ctx: Context, job_id: str, extractor: FeatureExtractor, shards: tuple[ShardKey, ...] = ALL_SHARDS
            ) -> list[bool]:
    """Run the shards in order; returns what each `run_shard` answered."""
    return [run(ctx, job_id, shard, extractor) for shard in shards]


def metrics_of(result: dict[str, Any] | None) -> dict[str, float]:
    assert result is not None
    return {key: result[key] for key in METRIC_KEYS if key in result}


def assert_reproduces(result: dict[str, Any] | None, expected: dict[str, float]) -> None:
    """The result holds the undisturbed run's numbers, for every metric it was asked for."""
    got = metrics_of(result)
    assert set(got) == set(result["metric_keys"]) and got
    assert got == pytest.approx({key: expected[key] for key in got}, rel=1e-9)


def rows(ctx: Context, job_id: str) -> dict[ShardKey, Shard]:
    return {(sh.side, sh.index): sh for sh in records.shards_of(ctx.sessions, job_id)}


def states(ctx: Context, job_id: str) -> dict[ShardKey, ShardState]:
    return {key: sh.state for key, sh in rows(ctx, job_id).items()}


def result_rows(ctx: Context, job_id: str) -> list[tuple[str, float]]:
    with ctx.sessions() as s:
        return [(r.name, r.value) for r in s.scalars(select(Result).where(Result.job_id == job_id))]


def stored_partials(ctx: Context, job_id: str) -> list[ShardKey]:
    """The shards whose partials the store still answers for."""
    return [(side, i) for side, i in ALL_SHARDS if ctx.partials.get(job_id, side, i, features=True) is not None]


def claim(ctx: Context, job_id: str, shard: ShardKey, extractor: FeatureExtractor, worker: str) -> ShardClaim:
    """What a worker does first with a shard; one that dies right after leaves the shard `running`."""
    side, index = shard
    got = records.claim_shard(ctx.sessions, job_id, side, index, worker=worker,
                              weights={INCEPTION: extractor.weights.sha256}, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS)
    assert got is not None
    return got


def age_shard(ctx: Context, job_id: str, shard: ShardKey, column: str = "heartbeat_at") -> None:
    """Move the shard's `heartbeat_at` (its worker's last beat) or `enqueued_at` (its message) an hour back."""
    side, index = shard
    with ctx.sessions.begin() as s:
        s.execute(update(Shard).where(Shard.job_id == job_id, Shard.side == side, Shard.index == index)
                  .values({column: utcnow() - AN_HOUR}))


def age_job(ctx: Context, job_id: str, column: str) -> None:
    """Move the job's `heartbeat_at` (its planner's or reducer's last beat) or `enqueued_at` an hour back."""
    with ctx.sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values({column: utcnow() - AN_HOUR}))


def find_lost_work(ctx: Context, *, broker_lost: bool = False) -> deadlines.LostWork:
    return deadlines.find_lost_work(ctx.sessions, lease_s=LEASE_S, pending_s=PENDING_S, broker_lost=broker_lost)


# -- recovery of lost partials -------------------------------------------------------------------------------------


def counted(ctx: Context) -> tuple[int, int]:
    """The farm's counters of shards done and images featurized (what /metrics exports)."""
    totals = farm_totals(ctx.sessions)
    return totals.shards_done, totals.images_featurized


def test_a_lost_partial_is_recomputed_and_gives_the_undisturbed_numbers(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor, expected: dict[str, float]
) -> None:
    job_id = planned_job(ctx, image_sets, extractor, WITH_FID)
    run_all(ctx, job_id, extractor)
    assert records.get_job(ctx.sessions, job_id).state == JobState.REDUCING
    ctx.partials.discard(job_id, SAMPLES, 1)  # a Redis restart, an expired key

    outcome = reduce_job(ctx, job_id)

    assert outcome.result is None
    assert outcome.recompute == ((SAMPLES, 1),)
    job = records.get_job(ctx.sessions, job_id)
    assert job.state == JobState.RUNNING
    assert job.plan.recomputes == 1
    assert states(ctx, job_id) == {key: ShardState.PENDING if key == (SAMPLES, 1) else ShardState.DONE
                                   for key in ALL_SHARDS}
    assert counted(ctx) == (5, SAMPLE_COUNT + REFERENCE_COUNT)  # a counter never goes back

    assert run(ctx, job_id, (SAMPLES, 1), extractor) is True
    assert counted(ctx) == (6, SAMPLE_COUNT + REFERENCE_COUNT + 3)  # the recomputed shard was featurized again
    result = reduce_job(ctx, job_id).result
    assert set(metrics_of(result)) == set(METRIC_KEYS)
    assert_reproduces(result, expected)
    assert rows(ctx, job_id)[(SAMPLES, 1)].attempts == 2


def test_a_partial_that_fails_its_digest_is_recomputed_not_used(
    tmp_path: Path, image_sets: tuple[str, str], extractor: FeatureExtractor, expected: dict[str, float]
) -> None:
    partials = DigestPartials()
    ctx = make_context(tmp_path, partials)
    job_id = planned_job(ctx, image_sets, extractor)
    run_all(ctx, job_id, extractor)
    partials.corrupt(job_id, REFERENCE, 0)

    outcome = reduce_job(ctx, job_id)

    assert outcome.result is None
    assert outcome.recompute == ((REFERENCE, 0),)
    assert records.get_job(ctx.sessions, job_id).result is None
    assert result_rows(ctx, job_id) == []
    assert run(ctx, job_id, (REFERENCE, 0), extractor) is True
    assert_reproduces(reduce_job(ctx, job_id).result, expected)


def test_partials_lost_more_often_than_the_recompute_limit_fail_the_job(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)
    run_all(ctx, job_id, extractor)
    for _ in range(MAX_RECOMPUTES):
        ctx.partials.discard(job_id, SAMPLES, 2)
        assert reduce_job(ctx, job_id).recompute == ((SAMPLES, 2),)
        assert run(ctx, job_id, (SAMPLES, 2), extractor) is True

    ctx.partials.discard(job_id, SAMPLES, 2)
    outcome = reduce_job(ctx, job_id)

    assert outcome.result is None
    assert outcome.recompute == ()
    job = records.get_job(ctx.sessions, job_id)
    assert job.state == JobState.FAILED
    assert f"lost {MAX_RECOMPUTES} times" in job.error


# -- repeated and late messages ------------------------------------------------------------------------------------


def test_a_duplicate_delivery_of_a_done_shard_is_counted_once(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor, expected: dict[str, float]
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)
    assert run(ctx, job_id, (SAMPLES, 0), extractor) is False
    first = rows(ctx, job_id)[(SAMPLES, 0)]
    partial = ctx.partials.get(job_id, SAMPLES, 0, features=True)

    assert run(ctx, job_id, (SAMPLES, 0), extractor) is False  # redelivered while the job runs
    again = rows(ctx, job_id)[(SAMPLES, 0)]
    assert (again.state, again.attempts, again.finished_at) == (ShardState.DONE, 1, first.finished_at)
    assert counted(ctx) == (1, 3)
    assert ctx.partials.get(job_id, SAMPLES, 0, features=True) is partial

    # Exactly one of the remaining shards moves the job to `reducing`, and a late duplicate then does nothing.
    assert run_all(ctx, job_id, extractor, ALL_SHARDS[1:]) == [False, False, False, True]
    assert run(ctx, job_id, (SAMPLES, 0), extractor) is False
    assert rows(ctx, job_id)[(SAMPLES, 0)].attempts == 1

    result = reduce_job(ctx, job_id).result
    assert_reproduces(result, expected)
    assert result["images_featurized"] == SAMPLE_COUNT + REFERENCE_COUNT
    names = [name for name, _ in result_rows(ctx, job_id)]
    assert sorted(names) == sorted(result["metric_keys"])
    assert len(names) == 4  # IS mean and std, KID mean and std


def test_a_second_reducer_returns_the_recorded_result_and_records_nothing(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)
    run_all(ctx, job_id, extractor)
    first = reduce_job(ctx, job_id)
    assert first.result is not None
    recorded = sorted(result_rows(ctx, job_id))
    assert stored_partials(ctx, job_id) == []  # dropped by the reducer that recorded the result

    second = reduce_job(ctx, job_id)

    assert second.result == first.result
    assert second.recompute == ()
    assert sorted(result_rows(ctx, job_id)) == recorded
    assert [name for name, _ in recorded] == sorted(first.result["metric_keys"])
    job = records.get_job(ctx.sessions, job_id)
    assert (job.state, job.result) == (JobState.SUCCEEDED, first.result)


def test_planning_twice_plans_once(ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor) -> None:
    job_id = planned_job(ctx, image_sets, extractor)

    assert plan_job(ctx, job_id, {INCEPTION: extractor.weights.sha256}) == PlanOutcome()
    assert len(records.shards_of(ctx.sessions, job_id)) == len(ALL_SHARDS)
    assert records.get_job(ctx.sessions, job_id).state == JobState.RUNNING


# -- cancel and failure ----------------------------------------------------------------------------------------------


def test_cancel_mid_job_stops_the_remaining_shards_and_gives_no_result(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)
    run_all(ctx, job_id, extractor, ALL_SHARDS[:1])
    claim(ctx, job_id, ALL_SHARDS[1], extractor, worker="busy")  # a worker is in the middle of this one

    assert cancel_job(ctx, job_id) is True

    job = records.get_job(ctx.sessions, job_id)
    assert job.state == JobState.CANCELLED
    assert states(ctx, job_id) == {key: ShardState.DONE if key == ALL_SHARDS[0] else ShardState.FAILED
                                   for key in ALL_SHARDS}
    assert stored_partials(ctx, job_id) == []
    assert run_all(ctx, job_id, extractor, ALL_SHARDS[1:]) == [False] * (len(ALL_SHARDS) - 1)
    assert all(sh.attempts == 0 for key, sh in rows(ctx, job_id).items() if key not in ALL_SHARDS[:2])
    assert reduce_job(ctx, job_id).result is None
    assert cancel_job(ctx, job_id) is False  # already final
    assert records.get_job(ctx.sessions, job_id).state == JobState.CANCELLED


def test_a_cancel_while_a_shard_runs_stops_it_and_leaves_no_partial(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)

    with pytest.raises(JobCancelled):  # the user cancels while the shard's (only) batch is in the network
        run(ctx, job_id, (SAMPLES, 0), extractor, on_batch=lambda _: cancel_job(ctx, job_id))

    assert records.get_job(ctx.sessions, job_id).state == JobState.CANCELLED
    assert rows(ctx, job_id)[(SAMPLES, 0)].state == ShardState.FAILED
    assert stored_partials(ctx, job_id) == []
    assert ctx.partials.job_ids() == set()


def shard_files(root: Path) -> list[str]:
    """Every file under a partial store's directory, temporaries included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_shard_that_fails_between_batches_leaves_no_rows_file_behind(
    tmp_path: Path, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    ctx = make_context(tmp_path, LocalPartials(FeatureStore(str(tmp_path / "spill"))))
    job_id = planned_job(ctx, image_sets, extractor)

    def crash(seen: list[int] = []) -> None:  # noqa: B006 - the batches seen so far
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("the worker's GPU fell off the bus")

    with pytest.raises(RuntimeError, match="fell off"):  # rows of the first batch were already spooled
        run(ctx, job_id, (SAMPLES, 0), extractor, batch_size=1, on_batch=lambda _: crash())

    assert shard_files(tmp_path / "spill") == []
    assert run(ctx, job_id, (SAMPLES, 0), extractor, batch_size=1) is False  # the retry stores it whole
    assert stored_partials(ctx, job_id) == [(SAMPLES, 0)]


def test_a_cancel_while_a_shard_spools_its_rows_leaves_no_file(
    tmp_path: Path, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    ctx = make_context(tmp_path, LocalPartials(FeatureStore(str(tmp_path / "spill"))))
    job_id = planned_job(ctx, image_sets, extractor)

    with pytest.raises(JobCancelled):  # no heartbeat comes within the shard: the finish is what refuses it
        run(ctx, job_id, (SAMPLES, 0), extractor, batch_size=1, on_batch=lambda _: cancel_job(ctx, job_id))

    assert records.get_job(ctx.sessions, job_id).state == JobState.CANCELLED
    assert shard_files(tmp_path / "spill") == []


class CancelDuringMerge(LocalPartials):
    """The in-memory store, and a user who cancels the job while the reducer reads its first partial (on the
    farm a reduce of many shards takes minutes, so a cancel then is an ordinary event, not a contrived race)."""

    def __init__(self) -> None:
        super().__init__()
        self.canceller: Context | None = None

    def get(self, job_id: str, side: str, shard: int, *, features: bool,
            extractor: str = INCEPTION) -> FeatureStats | None:
        if self.canceller is not None:
            ctx, self.canceller = self.canceller, None
            cancel_job(ctx, job_id)  # marks the job cancelled, then drops its partials
        return super().get(job_id, side, shard, features=features, extractor=extractor)


def test_a_cancel_while_the_reducer_merges_is_not_undone(
    tmp_path: Path, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    partials = CancelDuringMerge()
    ctx = make_context(tmp_path, partials)
    job_id = planned_job(ctx, image_sets, extractor)
    run_all(ctx, job_id, extractor)
    partials.canceller = ctx

    outcome = reduce_job(ctx, job_id)

    assert outcome == ReduceOutcome()  # no result, and nothing to recompute for a cancelled job
    assert records.get_job(ctx.sessions, job_id).state == JobState.CANCELLED
    assert ShardState.PENDING not in states(ctx, job_id).values()


def test_a_poison_shard_fails_the_job_after_the_attempt_limit(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)
    poison = (SAMPLES, 1)
    for attempt in range(MAX_ATTEMPTS):  # its worker dies each time; the reconciler requeues it
        claim(ctx, job_id, poison, extractor, worker=f"doomed-{attempt}")
        age_shard(ctx, job_id, poison)
        assert find_lost_work(ctx).shards == [(job_id, *poison)]
    assert (rows(ctx, job_id)[poison].state, rows(ctx, job_id)[poison].attempts) == (ShardState.PENDING, MAX_ATTEMPTS)

    with pytest.raises(JobError, match=f"started {MAX_ATTEMPTS} times") as exc:
        run(ctx, job_id, poison, extractor, lease_s=LEASE_S)
    assert rows(ctx, job_id)[poison].attempts == MAX_ATTEMPTS

    record_shard_failure(ctx, job_id, *poison, str(exc.value), final=True)

    job = records.get_job(ctx.sessions, job_id)
    assert job.state == JobState.FAILED
    assert job.error == f"shard samples/1 failed: {exc.value}"
    assert rows(ctx, job_id)[poison].state == ShardState.FAILED
    assert run(ctx, job_id, (SAMPLES, 0), extractor) is False  # the job is over: no more work on it


def test_a_failed_attempt_that_is_not_final_goes_back_to_pending(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)
    claim(ctx, job_id, (SAMPLES, 0), extractor, worker="flaky")

    record_shard_failure(ctx, job_id, SAMPLES, 0, "decode error", final=False)

    shard = rows(ctx, job_id)[(SAMPLES, 0)]
    assert (shard.state, shard.error) == (ShardState.PENDING, "decode error")
    assert records.get_job(ctx.sessions, job_id).state == JobState.RUNNING
    assert run(ctx, job_id, (SAMPLES, 0), extractor) is False
    assert rows(ctx, job_id)[(SAMPLES, 0)].state == ShardState.DONE


# -- leases and the reconciler ---------------------------------------------------------------------------------------


def test_an_expired_lease_is_requeued_and_a_live_one_is_not(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)
    dead, alive = (SAMPLES, 0), (SAMPLES, 1)
    claim(ctx, job_id, dead, extractor, worker="dead")
    age_shard(ctx, job_id, dead)
    claim(ctx, job_id, alive, extractor, worker="alive")

    lost = find_lost_work(ctx)

    assert lost == deadlines.LostWork(shards=[(job_id, *dead)], queued=[], reducing=[])
    assert rows(ctx, job_id)[dead].state == ShardState.PENDING
    assert (rows(ctx, job_id)[alive].state, rows(ctx, job_id)[alive].worker) == (ShardState.RUNNING, "alive")

    assert run(ctx, job_id, dead, extractor, lease_s=LEASE_S, worker="rescuer") is False
    shard = rows(ctx, job_id)[dead]
    assert (shard.state, shard.attempts, shard.worker) == (ShardState.DONE, 2, "rescuer")
    assert find_lost_work(ctx).shards == []


def test_a_worker_whose_lease_expired_cannot_finish_the_shard_it_lost(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)
    shard = (SAMPLES, 0)
    stale = claim(ctx, job_id, shard, extractor, worker="stalled")  # stalls past its lease (a long GC, a network cut)
    age_shard(ctx, job_id, shard)
    assert find_lost_work(ctx).shards == [(job_id, *shard)]
    assert run(ctx, job_id, shard, extractor, lease_s=LEASE_S, worker="rescuer") is False
    done = rows(ctx, job_id)[shard]

    assert records.finish_shard(ctx.sessions, stale, seconds=1.0) is records.Finish.LOST  # the stalled worker wakes up

    again = rows(ctx, job_id)[shard]
    assert (again.state, again.attempts, again.worker, again.seconds) == (ShardState.DONE, 2, "rescuer", done.seconds)


def test_a_stalled_worker_that_finishes_after_its_shard_was_redone_leaves_the_redone_files(
    tmp_path: Path, image_sets: tuple[str, str], extractor: FeatureExtractor, expected: dict[str, float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No beat before the stalled worker writes: a beat would tell it that it lost the shard (within the 2 s
    # of CANCEL_POLL_S); what is tested is the write that falls inside that window.
    monkeypatch.setattr(lease, "CANCEL_POLL_S", 3600.0)
    ctx = make_context(tmp_path, LocalPartials(FeatureStore(str(tmp_path / "spill"))))
    job_id = planned_job(ctx, image_sets, extractor)
    shard = (SAMPLES, 0)

    def meanwhile(_: int, seen: list[int] = []) -> None:  # noqa: B006 - once, during the stalled run's batch
        if not seen:
            seen.append(1)
            age_shard(ctx, job_id, shard)  # the stalled worker's lease runs out
            assert run(ctx, job_id, shard, extractor, lease_s=LEASE_S, worker="rescuer") is False
            assert run_all(ctx, job_id, extractor, ALL_SHARDS[1:])[-1] is True  # the job moves on to reducing

    assert run(ctx, job_id, shard, extractor, lease_s=LEASE_S, worker="stalled", on_batch=meanwhile,
               heartbeat_s=3600) is False

    assert records.get_job(ctx.sessions, job_id).state == JobState.REDUCING
    outcome = reduce_job(ctx, job_id)
    assert outcome.recompute == ()  # the stalled write replaced the shard's files; nothing deleted them
    assert_reproduces(outcome.result, {k: v for k, v in expected.items() if k in metrics_of(outcome.result)})


def test_a_shard_that_finishes_after_its_job_failed_is_refused_and_leaves_nothing(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)

    with pytest.raises(JobCancelled):  # another shard's final failure ends the job while this one runs
        run(ctx, job_id, (SAMPLES, 0), extractor, on_batch=lambda _: fail_job(ctx, job_id, "another shard failed"))

    assert rows(ctx, job_id)[(SAMPLES, 0)].state != ShardState.DONE
    assert stored_partials(ctx, job_id) == []


def test_a_shard_leased_live_elsewhere_is_left_to_its_worker(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)
    claim(ctx, job_id, (SAMPLES, 0), extractor, worker="elsewhere")

    assert run(ctx, job_id, (SAMPLES, 0), extractor, lease_s=LEASE_S, worker="here") is False

    shard = rows(ctx, job_id)[(SAMPLES, 0)]
    assert (shard.state, shard.attempts, shard.worker) == (ShardState.RUNNING, 1, "elsewhere")
    assert stored_partials(ctx, job_id) == []


def test_a_lost_broker_reports_pending_shards_and_queued_and_reducing_jobs(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    reducing = planned_job(ctx, image_sets, extractor)
    run_all(ctx, reducing, extractor)
    queued = new_job(ctx, image_sets, extractor.weights.sha256)
    running = planned_job(ctx, image_sets, extractor)
    claim(ctx, running, (SAMPLES, 0), extractor, worker="alive")  # live lease: still its worker's
    failed = planned_job(ctx, image_sets, extractor)
    fail_job(ctx, failed, "a failed job's pending shards are nobody's work")

    assert find_lost_work(ctx) == deadlines.LostWork([], [], [])
    lost = find_lost_work(ctx, broker_lost=True)

    assert sorted(lost.shards) == sorted((running, *key) for key in ALL_SHARDS[1:])
    assert lost.queued == [queued]
    assert lost.reducing == [reducing]


def test_a_planner_that_died_is_planned_again(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = new_job(ctx, image_sets, extractor.weights.sha256)
    assert records.start_planning(ctx.sessions, job_id)  # a planner took the job, then died before its plan
    assert find_lost_work(ctx) == deadlines.LostWork([], [], [])  # while its lease is live, it is left alone
    age_job(ctx, job_id, "heartbeat_at")

    assert find_lost_work(ctx) == deadlines.LostWork([], queued=[job_id], reducing=[])

    assert records.get_job(ctx.sessions, job_id).state == JobState.QUEUED
    assert plan_job(ctx, job_id, {INCEPTION: extractor.weights.sha256}).shards == ALL_SHARDS


def test_a_step_whose_message_was_lost_is_sent_again_once_its_deadline_passed(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    queued = new_job(ctx, image_sets, extractor.weights.sha256)
    running = planned_job(ctx, image_sets, extractor)
    reducing = planned_job(ctx, image_sets, extractor)
    run_all(ctx, reducing, extractor)
    age_job(ctx, queued, "enqueued_at")
    age_shard(ctx, running, (REFERENCE, 1), "enqueued_at")
    age_job(ctx, reducing, "enqueued_at")

    lost = find_lost_work(ctx)

    assert lost == deadlines.LostWork(shards=[(running, REFERENCE, 1)], queued=[queued], reducing=[reducing])
    assert find_lost_work(ctx) == deadlines.LostWork([], [], [])  # sent again just now: not twice per deadline


# -- weights -------------------------------------------------------------------------------------------------------


def test_planning_pins_the_job_to_the_planners_weights(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = new_job(ctx, image_sets, weights_sha256=None)

    plan_job(ctx, job_id, {INCEPTION: extractor.weights.sha256})

    assert records.get_job(ctx.sessions, job_id).weights_sha256 == extractor.weights.sha256


def test_a_job_pinned_to_other_weights_fails_planning(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = new_job(ctx, image_sets, weights_sha256="0" * 64)

    with pytest.raises(WeightsError, match="000000000000"):
        plan_job(ctx, job_id, {INCEPTION: extractor.weights.sha256})
    assert records.shards_of(ctx.sessions, job_id) == []
    assert records.get_job(ctx.sessions, job_id).weights_sha256 == "0" * 64


# -- the janitor ---------------------------------------------------------------------------------------------------


def test_the_janitor_removes_partials_of_jobs_that_ended_long_ago_and_keeps_live_ones(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    ended, live = planned_job(ctx, image_sets, extractor), planned_job(ctx, image_sets, extractor)
    run(ctx, live, ALL_SHARDS[0], extractor)
    ctx.partials.put(ended, *ALL_SHARDS[0], {INCEPTION: ctx.partials.get(live, *ALL_SHARDS[0], features=True)})
    cancel_job(ctx, ended)
    ctx.partials.put(ended, *ALL_SHARDS[0], {INCEPTION: ctx.partials.get(live, *ALL_SHARDS[0], features=True)})  # a leak
    assert sweep(ctx, retention_s=3600) == set()  # ended a moment ago: within the retention period
    age_job(ctx, ended, "finished_at")
    assert sweep(ctx, retention_s=3600) == {ended}
    assert stored_partials(ctx, ended) == [] and stored_partials(ctx, live) == [ALL_SHARDS[0]]


def test_the_janitor_removes_tar_listings_no_plan_has_rewritten_and_keeps_fresh_ones(
    ctx: Context, tmp_path: Path
) -> None:
    stale, fresh = index_key("a" * 64), index_key("b" * 64)
    for key in (stale, fresh):
        ctx.store.put_bytes(key, b"a listing")
    week_ago = time.time() - 8 * 24 * 3600
    os.utime(ctx.store.local_path(stale), (week_ago, week_ago))

    sweep(ctx, retention_s=3600, index_retention_s=7 * 24 * 3600)

    assert not ctx.store.exists(stale)
    assert ctx.store.exists(fresh)


def test_a_remote_store_tells_the_janitor_its_listings_ages(tmp_path: Path) -> None:
    store = FeatureStore(f"memory://listings-{tmp_path.name}")  # fsspec: ages from the store's own times
    store.put_bytes(index_key("c" * 64), b"a listing")
    assert store.modified_before("indexes", time.time() - 60) == []
    assert store.modified_before("indexes", time.time() + 60) == [index_key("c" * 64)]


# -- steps that an outage or a crash cut short ---------------------------------------------------------------------


def set_job_state(ctx: Context, job_id: str, state: JobState) -> None:
    with ctx.sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(state=state))


def test_a_job_whose_move_to_reducing_was_lost_is_moved_by_the_reconciler(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)
    run_all(ctx, job_id, extractor)
    set_job_state(ctx, job_id, JobState.RUNNING)  # every shard done, the last one's move to reducing lost

    assert find_lost_work(ctx) == deadlines.LostWork([], [], reducing=[job_id])
    assert records.get_job(ctx.sessions, job_id).state == JobState.REDUCING


def test_a_redelivered_last_shard_makes_the_move_to_reducing_that_was_lost(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)
    run_all(ctx, job_id, extractor)
    set_job_state(ctx, job_id, JobState.RUNNING)

    assert run(ctx, job_id, ALL_SHARDS[-1], extractor) is True  # its task retried after the outage
    assert records.get_job(ctx.sessions, job_id).state == JobState.REDUCING


def test_a_worker_takes_up_its_own_claim_again_without_counting_an_attempt(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)
    claim(ctx, job_id, (SAMPLES, 0), extractor, worker="w1")  # then an outage ended its task, which retries

    assert run(ctx, job_id, (SAMPLES, 0), extractor, lease_s=LEASE_S, worker="w1") is False

    shard = rows(ctx, job_id)[(SAMPLES, 0)]
    assert (shard.state, shard.attempts, shard.worker) == (ShardState.DONE, 1, "w1")


def test_the_heartbeat_of_a_lost_claim_tells_its_worker_to_stop(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)
    stale = claim(ctx, job_id, (SAMPLES, 0), extractor, worker="stalled")
    assert records.beat(ctx.sessions, stale) == JobState.RUNNING
    age_shard(ctx, job_id, (SAMPLES, 0))
    find_lost_work(ctx)
    claim(ctx, job_id, (SAMPLES, 0), extractor, worker="rescuer")

    assert records.beat(ctx.sessions, stale) is None
    assert rows(ctx, job_id)[(SAMPLES, 0)].worker == "rescuer"


def test_a_planner_that_keeps_dying_fails_the_job_after_the_attempt_limit(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = new_job(ctx, image_sets, extractor.weights.sha256)
    for _ in range(MAX_ATTEMPTS):
        assert records.start_planning(ctx.sessions, job_id)
        age_job(ctx, job_id, "heartbeat_at")
        assert find_lost_work(ctx).queued == [job_id]

    with pytest.raises(JobError, match=f"planning started {MAX_ATTEMPTS} times"):
        plan_job(ctx, job_id, {INCEPTION: extractor.weights.sha256})


def test_a_final_shard_failure_fails_its_job_in_the_same_step(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    job_id = planned_job(ctx, image_sets, extractor)

    records.record_shard_failure(ctx.sessions, job_id, SAMPLES, 1, "boom", final=True)

    job = records.get_job(ctx.sessions, job_id)
    assert (job.state, job.error) == (JobState.FAILED, "shard samples/1 failed: boom")


def test_the_janitor_leaves_alone_jobs_this_database_does_not_know(ctx: Context) -> None:
    stranger = FeatureStats.of(pool3_rows(4))
    ctx.partials.put("a-job-of-another-farm", SAMPLES, 0, {INCEPTION: stranger})

    assert sweep(ctx, retention_s=0) == set()
    assert ctx.partials.get("a-job-of-another-farm", SAMPLES, 0, features=False) is stranger


def pool3_rows(n: int) -> np.ndarray:
    return np.abs(np.random.RandomState(n).normal(0.3, 1.0, size=(n, 8)))


def test_a_plan_message_that_could_not_be_sent_is_sent_on_the_next_pass(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor
) -> None:
    waiting = new_job(ctx, image_sets, extractor.weights.sha256)  # sent a moment ago: on its way
    unsent = new_job(ctx, image_sets, extractor.weights.sha256)
    records.mark_unsent(ctx.sessions, unsent)  # the broker was down when it was submitted
    assert find_lost_work(ctx).queued == [unsent]
    assert find_lost_work(ctx).queued == []  # sent now: its deadline starts again
    assert records.get_job(ctx.sessions, waiting).state == JobState.QUEUED


# -- a tar is listed once, by the planner ----------------------------------------------------------------------------


def test_shards_of_a_tar_open_it_from_the_planner_s_index_and_give_the_folder_s_numbers(
    ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor, expected: dict[str, float],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    tars = []
    for folder in image_sets:  # the same files, in a tar
        tars.append(str(tmp_path / f"{Path(folder).name}.tar"))
        with tarfile.open(tars[-1], "w") as tar:
            for image in sorted(Path(folder).iterdir()):
                tar.add(image, arcname=image.name)
    job_id = planned_job(ctx, (tars[0], tars[1]), extractor, WITH_FID)
    plan = records.get_job(ctx.sessions, job_id).plan
    assert all(ctx.store.exists(index_key(plan.side(side).content_hash)) for side in (SAMPLES, REFERENCE))

    def no_listing(self, raw):  # what a worker is spared: reading every member's header again
        raise AssertionError("a shard listed the tar again")

    monkeypatch.setattr(TarSource, "_list_members", no_listing)
    steps._open_cached.cache_clear()  # a worker process that has not opened the tar yet
    run_all(ctx, job_id, extractor)
    assert_reproduces(reduce_job(ctx, job_id).result, expected)
