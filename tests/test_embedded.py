"""The embedded run (`evalfarm eval`, `evalfarm.evaluate`) as a user runs it: sharding, inputs, CLI, caches, history.

Featurization is the expensive part here (a few images per second on a shared CPU), so runs are shared through
session/module fixtures with their own evalfarm home and each test asserts one behaviour of them:

    shard sizes 7 and 32 (API, no cache)        2 x 70 images (shard size 16 is the parity run)
    shard size 1000 (CLI, --no-cache)               70 images; also the CLI tests
    the samples as an .npz                          40 images (reference from the parity run's cache)
    IS only, EVALFARM_WEIGHTS (CLI)                  4 images
    reference cache                             14, 8, 14 images
    named reference, pytorch-fid stats file      6, 5, 6 images
    results history                              4, 4 images
                                               ----
                                                315 images (plus the 70 of the shared parity run)

Each FID also costs a 2048-d eigendecomposition (seconds on a busy CPU), so runs that only need to show what
was featurized or read ask for IS or KID instead.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import evalfarm
from evalfarm import KEY_FID, KEY_IS_MEAN, KEY_IS_STD, KEY_KID_MEAN, KEY_KID_STD, EvalConfig
from evalfarm.db import Reference, session_factory
from evalfarm.keys import METRIC_KEYS
from evalfarm.metrics import frechet_distance
from evalfarm.scheduler.embedded import run_embedded
from evalfarm.scheduler.references import load_reference
from evalfarm.scheduler.store import FeatureStore
from evalfarm.settings import get_settings

from .helpers import (
    KID_SUBSET,
    N_REFERENCE,
    N_SAMPLES,
    POOL3_DIM,
    evaluate_in_home,
    home_env,
    images_as_array,
    in_home,
    rel_err,
    run_cli,
    use_home,
    write_images,
)

SHARD_RTOL = 1e-6


# -- helpers ------------------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_stats_file(path: Path, seed: int, **extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-fid's format: `mu` and `sigma` of (random) 2048-d features."""
    rng = np.random.RandomState(seed)
    features = rng.randn(64, POOL3_DIM) * 0.3 + 0.5
    mu, sigma = np.mean(features, axis=0), np.cov(features, rowvar=False)
    np.savez(path, mu=mu, sigma=sigma, **extra)
    return mu, sigma


# -- shard invariance ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-home")


@pytest.fixture(scope="module")
def cli_run(
    cli_home: Path, samples_dir: Path, reference_dir: Path, weights_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess, dict]:
    """`evalfarm eval` as a user types it: all in one shard (1000 > 70 images), no cache, JSON written."""
    out = tmp_path_factory.mktemp("cli-out") / "result.json"
    proc = run_cli(
        "eval", samples_dir, "--ref", reference_dir,
        "--metrics", "is,fid,kid", "--kid-subset-size", KID_SUBSET, "--kid-subsets", "10",
        "--shard-size", "1000", "--no-cache", "--weights", weights_path, "--json", out, "--quiet",
        env=home_env(cli_home),
    )
    assert proc.returncode == 0, f"evalfarm eval failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def results_by_shard_size(
    shared_home: Path, samples_dir: Path, reference_dir: Path, weights_path: Path, parity_result: dict, cli_run
) -> dict[int, dict]:
    runs = {16: parity_result, 1000: cli_run[1]}
    for shard_size in (7, 32):
        runs[shard_size] = evaluate_in_home(
            shared_home, str(samples_dir), str(reference_dir), weights=str(weights_path),
            kid_subset_size=KID_SUBSET, kid_subsets=10, shard_size=shard_size, cache=False,
        )
    return runs


@pytest.mark.parametrize("key", METRIC_KEYS)
def test_metric_does_not_depend_on_shard_size(results_by_shard_size: dict[int, dict], key: str) -> None:
    values = {size: r[key] for size, r in sorted(results_by_shard_size.items())}
    reference_value = values[1000]
    spread = max(rel_err(v, reference_value) for v in values.values())
    print(f"{key} by shard size: {values}; largest relative difference {spread:.3e}")
    assert spread <= SHARD_RTOL, f"{key} changes with the shard size: {values} (relative spread {spread:.3e})"


