"""evalfarm's IS, FID and KID equal torch-fidelity 0.4.0's on the same images and the same weights.

torch-fidelity runs once per session (70 images featurized) and evalfarm once (the shared `parity_result`
fixture, shard size 16, so the sets are cut into several shards that must merge back exactly).
`resize="clean"` has no torch-fidelity counterpart and is not compared here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evalfarm import KEY_FID, KEY_IS_MEAN, KEY_IS_STD, KEY_KID_MEAN, KEY_KID_STD

from .helpers import KID_SUBSET, N_REFERENCE, N_SAMPLES, rel_err

MEAN_RTOL = 1e-4  #: IS mean, FID, KID mean
STD_RTOL = 1e-3  #: IS std, KID std: spreads over few splits/subsets amplify float32 rounding


@pytest.fixture(scope="session")
def torch_fidelity_metrics(samples_dir: Path, reference_dir: Path, weights_path: Path) -> dict[str, float]:
    torch_fidelity = pytest.importorskip("torch_fidelity")
    return torch_fidelity.calculate_metrics(
        input1=str(samples_dir),
        input2=str(reference_dir),
        isc=True,
        fid=True,
        kid=True,
        kid_subset_size=KID_SUBSET,
        kid_subsets=10,
        feature_extractor_weights_path=str(weights_path),
        cuda=False,
        cache=False,
        verbose=False,
    )


def assert_matches(ours: dict, theirs: dict, key: str, rtol: float) -> None:
    rel = rel_err(ours[key], theirs[key])
    print(f"{key}: evalfarm {ours[key]!r} torch-fidelity {theirs[key]!r} relative difference {rel:.3e}")
    assert rel <= rtol, (
        f"{key}: evalfarm {ours[key]!r} vs torch-fidelity {theirs[key]!r}: relative difference {rel:.3e} > {rtol:g}"
    )


def test_inception_score_mean_equals_torch_fidelity(parity_result: dict, torch_fidelity_metrics: dict) -> None:
    assert_matches(parity_result, torch_fidelity_metrics, KEY_IS_MEAN, MEAN_RTOL)


def test_inception_score_std_equals_torch_fidelity(parity_result: dict, torch_fidelity_metrics: dict) -> None:
    assert_matches(parity_result, torch_fidelity_metrics, KEY_IS_STD, STD_RTOL)


def test_fid_equals_torch_fidelity(parity_result: dict, torch_fidelity_metrics: dict) -> None:
    assert_matches(parity_result, torch_fidelity_metrics, KEY_FID, MEAN_RTOL)


def test_kid_mean_equals_torch_fidelity(parity_result: dict, torch_fidelity_metrics: dict) -> None:
    assert_matches(parity_result, torch_fidelity_metrics, KEY_KID_MEAN, MEAN_RTOL)


def test_kid_std_equals_torch_fidelity(parity_result: dict, torch_fidelity_metrics: dict) -> None:
    assert_matches(parity_result, torch_fidelity_metrics, KEY_KID_STD, STD_RTOL)


def test_parity_run_used_the_sizes_and_settings_torch_fidelity_used(parity_result: dict) -> None:
    assert parity_result["n_samples"] == N_SAMPLES
    assert parity_result["n_reference"] == N_REFERENCE
    assert parity_result["resize"] == "tf"
    assert parity_result["settings"]["kid_subset_size"] == KID_SUBSET
    assert parity_result["settings"]["kid_subsets"] == 10
    assert parity_result["settings"]["splits"] == 10

