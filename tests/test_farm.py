"""The farm against real Redis, Postgres and worker processes: same numbers as `evalfarm eval`, and
no wrong number under duplicate delivery, worker loss, a flushed broker or cancellation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

import evalfarm
from evalfarm import keys
from evalfarm.config import EvalConfig
from evalfarm.db import Job, Shard
from evalfarm.workers.registry import held_weights

from .farm import DATABASE_URL, FAST_LEASES, REDIS_URL, Worker, farm_env, require_services, reset_services
from .helpers import in_home, wait_until, write_images

pytestmark = pytest.mark.farm

N_FARM_SAMPLES, N_FARM_REF = 24, 16
CONFIG = dict(kid_subset_size=10, kid_subsets=10, splits=4)


@pytest.fixture(scope="module")
def farm_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("farm-data")
    return (
        write_images(root / "samples", N_FARM_SAMPLES, 32, seed=11, brightness=1.0),
        write_images(root / "reference", N_FARM_REF, 32, seed=12, brightness=0.6),
    )


@pytest.fixture(scope="module")
def embedded_result(farm_data, weights_path, tmp_path_factory) -> dict:
    """The embedded run every farm result must equal (one shard per side)."""
    home = tmp_path_factory.mktemp("embedded-home")
    with in_home(home):
        return evalfarm.evaluate(
            str(farm_data[0]), str(farm_data[1]), weights=str(weights_path), device="cpu", shard_size=1000,
            cache=False, **CONFIG,
        )


@pytest.fixture
def farm(tmp_path: Path, weights_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Clean services, farm settings in this process, and a factory of real worker processes."""
    require_services()
    reset_services()
    env = farm_env(tmp_path, DATABASE_URL, REDIS_URL, weights_path)
    for k in ("EVALFARM_DATABASE_URL", "EVALFARM_REDIS_URL", "EVALFARM_STORE", "EVALFARM_WEIGHTS", *FAST_LEASES):
        monkeypatch.setenv(k, env[k])
    workers: list[Worker] = []

    def start(queues: str = "gpu,cpu", extra_env: dict[str, str] | None = None) -> Worker:
        w = Worker({**env, **(extra_env or {})}, tmp_path / f"worker-{len(workers)}.log", queues)
        workers.append(w)
        return w.wait_ready()

    yield start, env
    for w in workers:
        w.stop()
    redis.Redis.from_url(REDIS_URL).flushdb()


def client():
    from evalfarm.farm import Farm

    return Farm()


def assert_same_numbers(result: dict, expected: dict, rel: float = 1e-6) -> None:
    for key in keys.METRIC_KEYS:
        assert result[key] == pytest.approx(expected[key], rel=rel, abs=1e-12), key


def shards_of(job_id: str) -> list[Shard]:
    with client().ctx.sessions() as s:
        return list(s.scalars(select(Shard).where(Shard.job_id == job_id).order_by(Shard.side, Shard.index)))


def submit(farm_data, **overrides) -> str:
    return client().submit(str(farm_data[0]), str(farm_data[1]), EvalConfig(cache=False, **{**CONFIG, **overrides}))


