"""A shard's finish on Postgres: the shard is done and, after a job's last shard, the job is reducing, in one
transaction; when a job's last shards finish at the same moment, exactly one of them moves the job on.

Real Postgres (the test database), real concurrent sessions from threads: the race is between transactions,
which is where it would be lost (each finishing transaction counting the others' shards as still running).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

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


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Context:
    require_services()
    root = tmp_path_factory.mktemp("finish")
    return Context(session_factory(DATABASE_URL), FeatureStore(str(root / "store")), LocalPartials())


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


def test_only_the_last_shard_moves_the_job_to_reducing(ctx: Context, samples: str) -> None:
    claims = claimed_job(ctx, samples)

    outcomes = [records.finish_shard(ctx.sessions, c, seconds=0.1) for c in claims]

    assert outcomes == [records.Finish.DONE] * (SHARDS - 1) + [records.Finish.LAST]
    assert records.job_state(ctx.sessions, claims[0].job.id) == JobState.REDUCING


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
        assert records.job_state(ctx.sessions, job_id) == JobState.REDUCING
        assert {sh.state for sh in records.shards_of(ctx.sessions, job_id)} == {ShardState.DONE}


def test_a_shard_of_a_cancelled_job_does_not_finish(ctx: Context, samples: str) -> None:
    claims = claimed_job(ctx, samples)
    records.cancel_job(ctx.sessions, claims[0].job.id)

    assert records.finish_shard(ctx.sessions, claims[0], seconds=0.1) is records.Finish.LOST
    assert records.job_state(ctx.sessions, claims[0].job.id) == JobState.CANCELLED
