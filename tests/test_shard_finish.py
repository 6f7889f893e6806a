"""A shard's finish: the shard is done and, after a job's last shard, the job is reducing, in one transaction;
when a job's last shards finish at the same moment, exactly one of them moves the job on; a job that ended
gets no shard done.

Real Postgres (the test database) with concurrent sessions from threads, where the race is between
transactions (each finishing transaction counting the others' shards as still running); the sequential
cases also on SQLite, the embedded runner's database.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from evalfarm.config import EvalConfig
from evalfarm.db import JobState, ShardState, session_factory
from evalfarm.keys import INCEPTION, JOB_EVAL
from evalfarm.scheduler import records
from evalfarm.scheduler.context import Context
from evalfarm.scheduler.job import FARM
from evalfarm.scheduler.partials import LocalPartials
from evalfarm.scheduler.steps import MAX_ATTEMPTS, plan_job
from evalfarm.scheduler.store import FeatureStore

from .farm import DATABASE_URL, require_services
from .helpers import write_images

SHARDS = 6
CONFIG = EvalConfig(metrics=("is",), splits=2, shard_size=1, batch_size=1, cache=False)
WEIGHTS = "ab" * 32  #: the weights' digest as the workers report it (nothing is featurized here)


def make_context(root: Path, database: str) -> Context:
    url = DATABASE_URL if database == "postgres" else f"sqlite:///{root}/jobs.sqlite"
    return Context(session_factory(url), FeatureStore(str(root / "store")), LocalPartials())


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Context:
    """Postgres: the farm's database, where finishes race."""
    require_services()
    return make_context(tmp_path_factory.mktemp("finish"), "postgres")


@pytest.fixture(params=["postgres", "sqlite"])
def any_ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Context:
    """The farm's database, and the embedded runner's."""
    if request.param == "postgres":
        require_services()
    return make_context(tmp_path, request.param)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_images(tmp_path_factory.mktemp("finish-images") / "samples", SHARDS, 16, seed=3, brightness=1.0))


def claimed_job(ctx: Context, samples: str) -> list[records.ShardClaim]:
    """A planned job whose shards are all running, each under a worker of its own."""
    request = records.Submission(samples, None, CONFIG, kind=JOB_EVAL, weights_sha256=None)
    job_id = records.create_job(ctx.sessions, request, mode=FARM).job_id
    assert len(plan_job(ctx, job_id, {INCEPTION: WEIGHTS}).shards) == SHARDS
    return [records.claim_shard(ctx.sessions, job_id, "samples", i, worker=f"w{i}", weights={INCEPTION: WEIGHTS},
                                lease_s=None, max_attempts=MAX_ATTEMPTS) for i in range(SHARDS)]


def test_only_the_last_shard_moves_the_job_to_reducing(any_ctx: Context, samples: str) -> None:
    claims = claimed_job(any_ctx, samples)

    outcomes = [records.finish_shard(any_ctx.sessions, c, seconds=0.1) for c in claims]

    assert outcomes == [records.Finish.DONE] * (SHARDS - 1) + [records.Finish.LAST]
    assert records.job_state(any_ctx.sessions, claims[0].job.id) == JobState.REDUCING


def test_shards_finishing_at_once_move_the_job_to_reducing_exactly_once(ctx: Context, samples: str) -> None:
    for _ in range(8):  # each round a fresh job whose shards all finish together
        claims = claimed_job(ctx, samples)
        start = threading.Barrier(SHARDS)

        def finish(claim: records.ShardClaim, start: threading.Barrier = start) -> records.Finish:
            start.wait()
            return records.finish_shard(ctx.sessions, claim, seconds=0.1)

        with ThreadPoolExecutor(SHARDS) as pool:
            outcomes = list(pool.map(finish, claims))

        job_id = claims[0].job.id
        assert outcomes.count(records.Finish.LAST) == 1, outcomes
        assert outcomes.count(records.Finish.DONE) == SHARDS - 1, outcomes
        assert records.job_state(ctx.sessions, job_id) == JobState.REDUCING
        assert {sh.state for sh in records.shards_of(ctx.sessions, job_id)} == {ShardState.DONE}


def test_a_shard_of_a_cancelled_job_does_not_finish(any_ctx: Context, samples: str) -> None:
    claims = claimed_job(any_ctx, samples)
    records.cancel_job(any_ctx.sessions, claims[0].job.id)

    assert records.finish_shard(any_ctx.sessions, claims[0], seconds=0.1) is records.Finish.LOST
    assert records.job_state(any_ctx.sessions, claims[0].job.id) == JobState.CANCELLED


def test_a_shard_of_a_failed_job_stays_running_and_does_not_finish(any_ctx: Context, samples: str) -> None:
    claims = claimed_job(any_ctx, samples)
    job_id = claims[0].job.id
    records.fail_job(any_ctx.sessions, job_id, "another shard failed for good")  # leaves this shard running

    assert records.finish_shard(any_ctx.sessions, claims[0], seconds=0.1) is records.Finish.LOST
    assert {sh.state for sh in records.shards_of(any_ctx.sessions, job_id)} == {ShardState.RUNNING}
    assert records.job_state(any_ctx.sessions, job_id) == JobState.FAILED