def test_shard_size_runs_featurize_both_sides_without_cache(results_by_shard_size: dict[int, dict]) -> None:
    for size in (7, 32, 1000):
        assert results_by_shard_size[size]["images_featurized"] == N_SAMPLES + N_REFERENCE, size


def test_embedded_runs_spill_their_partials_to_the_home_and_remove_them(results_by_shard_size, shared_home) -> None:
    spill = shared_home / "spill"
    assert spill.is_dir()  # where the shards' partial files went (not this process's memory)
    assert list(spill.iterdir()) == []  # and each run removed its own directory


# -- the same images as a folder and as an .npz ------------------------------------------------------------------


@pytest.fixture(scope="module")
def npz_result(
    shared_home: Path, samples_dir: Path, reference_dir: Path, weights_path: Path, parity_result: dict,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict:
    """The parity run's job with the samples as an .npz (the reference comes from the parity run's cache).

    IS and KID only: together they read every sample's logits and features; FID would add a 2048-d
    eigendecomposition (seconds on this CPU) without reading anything else.
    """
    path = tmp_path_factory.mktemp("npz") / "samples.npz"
    np.savez(path, arr_0=images_as_array(samples_dir))
    return evaluate_in_home(
        shared_home, str(path), str(reference_dir), weights=str(weights_path), metrics=("is", "kid"),
        kid_subset_size=KID_SUBSET, kid_subsets=10, shard_size=16,
    )


@pytest.mark.parametrize("key", [KEY_IS_MEAN, KEY_IS_STD, KEY_KID_MEAN, KEY_KID_STD])
def test_npz_of_the_images_gives_the_folders_result(npz_result: dict, parity_result: dict, key: str) -> None:
    assert npz_result["n_samples"] == parity_result["n_samples"]
    assert npz_result[key] == pytest.approx(parity_result[key], rel=1e-9)


# -- the CLI ------------------------------------------------------------------------------------------------------


def test_cli_eval_writes_torch_fidelity_keys_to_json(cli_run: tuple) -> None:
    _, doc = cli_run
    for key in METRIC_KEYS:
        assert isinstance(doc[key], float), key
        assert np.isfinite(doc[key]), key


def test_cli_eval_json_records_sizes_weights_and_resize(cli_run: tuple, weights_path: Path) -> None:
    _, doc = cli_run
    assert doc["n_samples"] == N_SAMPLES
    assert doc["n_reference"] == N_REFERENCE
    assert doc["weights_sha256"] == sha256_of(weights_path)
    assert doc["weights_canonical"] is False
    assert doc["resize"] == "tf"
    assert doc["images_per_second"] > 0
    assert doc["images_featurized"] == N_SAMPLES + N_REFERENCE


def test_cli_eval_json_records_the_flags_as_settings(cli_run: tuple) -> None:
    _, doc = cli_run
    settings = doc["settings"]
    assert settings["metrics"] == ["is", "fid", "kid"]
    assert settings["kid_subset_size"] == KID_SUBSET
    assert settings["kid_subsets"] == 10
    assert settings["shard_size"] == 1000
    assert settings["cache"] is False
    assert settings["resize"] == "tf"
    assert settings["precision"] == "fp32"


def test_cli_eval_prints_the_table(cli_run: tuple) -> None:
    proc, doc = cli_run
    assert "Inception Score" in proc.stdout
    assert "FID" in proc.stdout
    assert "KID" in proc.stdout
    assert f"{doc[KEY_FID]:.6g}" in proc.stdout
    assert doc["job_id"] in proc.stdout


def test_cli_eval_warns_that_the_weights_are_not_canonical(cli_run: tuple, weights_path: Path) -> None:
    proc, _ = cli_run
    assert "not the canonical FID-Inception file" in proc.stdout
    assert sha256_of(weights_path)[:12] in proc.stdout


def test_cli_eval_equals_the_api_result(cli_run: tuple, parity_result: dict) -> None:
    _, doc = cli_run
    for key in METRIC_KEYS:
        assert doc[key] == pytest.approx(parity_result[key], rel=SHARD_RTOL), key


# -- IS only, weights from EVALFARM_WEIGHTS ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def is_only_cli_run(tmp_path_factory: pytest.TempPathFactory, weights_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    root = tmp_path_factory.mktemp("is-only")
    samples = write_images(root / "samples", 4, 32, seed=11, brightness=1.0)
    out = root / "result.json"
    proc = run_cli(
        "eval", samples, "--metrics", "is", "--splits", "2", "--json", out, "--quiet",
        env=home_env(root / "home", EVALFARM_WEIGHTS=str(weights_path)),
    )
    assert proc.returncode == 0, f"evalfarm eval failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(out.read_text())


def test_evalfarm_weights_env_var_replaces_the_weights_flag(is_only_cli_run: tuple, weights_path: Path) -> None:
    _, doc = is_only_cli_run
    assert doc["weights_sha256"] == sha256_of(weights_path)


def test_inception_score_alone_needs_no_reference(is_only_cli_run: tuple) -> None:
    _, doc = is_only_cli_run
    assert doc["n_samples"] == 4
    assert doc["n_reference"] is None
    assert doc["images_featurized"] == 4
    assert {k for k in METRIC_KEYS if k in doc} == {KEY_IS_MEAN, KEY_IS_STD}
    assert doc["metric_keys"] == [KEY_IS_MEAN, KEY_IS_STD]


# -- the reference cache ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_runs(tmp_path_factory: pytest.TempPathFactory, weights_path: Path) -> dict[str, dict]:
    """Three runs of samples vs reference in one home: FID, FID again (cache), and again with cache=False.

    The cache=False run asks for KID only: it checks what is featurized, and KID is far cheaper than FID here.
    """
    root = tmp_path_factory.mktemp("cache")
    samples = str(write_images(root / "samples", 8, 32, seed=21, brightness=1.0))
    reference = str(write_images(root / "reference", 6, 32, seed=22, brightness=0.7))
    home = root / "home"
    w = str(weights_path)
    return {
        "first": evaluate_in_home(home, samples, reference, weights=w, metrics=("fid",)),
        "cached": evaluate_in_home(home, samples, reference, weights=w, metrics=("fid",)),
        "no_cache": evaluate_in_home(
            home, samples, reference, weights=w, metrics=("kid",), kid_subset_size=4, kid_subsets=2, cache=False
        ),
    }


def test_first_run_featurizes_both_sides(cache_runs: dict[str, dict]) -> None:
    assert cache_runs["first"]["images_featurized"] == 8 + 6


def test_cached_reference_is_not_featurized_again(cache_runs: dict[str, dict]) -> None:
    cached = cache_runs["cached"]
    assert cached["n_reference"] == 6
    assert cached["images_featurized"] == cached["n_samples"] == 8


def test_cached_reference_gives_the_same_fid(cache_runs: dict[str, dict]) -> None:
    assert cache_runs["cached"][KEY_FID] == pytest.approx(cache_runs["first"][KEY_FID], rel=1e-12)


def test_cache_false_featurizes_the_reference_again(cache_runs: dict[str, dict]) -> None:
    no_cache = cache_runs["no_cache"]
    assert no_cache["settings"]["cache"] is False
    assert no_cache["images_featurized"] == 8 + 6


# -- named references and pytorch-fid statistics files -----------------------------------------------------------


@pytest.fixture(scope="module")
def named_reference(tmp_path_factory: pytest.TempPathFactory, weights_path: Path) -> dict:
    """`evalfarm ref create` of a 6-image folder, in a home of its own."""
    root = tmp_path_factory.mktemp("named")
    folder = write_images(root / "images", 6, 32, seed=31, brightness=0.8)
    home = root / "home"
    proc = run_cli("ref", "create", "ffhq-mini", folder, "--weights", weights_path, "--quiet", env=home_env(home))
    assert proc.returncode == 0, f"evalfarm ref create failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return {"home": home, "name": "ffhq-mini", "folder": folder, "root": root, "stdout": proc.stdout}


def test_ref_create_reports_the_reference(named_reference: dict) -> None:
    assert "reference ffhq-mini: 6 images, resize tf" in named_reference["stdout"]


def test_ref_list_shows_the_named_reference(named_reference: dict) -> None:
    proc = run_cli("ref", "list", env=home_env(named_reference["home"]))
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [r[:3] for r in rows] == [["ffhq-mini", "6", "tf"]]
    assert rows[0][4] == str(named_reference["folder"])


def test_named_reference_is_used_without_featurizing_it(
    named_reference: dict, weights_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_home(monkeypatch, named_reference["home"])
    samples = write_images(named_reference["root"] / "other-samples", 5, 32, seed=32, brightness=1.0)
    # KID, which needs the stored reference features (FID would need only mu/sigma, and costs more here).
    result = evalfarm.evaluate(
        str(samples), "ffhq-mini", weights=str(weights_path), metrics=("kid",), kid_subset_size=5, kid_subsets=3
    )
    assert result["reference"] == "ffhq-mini"
    assert result["n_reference"] == 6
    assert result["images_featurized"] == result["n_samples"] == 5
    assert np.isfinite(result[KEY_KID_MEAN])


def test_stats_file_reference_gives_the_frechet_distance_to_its_mu_sigma(
    named_reference: dict, weights_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The named reference's stored statistics are the samples' own, so the expected FID is computable."""
    use_home(monkeypatch, named_reference["home"])
    settings = get_settings()
    with session_factory(settings.db_url)() as s:
        row = s.get(Reference, named_reference["name"])
    samples_side = load_reference(FeatureStore(settings.store), row.store_key, row.weights_sha256, row.resize, row.name)
    stats_path = named_reference["root"] / "pytorch-fid-stats.npz"
    mu, sigma = write_stats_file(stats_path, seed=33)

    result = evalfarm.evaluate(str(named_reference["folder"]), str(stats_path), weights=str(weights_path), metrics=("fid",))

    expected = frechet_distance(samples_side.mean(), samples_side.cov(), mu, sigma)
    assert result[KEY_FID] == pytest.approx(expected, rel=1e-9)
    assert result["n_reference"] == 0  # pytorch-fid files do not say how many images they came from
    assert result["images_featurized"] == 6


# -- results history ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory, weights_path: Path) -> dict:
    """Two jobs: FID against a stats file as run 'alpha' step 100, IS only as run 'beta' step 200."""
    root = tmp_path_factory.mktemp("history")
    home = root / "home"
    stats = root / "stats.npz"
    write_stats_file(stats, seed=41)
    jobs = {}
    with in_home(home):
        alpha = write_images(root / "samples-alpha", 4, 32, seed=42, brightness=1.0)
        jobs["alpha"] = run_embedded(
            str(alpha), str(stats), EvalConfig(metrics=("fid",)), weights=str(weights_path), run="alpha", step=100
        )
        beta = write_images(root / "samples-beta", 4, 32, seed=43, brightness=1.0)
        jobs["beta"] = run_embedded(
            str(beta), None, EvalConfig(metrics=("is",), splits=2), weights=str(weights_path), run="beta", step=200
        )
    return {"home": home, "jobs": jobs}


def test_results_lists_the_job_with_its_fid_as_json(history: dict) -> None:
    proc = run_cli("results", "--format", "json", env=home_env(history["home"]))
    assert proc.returncode == 0, proc.stderr
    rows = {r["job_id"]: r for r in json.loads(proc.stdout)}
    alpha = history["jobs"]["alpha"]
    assert set(rows) == {alpha["job_id"], history["jobs"]["beta"]["job_id"]}
    row = rows[alpha["job_id"]]
    assert (row["run"], row["step"]) == ("alpha", 100)
    assert row["metrics"] == {KEY_FID: pytest.approx(alpha[KEY_FID], rel=1e-12)}


def test_results_run_filter_shows_only_that_run(history: dict) -> None:
    proc = run_cli("results", "--run", "beta", "--format", "json", env=home_env(history["home"]))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["job_id"], r["run"], r["step"]) for r in rows] == [(history["jobs"]["beta"]["job_id"], "beta", 200)]