def test_submit_and_wait_from_the_cli_equal_the_embedded_run(farm, farm_data, embedded_result, tmp_path):
    start, env = farm
    start()
    cli = [sys.executable, "-m", "evalfarm.cli"]
    out = subprocess.run(
        [*cli, "submit", str(farm_data[0]), "--ref", str(farm_data[1]), "--shard-size", "7", "--no-cache",
         "--kid-subset-size", "10", "--kid-subsets", "10", "--splits", "4", "--run", "cli-run", "--step", "5"],
        env=env, capture_output=True, text=True, check=True,
    )
    job_id = out.stdout.strip().splitlines()[-1]
    done = subprocess.run([*cli, "wait", job_id, "--json", str(tmp_path / "out.json"), "--timeout", "300"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert_same_numbers(result, embedded_result)
    assert (result["n_samples"], result["n_reference"]) == (N_FARM_SAMPLES, N_FARM_REF)
    listed = subprocess.run([*cli, "results", "--run", "cli-run", "--format", "json"], env=env,
                            capture_output=True, text=True, check=True)
    assert [r["job_id"] for r in json.loads(listed.stdout)] == [job_id]


def test_two_workers_give_the_same_numbers(farm, farm_data, embedded_result):
    start, _ = farm
    start()
    start()
    job_id = submit(farm_data, shard_size=5)
    result = client().wait(job_id, timeout=300)
    assert_same_numbers(result, embedded_result)
    assert len({sh.worker for sh in shards_of(job_id)}) == 2, "both workers should have taken shards"


def test_duplicate_delivery_of_a_shard_is_counted_once(farm, farm_data, embedded_result):
    start, _ = farm
    from evalfarm.workers.tasks import featurize_shard

    job_id = submit(farm_data, shard_size=8)
    start()
    wait_until(lambda: len(shards_of(job_id)) > 0, 60, "planning")
    for sh in shards_of(job_id):  # every shard task delivered a second time
        featurize_shard.delay(job_id, sh.side, sh.index)
    result = client().wait(job_id, timeout=300)
    assert_same_numbers(result, embedded_result)
    with client().ctx.sessions() as s:
        assert s.get(Job, job_id).state == "succeeded"
        assert len(s.get(Job, job_id).results) == len(keys.METRIC_KEYS)


def test_worker_killed_mid_shard_is_replaced_and_the_job_succeeds(farm, farm_data, embedded_result):
    start, _ = farm
    first = start()
    job_id = submit(farm_data, shard_size=100, batch_size=4)  # one long shard per side, many batches
    wait_until(
        lambda: any(sh.state == "running" and sh.heartbeat_at and sh.heartbeat_at > sh.started_at
                    for sh in shards_of(job_id)),
        120, "a shard to be running and heart-beating",
    )
    killed = next(sh for sh in shards_of(job_id) if sh.state == "running")
    first.kill()
    t_kill = time.monotonic()
    start()
    result = client().wait(job_id, timeout=300)
    assert_same_numbers(result, embedded_result)
    after = {(sh.side, sh.index): sh for sh in shards_of(job_id)}[(killed.side, killed.index)]
    assert after.attempts == 2
    assert time.monotonic() - t_kill < 240


def test_partials_lost_in_a_redis_flush_are_recomputed_not_guessed(farm, farm_data, embedded_result):
    start, _ = farm
    start()
    job_id = submit(farm_data, shard_size=4)
    wait_until(lambda: sum(sh.state == "done" for sh in shards_of(job_id)) >= 3, 180, "three finished shards")
    redis.Redis.from_url(REDIS_URL).flushdb()  # partials, queued messages and all
    result = client().wait(job_id, timeout=300)
    assert_same_numbers(result, embedded_result)


def test_cancel_stops_a_running_job(farm, farm_data, tmp_path):
    start, env = farm
    start()
    job_id = submit(farm_data, shard_size=2, batch_size=2)
    wait_until(lambda: any(sh.state == "done" for sh in shards_of(job_id)), 120, "a finished shard")
    out = subprocess.run([sys.executable, "-m", "evalfarm.cli", "cancel", job_id], env=env, capture_output=True,
                         text=True, check=True)
    assert "cancelled" in out.stdout
    time.sleep(6)  # a running shard notices at its next batch
    done_then = sum(sh.state == "done" for sh in shards_of(job_id))
    time.sleep(4)
    assert sum(sh.state == "done" for sh in shards_of(job_id)) == done_then
    assert not any(sh.state == "running" for sh in shards_of(job_id))
    waited = subprocess.run([sys.executable, "-m", "evalfarm.cli", "wait", job_id], env=env, capture_output=True,
                            text=True)
    assert waited.returncode == 1 and "cancelled" in waited.stderr


def test_a_corrupt_image_fails_the_job_with_the_file_name(farm, farm_data, tmp_path):
    start, env = farm
    bad = write_images(tmp_path / "bad", 6, 32, seed=3, brightness=1.0)
    (bad / "0003.png").write_bytes((bad / "0003.png").read_bytes()[:60])
    start()
    job_id = client().submit(str(bad), None, EvalConfig(metrics=("is",), splits=2))
    with pytest.raises(evalfarm.JobError, match="0003.png"):
        client().wait(job_id, timeout=120)
    status = subprocess.run([sys.executable, "-m", "evalfarm.cli", "status", job_id], env=env, capture_output=True,
                            text=True, check=True)
    assert "failed" in status.stdout and "0003.png" in status.stdout


def test_a_worker_with_other_weights_refuses_the_shards(farm, farm_data, other_weights_path):
    start, _ = farm
    start(queues="cpu")  # plans, and so pins the job to the farm's weights
    start(queues="gpu", extra_env={"EVALFARM_WEIGHTS": str(other_weights_path)})
    job_id = client().submit(str(farm_data[0]), None, EvalConfig(metrics=("is",), splits=2))
    with pytest.raises(evalfarm.JobError, match="weights"):
        client().wait(job_id, timeout=120)


def test_a_job_that_requires_other_weights_is_refused_at_submit_once_a_worker_announced_its_own(farm, farm_data):
    start, _ = farm
    start(queues="cpu")
    wait_until(lambda: held_weights(client().ctx.partials.redis), 60, "the worker to announce its weights")
    before = len(client().jobs(limit=1000))
    with pytest.raises(evalfarm.errors.Conflict, match="no worker of this farm holds Inception weights"):
        client().submit(str(farm_data[0]), None, EvalConfig(metrics=("is",), splits=2), weights_sha256="0" * 64)
    assert len(client().jobs(limit=1000)) == before


def test_a_job_that_requires_other_weights_fails_at_planning(farm, farm_data):
    start, _ = farm
    # Submitted while no worker has announced its weights (a farm scaling up from zero): accepted, then
    # refused by the first planner, which holds other weights.
    job_id = client().submit(str(farm_data[0]), None, EvalConfig(metrics=("is",), splits=2), weights_sha256="0" * 64)
    start(queues="cpu")
    with pytest.raises(evalfarm.JobError, match=r"asks for Inception weights with sha256 000000000000"):
        client().wait(job_id, timeout=120)
    assert shards_of(job_id) == []  # refused before any shard was planned


def test_a_job_with_two_extractors_equals_the_embedded_run(farm, farm_data, extractor_weights, weights_path,
                                                          tmp_path_factory):
    """Each shard is featurized by both networks from one decode; every value equals the embedded run's."""
    start, _ = farm
    dino = str(extractor_weights("dinov2-vit-s-14"))
    start(extra_env={"EVALFARM_WEIGHTS_DINOV2_VIT_S_14": dino})
    settings = dict(metrics=("is", "fid", "kid", "prc"), extractors=(keys.INCEPTION, "dinov2-vit-s-14"))
    job_id = submit(farm_data, shard_size=7, **settings)
    result = client().wait(job_id, timeout=600)
    with in_home(tmp_path_factory.mktemp("embedded-two-extractors")):
        expected = evalfarm.evaluate(str(farm_data[0]), str(farm_data[1]), weights=str(weights_path),
                                     extractor_weights={"dinov2-vit-s-14": dino}, device="cpu", shard_size=1000,
                                     cache=False, **CONFIG, **settings)
    assert result["metric_keys"] == expected["metric_keys"] and len(result["metric_keys"]) == 14
    for name in expected["metric_keys"]:
        assert result[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-12), name
    assert result["extractors"]["dinov2-vit-s-14"]["weights_sha256"] == \
        expected["extractors"]["dinov2-vit-s-14"]["weights_sha256"]
