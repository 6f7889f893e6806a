"""Each bad input ends in a clear evalfarm error that says what to do, never in a number.

Wherever the input can be judged before featurization, the tests also forbid building the feature extractor
(`no_featurizing`): those jobs must fail while planning. Sets are a handful of images; only the jobs that have
to run the network (a corrupt file found while decoding, NaN weights, `--kid-shrink`, a named reference made
with other weights) featurize, 25 images in all.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

import evalfarm
from evalfarm import (
    KEY_KID_MEAN,
    EvalConfig,
    InvalidField,
    MetricInputError,
    ReferenceMismatchError,
    SourceError,
)
from evalfarm.db import Job, Result, session_factory
from evalfarm.keys import JOB_REFERENCE
from evalfarm.models.weights import file_sha256
from evalfarm.scheduler import embedded
from evalfarm.scheduler.embedded import run_embedded
from evalfarm.settings import get_settings

from .helpers import POOL3_DIM, evaluate_in_home, run_cli, write_images

# -- helpers ------------------------------------------------------------------------------------------------------


def assert_clean_cli_error(proc: subprocess.CompletedProcess) -> str:
    """Exit status 1 and one `error: ...` message on stderr, without a Python traceback; returns the message."""
    assert proc.returncode == 1, f"exit status {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc.stderr


def jobs() -> list[Job]:
    with session_factory(get_settings().db_url)() as s:
        return list(s.scalars(select(Job).order_by(Job.created_at)))


def only_job() -> Job:
    recorded = jobs()
    assert len(recorded) == 1, [j.id for j in recorded]
    return recorded[0]


def result_rows(job_id: str) -> list[Result]:
    with session_factory(get_settings().db_url)() as s:
        return list(s.scalars(select(Result).where(Result.job_id == job_id)))


def write_stats_file(path: Path, dim: int = POOL3_DIM, **metadata: np.ndarray) -> Path:
    """pytorch-fid's `mu`/`sigma` format, optionally with evalfarm's metadata keys."""
    features = np.random.RandomState(0).randn(16, dim)
    np.savez(path, mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False), **metadata)
    return path


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    return write_images(tmp_path / "samples", 4, 32, seed=51, brightness=1.0)


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    return write_images(tmp_path / "reference", 3, 32, seed=52, brightness=0.7)


@pytest.fixture
def no_featurizing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the network means planning accepted the job: these inputs must be refused before that."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the job reached featurization; the input should have been refused while planning")

    monkeypatch.setattr(embedded, "build_featurizer", forbidden)


# -- corrupt and empty sample sets (through the CLI) -------------------------------------------------------------


@pytest.fixture
def folder_with_truncated_png(tmp_path: Path) -> tuple[Path, Path]:
    folder = write_images(tmp_path / "samples", 3, 32, seed=53, brightness=1.0)
    bad = folder / "0001.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return folder, bad


def test_truncated_png_is_a_cli_error_naming_the_file(folder_with_truncated_png: tuple, weights_path: Path) -> None:
    folder, bad = folder_with_truncated_png
    proc = run_cli("eval", folder, "--metrics", "is", "--splits", "2", "--weights", weights_path, "--quiet")
    message = assert_clean_cli_error(proc)
    assert str(bad) in message
    assert proc.stdout.strip() == ""  # no table, no number


def test_truncated_png_fails_the_job_with_that_message(folder_with_truncated_png: tuple, weights_path: Path) -> None:
    folder, bad = folder_with_truncated_png
    with pytest.raises(SourceError, match=re.escape(str(bad))):
        evalfarm.evaluate(str(folder), None, weights=str(weights_path), metrics=("is",), splits=2)
    job = only_job()
    assert job.state == "failed"
    assert str(bad) in job.error
    assert job.result is None
    assert result_rows(job.id) == []


def test_empty_folder_is_a_cli_error_saying_no_images(tmp_path: Path, weights_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("eval", empty, "--metrics", "is", "--weights", weights_path, "--quiet")
    message = assert_clean_cli_error(proc)
    assert str(empty) in message
    assert "no images" in message
    job = only_job()
    assert job.state == "failed" and "no images" in job.error


# -- sizes that cannot give the metric ----------------------------------------------------------------------------


def test_kid_subset_larger_than_the_sets_is_refused_with_the_counts(
    samples: Path, reference: Path, weights_path: Path, no_featurizing: None
) -> None:
    with pytest.raises(MetricInputError, match=r"KID subset size 10 is larger .*samples: 4, reference: 3"):
        evalfarm.evaluate(str(samples), str(reference), weights=str(weights_path), metrics=("kid",), kid_subset_size=10)
    job = only_job()
    assert job.state == "failed"
    assert "samples: 4, reference: 3" in job.error
    assert [sh for sh in job.shards if sh.state == "done"] == []


def test_fewer_samples_than_is_splits_is_refused_with_the_counts(
    samples: Path, weights_path: Path, no_featurizing: None
) -> None:
    with pytest.raises(MetricInputError, match=r"10 splits needs at least 10 samples; .* has 4\. Pass --splits 4"):
        evalfarm.evaluate(str(samples), None, weights=str(weights_path), metrics=("is",), splits=10)
    assert only_job().state == "failed"


# -- --kid-shrink -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shrunk_and_explicit(tmp_path_factory: pytest.TempPathFactory, weights_path: Path) -> tuple[dict, dict]:
    """KID with subset size 10 and kid_shrink on 4 vs 3 images, then with subset size 3 given explicitly.

    One home for both: the second run takes the reference from the first one's cache (11 images in all).
    """
    root = tmp_path_factory.mktemp("kid-shrink")
    samples = str(write_images(root / "samples", 4, 32, seed=51, brightness=1.0))
    reference = str(write_images(root / "reference", 3, 32, seed=52, brightness=0.7))
    kwargs = dict(weights=str(weights_path), metrics=("kid",), kid_subsets=4)
    shrunk = evaluate_in_home(root / "home", samples, reference, kid_subset_size=10, kid_shrink=True, **kwargs)
    explicit = evaluate_in_home(root / "home", samples, reference, kid_subset_size=3, **kwargs)
    return shrunk, explicit


def test_kid_shrink_uses_the_smaller_sets_size(shrunk_and_explicit: tuple[dict, dict]) -> None:
    shrunk, explicit = shrunk_and_explicit
    assert np.isfinite(shrunk[KEY_KID_MEAN])
    assert shrunk["settings"]["kid_shrink"] is True
    assert shrunk["settings"]["kid_subset_size"] == 10  # what was asked for
    # min(10, 4 samples, 3 reference) == 3: the same draws as asking for 3
    assert shrunk[KEY_KID_MEAN] == explicit[KEY_KID_MEAN]


def test_kid_shrink_records_the_subset_size_it_used(shrunk_and_explicit: tuple[dict, dict]) -> None:
    shrunk, _ = shrunk_and_explicit
    assert shrunk["kid_subset_size_used"] == 3
    assert shrunk["settings"]["kid_subset_size"] == 10  # what was asked for stays recorded too


# -- non-finite features ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_weights_path(weights_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    state["Mixed_7c.branch_pool.bn.running_var"][:] = float("nan")
    path = tmp_path_factory.mktemp("nan-weights") / "nan-inception.pth"
    torch.save(state, path)
    return path


def test_non_finite_features_are_refused_naming_a_sample(samples: Path, nan_weights_path: Path) -> None:
    first = samples / "0000.png"
    with pytest.raises(MetricInputError, match=rf"non-finite .*{re.escape(str(first))}"):
        evalfarm.evaluate(str(samples), None, weights=str(nan_weights_path), metrics=("is",), splits=2)
    job = only_job()
    assert job.state == "failed"
    assert job.result is None
    assert result_rows(job.id) == []


# -- references that do not fit the job ---------------------------------------------------------------------------


def test_stats_file_of_other_weights_is_refused(
    samples: Path, tmp_path: Path, weights_path: Path, no_featurizing: None
) -> None:
    stats = write_stats_file(tmp_path / "stats.npz", weights_sha256=np.str_("0" * 64), resize=np.str_("tf"))
    with pytest.raises(ReferenceMismatchError, match=r"other weights \(sha256 000000000000"):
        evalfarm.evaluate(str(samples), str(stats), weights=str(weights_path), metrics=("fid",))
    assert only_job().state == "failed"


def test_stats_file_of_other_resize_mode_is_refused(
    samples: Path, tmp_path: Path, weights_path: Path, no_featurizing: None
) -> None:
    stats = write_stats_file(
        tmp_path / "stats.npz", weights_sha256=np.str_(file_sha256(weights_path)), resize=np.str_("clean")
    )
    with pytest.raises(ReferenceMismatchError, match=r"--resize clean, this job uses --resize tf"):
        evalfarm.evaluate(str(samples), str(stats), weights=str(weights_path), metrics=("fid",))


def test_named_reference_of_other_weights_is_refused(
    samples: Path, reference: Path, weights_path: Path, other_weights_path: Path
) -> None:
    run_embedded(
        str(reference), None, EvalConfig(metrics=()), weights=str(other_weights_path), kind=JOB_REFERENCE,
        reference_name="made-with-other-weights",
    )
    with pytest.raises(ReferenceMismatchError, match=r"'made-with-other-weights' \(inception-v3-compat\) was computed with other weights"):
        evalfarm.evaluate(str(samples), "made-with-other-weights", weights=str(weights_path), metrics=("fid",))
    failed = jobs()[-1]
    assert failed.state == "failed" and failed.shards == []


def test_kid_with_a_mu_sigma_file_is_refused(
    samples: Path, tmp_path: Path, weights_path: Path, no_featurizing: None
) -> None:
    stats = write_stats_file(tmp_path / "stats.npz")
    with pytest.raises(MetricInputError, match=r"holds only mu/sigma statistics; KID and precision/recall need reference features"):
        evalfarm.evaluate(str(samples), str(stats), weights=str(weights_path), metrics=("fid", "kid"))


def test_stats_file_of_the_wrong_shape_is_refused(
    samples: Path, tmp_path: Path, weights_path: Path, no_featurizing: None
) -> None:
    stats = write_stats_file(tmp_path / "stats64.npz", dim=64)
    with pytest.raises(ReferenceMismatchError, match=r"mu\(64,\), sigma\(64, 64\); FID-Inception pool3 statistics"):
        evalfarm.evaluate(str(samples), str(stats), weights=str(weights_path), metrics=("fid",))


# -- a missing reference ------------------------------------------------------------------------------------------


def test_fid_without_a_reference_is_refused_naming_ref(samples: Path, weights_path: Path, no_featurizing: None) -> None:
    with pytest.raises(InvalidField, match=r"ref: FID, KID and PRC need a reference"):
        evalfarm.evaluate(str(samples), None, weights=str(weights_path), metrics=("fid",))
    assert jobs() == []  # refused before a job is recorded


# -- errors name the problem, never the content ---------------------------------------------------------------------


def test_a_file_that_is_not_an_array_is_refused_without_quoting_its_bytes(tmp_path: Path, weights_path: Path) -> None:
    secret = tmp_path / "samples.npy"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(SourceError) as caught:
        evalfarm.evaluate(str(secret), None, weights=str(weights_path), metrics=("is",), splits=2)
    assert str(secret) in str(caught.value)
    assert "root" not in str(caught.value).replace(str(tmp_path), "")


def test_a_statistics_file_of_pickled_arrays_is_a_clear_error(
    samples: Path, tmp_path: Path, weights_path: Path, no_featurizing: None
) -> None:
    stats = tmp_path / "pickled.npz"
    np.savez(stats, mu=np.array([object()] * 3, dtype=object), sigma=np.eye(3))
    with pytest.raises(SourceError, match=r"pickled.npz is not a usable mu/sigma statistics file .*without pickling"):
        evalfarm.evaluate(str(samples), str(stats), weights=str(weights_path), metrics=("fid",))
    assert only_job().state == "failed"


# -- Flower ------------------------------------------------------------------------------------------------------------


def test_flower_refuses_another_address_without_auth() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    proc = run_cli("flower", "--address", "0.0.0.0", env=env)
    assert proc.returncode == 2
    assert "refusing to serve Flower on 0.0.0.0 without authentication" in proc.stderr
    assert "FLOWER_BASIC_AUTH" in proc.stderr


# -- a damaged named reference ------------------------------------------------------------------------------------


def test_a_named_reference_whose_cache_was_damaged_is_featurized_again_from_its_images(
    samples: Path, reference: Path, weights_path: Path
) -> None:
    run_embedded(str(reference), None, EvalConfig(metrics=()), weights=str(weights_path), kind=JOB_REFERENCE,
                 reference_name="ref-to-damage")
    kid = dict(weights=str(weights_path), metrics=("kid",), kid_subset_size=3, kid_subsets=2)
    before = evalfarm.evaluate(str(samples), "ref-to-damage", **kid)
    [cache] = (Path(get_settings().store) / "refs").glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:100])

    after = evalfarm.evaluate(str(samples), "ref-to-damage", **kid)

    assert after[KEY_KID_MEAN] == before[KEY_KID_MEAN]
    assert after["images_featurized"] == 4 + 3
    assert [str(cache) in w and "unreadable" in w for w in after["warnings"]] == [True]
