"""A side whose rows serve KID alone keeps only the rows KID draws, and KID is the same number.

Real steps (`plan_job`, `run_shard`, `reduce_job`) on SQLite, with the shards' files in a real feature store
and a seeded Inception. 20 samples and 10 reference images in shards of 5, in batches of 2 (so a batch's kept rows are found
at an offset), KID drawing 2 subsets of 3: most rows are not drawn, so a shard that kept them would be seen.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest

from evalfarm.config import EvalConfig
from evalfarm.db import session_factory
from evalfarm.errors import JobError
from evalfarm.keys import INCEPTION, JOB_EVAL, JOB_REFERENCE, KEY_KID_MEAN, KEY_KID_STD, VGG16
from evalfarm.metrics import kernel_inception_distance
from evalfarm.metrics.kid import drawn_rows
from evalfarm.models import FeatureExtractor, Weights
from evalfarm.models.weights import file_sha256
from evalfarm.pipeline import featurize_range
from evalfarm.scheduler import kid_rows, records
from evalfarm.scheduler.context import Context
from evalfarm.scheduler.job import EMBEDDED, JobSnapshot
from evalfarm.scheduler.partials import LocalPartials
from evalfarm.scheduler.plan import REFERENCE, SAMPLES
from evalfarm.scheduler.steps import plan_job, reduce_job, run_shard
from evalfarm.scheduler.store import FeatureStore
from evalfarm.sources import open_source

from .helpers import write_images

N_SAMPLES, N_REFERENCE, SHARD = 20, 10, 5
CONFIG = EvalConfig(metrics=("kid",), kid_subsets=2, kid_subset_size=3, shard_size=SHARD, batch_size=2, cache=False)


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("kid-rows-images")
    return (str(write_images(root / "samples", N_SAMPLES, 32, seed=21, brightness=1.0)),
            str(write_images(root / "reference", N_REFERENCE, 32, seed=22, brightness=0.6)))


@pytest.fixture(scope="module")
def extractor(weights_path: Path) -> FeatureExtractor:
    return FeatureExtractor(Weights(weights_path, file_sha256(weights_path)), "cpu")


def make_context(root: Path) -> Context:
    """SQLite, and a feature store under `root` that holds the shards' files (as the embedded runner's do)."""
    return Context(session_factory(f"sqlite:///{root}/jobs.sqlite"), FeatureStore(str(root / "store")),
                   LocalPartials(FeatureStore(str(root / "partials"))))


def planned(ctx: Context, image_sets: tuple[str, str], extractor: FeatureExtractor, config: EvalConfig = CONFIG,
            kind: str = JOB_EVAL) -> JobSnapshot:
    samples, reference = image_sets
    request = records.Submission(samples, reference if kind == JOB_EVAL else None, config, kind=kind,
                                 weights_sha256=extractor.weights.sha256)
    job_id = records.create_job(ctx.sessions, request, mode=EMBEDDED).job_id
    plan_job(ctx, job_id, {INCEPTION: extractor.weights.sha256})
    return records.get_job(ctx.sessions, job_id)


def run_shards(ctx: Context, job: JobSnapshot, extractor: FeatureExtractor) -> None:
    for side, n in ((SAMPLES, N_SAMPLES), (REFERENCE, N_REFERENCE)):
        for index in range(n // SHARD):
            run_shard(ctx, job.id, side, index, extractor, num_workers=0)


def rows_file(ctx: Context, job: JobSnapshot, side: str, index: int) -> np.ndarray:
    return np.load(ctx.partials.store.local_path(f"jobs/{job.id}/{side}/{index:06d}.features.npy"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, image_sets: tuple[str, str],
             extractor: FeatureExtractor) -> tuple[Context, JobSnapshot, dict[str, list[np.ndarray]]]:
    """A KID job run and reduced: the context, the job, and each side's shards' rows files as they were left for
    the reducer (a succeeded job's files are removed)."""
    ctx = make_context(tmp_path_factory.mktemp("kid-rows-job"))
    job = planned(ctx, image_sets, extractor)
    run_shards(ctx, job, extractor)
    files = {side: [rows_file(ctx, job, side, i) for i in range(n // SHARD)]
             for side, n in ((SAMPLES, N_SAMPLES), (REFERENCE, N_REFERENCE))}
    reduce_job(ctx, job.id)
    return ctx, records.get_job(ctx.sessions, job.id), files


def every_row(uri: str, extractor: FeatureExtractor, n: int) -> np.ndarray:
    """A side's rows featurized shard by shard and batch by batch as the job's shards did, all of them kept."""
    source = open_source(uri)
    return np.concatenate([featurize_range(source, a, a + SHARD, extractor, batch_size=2, num_workers=0).features
                           for a in range(0, n, SHARD)])


def test_each_shard_of_a_kid_only_side_stores_only_the_rows_kid_draws(finished) -> None:
    _, _, files = finished
    drawn = drawn_rows(N_SAMPLES, N_REFERENCE, subsets=2, subset_size=3, seed=CONFIG.seed)
    for side, rows in zip((SAMPLES, REFERENCE), drawn, strict=True):
        assert [len(f) for f in files[side]] == [np.sum((rows >= a) & (rows < a + SHARD)) for a in
                                                 range(0, SHARD * len(files[side]), SHARD)]
    assert len(drawn[0]) < N_SAMPLES and len(drawn[1]) < N_REFERENCE  # so that a shard keeping more is seen


def test_kid_from_the_kept_rows_equals_kid_from_every_row(finished, image_sets, extractor) -> None:
    _, job, files = finished
    assert job.state.value == "succeeded", job.error
    samples, reference = (every_row(u, extractor, n) for u, n in zip(image_sets, (N_SAMPLES, N_REFERENCE), strict=True))
    drawn = drawn_rows(N_SAMPLES, N_REFERENCE, subsets=2, subset_size=3, seed=CONFIG.seed)
    for side, every, rows in ((SAMPLES, samples, drawn[0]), (REFERENCE, reference, drawn[1])):
        assert np.concatenate(files[side]).tobytes() == every[rows].tobytes()
    mean, std = kernel_inception_distance(samples, reference, subsets=2, subset_size=3, seed=CONFIG.seed)
    assert (job.result[KEY_KID_MEAN], job.result[KEY_KID_STD]) == (mean, std)


@pytest.mark.parametrize(("side", "config", "kind", "kid_only"), [
    (SAMPLES, CONFIG, JOB_EVAL, True),
    (REFERENCE, CONFIG, JOB_EVAL, True),
    (REFERENCE, dataclasses.replace(CONFIG, cache=True), JOB_EVAL, False),  # the cached reference keeps them all
    (SAMPLES, dataclasses.replace(CONFIG, cache=True), JOB_EVAL, True),
    (SAMPLES, dataclasses.replace(CONFIG, metrics=("kid", "prc"), extractors=(INCEPTION,)), JOB_EVAL, False),
    (SAMPLES, dataclasses.replace(CONFIG, metrics=("fid",)), JOB_EVAL, False),  # no rows at all
    (SAMPLES, dataclasses.replace(CONFIG, metrics=()), JOB_REFERENCE, False),  # a reference job keeps them all
])
def test_only_rows_that_serve_kid_alone_are_thinned(finished, side, config, kind, kid_only) -> None:
    _, job, _ = finished
    job = dataclasses.replace(job, config=config, kind=kind)
    assert kid_rows.kid_only(job, side, INCEPTION) is kid_only


def test_kid_on_one_extractor_and_precision_recall_on_another_thin_only_kids(finished) -> None:
    _, job, _ = finished
    job = dataclasses.replace(job, config=dataclasses.replace(CONFIG, metrics=("kid", "prc")))  # torch-fidelity's
    assert kid_rows.kid_only(job, SAMPLES, INCEPTION) and not kid_rows.kid_only(job, SAMPLES, VGG16)


def test_a_shrunk_kid_subset_is_the_subset_the_shards_keep_rows_for(finished) -> None:
    _, job, _ = finished
    job = dataclasses.replace(job, config=dataclasses.replace(CONFIG, kid_subset_size=1000, kid_shrink=True))
    assert kid_rows.draw_of(job) == kid_rows.Draw(N_SAMPLES, N_REFERENCE, 2, N_REFERENCE, CONFIG.seed)


@pytest.fixture
def fresh_process():
    """A process that has kept no draw yet (and leaves none to the next test)."""
    kid_rows._cached.clear()
    yield
    kid_rows._cached.clear()


def draw_again_is_an_error(*args, **kwargs):
    raise AssertionError("the draw was computed again")


def test_the_draw_is_stored_once_and_read_by_the_next_process(finished, fresh_process, monkeypatch) -> None:
    ctx, job, _ = finished
    draw = kid_rows.draw_of(job)
    assert ctx.store.exists(draw.key)
    monkeypatch.setattr(kid_rows, "drawn_rows", draw_again_is_an_error)
    got = kid_rows.side_rows(ctx.store, draw)
    want = drawn_rows(N_SAMPLES, N_REFERENCE, subsets=2, subset_size=3, seed=CONFIG.seed)
    assert [g.tolist() for g in got] == [w.tolist() for w in want]


@pytest.mark.parametrize("damage", ["garbage", "other draw"])
def test_a_stored_draw_that_is_damaged_or_another_ones_is_drawn_again_and_replaced(
        tmp_path, fresh_process, monkeypatch, damage) -> None:
    store = FeatureStore(str(tmp_path))
    draw, other = kid_rows.Draw(N_SAMPLES, N_REFERENCE, 2, 3, 7), kid_rows.Draw(N_SAMPLES, N_REFERENCE, 2, 3, 8)
    if damage == "garbage":
        store.put_bytes(draw.key, b"PK\x03\x04 not a zip")
    else:
        kid_rows.side_rows(store, other)
        store.put_bytes(draw.key, store.get_bytes(other.key))  # a whole file, of another draw's parameters
    kid_rows._cached.clear()
    want = [w.tolist() for w in drawn_rows(N_SAMPLES, N_REFERENCE, subsets=2, subset_size=3, seed=7)]
    assert [g.tolist() for g in kid_rows.side_rows(store, draw)] == want
    kid_rows._cached.clear()
    monkeypatch.setattr(kid_rows, "drawn_rows", draw_again_is_an_error)
    assert [g.tolist() for g in kid_rows.side_rows(store, draw)] == want  # the file was replaced


def test_a_store_that_refuses_writes_costs_one_draw_per_process(tmp_path, fresh_process, monkeypatch) -> None:
    store = FeatureStore(str(tmp_path))

    def refuse(key: str, data: bytes) -> None:
        raise PermissionError(f"read-only: {key}")

    monkeypatch.setattr(store, "put_bytes", refuse)
    draw = kid_rows.Draw(N_SAMPLES, N_REFERENCE, 2, 3, 7)
    first = kid_rows.side_rows(store, draw)
    monkeypatch.setattr(kid_rows, "drawn_rows", draw_again_is_an_error)
    assert kid_rows.side_rows(store, draw) is first


def test_a_process_reads_a_stored_draw_again_once_it_was_replaced(tmp_path, fresh_process) -> None:
    store = FeatureStore(str(tmp_path))
    draw = kid_rows.Draw(N_SAMPLES, N_REFERENCE, 2, 3, 7)
    kid_rows.side_rows(store, draw)
    kid_rows._cached.clear()
    read = kid_rows.side_rows(store, draw)  # this process read it: kept while the file is the same
    assert kid_rows.side_rows(store, draw) is read
    store.put_bytes(draw.key, store.get_bytes(draw.key))  # written again (by another process)
    assert kid_rows.side_rows(store, draw) is not read


def forge(store: FeatureStore, draw: kid_rows.Draw) -> None:
    """A whole, valid-looking stored draw of other rows (the first ones), as no evalfarm process writes."""
    rows = [np.arange(len(r), dtype=np.int64) for r in drawn_rows(N_SAMPLES, N_REFERENCE, subsets=2, subset_size=3,
                                                                  seed=draw.seed)]
    buf = io.BytesIO()
    np.savez(buf, samples=rows[0], reference=rows[1], draw=np.array(dataclasses.astuple(draw), np.int64))
    store.put_bytes(draw.key, buf.getvalue())


def test_shards_that_kept_a_wrong_stored_draws_rows_run_again_and_the_job_gets_kid_right(
        tmp_path, image_sets, extractor, fresh_process, finished) -> None:
    ctx = make_context(tmp_path)
    job = planned(ctx, image_sets, extractor)
    forge(ctx.store, kid_rows.draw_of(job))
    run_shards(ctx, job, extractor)
    again = reduce_job(ctx, job.id).recompute
    assert sorted(again) == sorted((side, i) for side, n in ((SAMPLES, N_SAMPLES), (REFERENCE, N_REFERENCE))
                                   for i in range(n // SHARD))
    run_shards(ctx, job, extractor)
    result = reduce_job(ctx, job.id).result
    _, first, _ = finished  # the same job, run undisturbed
    assert (result[KEY_KID_MEAN], result[KEY_KID_STD]) == (first.result[KEY_KID_MEAN], first.result[KEY_KID_STD])


def test_rows_missing_although_the_stored_draw_is_right_fail_the_job_as_a_fault(
        tmp_path, image_sets, extractor, fresh_process, monkeypatch) -> None:
    ctx = make_context(tmp_path)
    job = planned(ctx, image_sets, extractor)
    kid_rows.side_rows(ctx.store, kid_rows.draw_of(job))  # the right draw, stored
    real = kid_rows.shard_rows
    monkeypatch.setattr(kid_rows, "shard_rows", lambda *a: real(*a)[1:])  # a shard that drops a drawn row
    run_shards(ctx, job, extractor)
    with pytest.raises(JobError, match="was not kept.*is this job's: an evalfarm fault"):
        reduce_job(ctx, job.id)
