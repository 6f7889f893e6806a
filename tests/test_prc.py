"""evalfarm.metrics.prc: precision/recall in tiles, merged exactly, equal to torch-fidelity 0.4.0's PRC.

Pure math on seeded random features; nothing here runs a network.
"""

from __future__ import annotations

import math
from itertools import permutations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_prc import (
    KEY_METRIC_F_SCORE,
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    calc_cdist_full,
    prc_features_to_metric,
)

from evalfarm.errors import MetricInputError
from evalfarm.metrics import prc
from evalfarm.metrics.prc import (
    coverage_tile,
    merge_nearest,
    nearest_tile,
    prc_from_coverage,
    prc_radii,
    precision_recall,
    radii_from_nearest,
    tiles,
)

K = 3  # torch-fidelity's prc_neighborhood
TF_KWARGS = {"prc_neighborhood": K, "prc_batch_size": 10000, "save_cpu_ram": False, "verbose": False}
BLOCK = 40  # small, so that 500 samples make 13 blocks (the last one of 20) and tiles of 1, 3 and 7 per side


def relu_like(rng: np.random.RandomState, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    """Non-negative features with exact zeros, like VGG16 fc2_relu."""
    return np.maximum(rng.normal(shift, 1.0, size=(n, d)), 0).astype(np.float32)


def abs_gauss(rng: np.random.RandomState, n: int, d: int, shift: float = 0.3) -> np.ndarray:
    return np.abs(rng.normal(shift, 1.0, size=(n, d))).astype(np.float32)


def with_duplicates(rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """Memorized samples (generated rows equal to real ones) and rows repeated up to k+1 times: radius 0, ties."""
    real = relu_like(rng, 300, 256)
    gen = relu_like(rng, 200, 256, shift=0.05)
    gen[:50] = real[:50]
    real[100:110] = real[90:100]
    real[200:216] = np.repeat(real[196:200], 4, axis=0)
    gen[100:112] = np.repeat(gen[60:63], 4, axis=0)
    return gen, real


def feature_sets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.RandomState(2020)
    return {
        "200x64": (abs_gauss(rng, 200, 64), abs_gauss(rng, 200, 64, shift=0.35)),
        "500x4096-vgg-like": (relu_like(rng, 500, 4096), relu_like(rng, 500, 4096)),
        "300-vs-450x256": (abs_gauss(rng, 300, 256), abs_gauss(rng, 450, 256, shift=0.4)),
        "duplicates-and-ties": with_duplicates(rng),
    }


SETS = feature_sets()


def torch_fidelity_prc(gen: np.ndarray, real: np.ndarray, **overrides: object) -> dict[str, float]:
    return prc_features_to_metric(torch.from_numpy(gen), torch.from_numpy(real), **{**TF_KWARGS, **overrides})


def tile_for(n: int, per_side: int, block: int = BLOCK) -> int:
    """The smallest whole-block tile that cuts n samples into `per_side` tiles."""
    return math.ceil(math.ceil(n / per_side) / block) * block


# ------------------------------------------------------------------------------------------------ tiling


def test_tiles_cover_the_matrix_once_with_edges_on_the_block_grid() -> None:
    cover = np.zeros((500, 430), int)
    for t in tiles(500, 430, 80, block=BLOCK):
        cover[t.rows, t.cols] += 1
        assert t.row_start % BLOCK == 0 and t.col_start % BLOCK == 0
    assert (cover == 1).all()
    assert len(tiles(500, 500, tile_for(500, 7), block=BLOCK)) == 7 * 7
    assert len(tiles(500, 500, tile_for(500, 3), block=BLOCK)) == 3 * 3


def test_a_tile_must_be_whole_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of the block"):
        tiles(500, 500, 100, block=BLOCK)


def test_every_pair_distance_is_the_same_in_every_tiling() -> None:
    # With k+1 = the number of columns, a row's merged partial is its whole sorted distance row.
    x = SETS["500x4096-vgg-like"][0]
    rows = {}
    for per_side in (1, 3, 7):
        t = tile_for(len(x), per_side)
        parts: dict[int, np.ndarray] = {}
        for tl in tiles(len(x), len(x), t, block=BLOCK):
            p = nearest_tile(x[tl.rows], x[tl.cols], neighborhood=len(x) - 1, block=BLOCK)
            parts[tl.row_start] = p if tl.row_start not in parts else merge_nearest(parts[tl.row_start], p)
        rows[per_side] = np.concatenate([parts[s] for s in sorted(parts)])
    assert np.isfinite(rows[1]).all()
    assert np.array_equal(rows[1], rows[3]) and np.array_equal(rows[1], rows[7])


@pytest.mark.parametrize("name", ["500x4096-vgg-like", "duplicates-and-ties"])
def test_radii_are_bit_identical_for_1_3_and_7_tiles_per_side(name: str) -> None:
    x = SETS[name][1]
    radii = [prc_radii(x, tile=tile_for(len(x), per_side), block=BLOCK) for per_side in (1, 3, 7)]
    assert radii[0].dtype == np.float32
    assert np.array_equal(radii[0], radii[1]) and np.array_equal(radii[0], radii[2])


@pytest.mark.parametrize("name", ["500x4096-vgg-like", "300-vs-450x256", "duplicates-and-ties"])
def test_metric_is_bit_identical_for_1_3_and_7_tiles_per_side(name: str) -> None:
    gen, real = SETS[name]
    n = max(len(gen), len(real))
    results = [precision_recall(gen, real, tile=tile_for(n, per_side), block=BLOCK) for per_side in (1, 3, 7)]
    assert results[0] == results[1] == results[2]


def test_merging_nearest_partials_is_exact_in_any_order() -> None:
    rng = np.random.RandomState(0)
    row = rng.randint(0, 20, size=(6, 30)).astype(np.float32)  # many ties
    parts = [np.sort(row[:, c : c + 10], axis=1)[:, : K + 1] for c in (0, 10, 20)]
    expected = np.sort(row, axis=1)[:, : K + 1]
    for order in permutations(parts):
        assert np.array_equal(merge_nearest(merge_nearest(order[0], order[1]), order[2]), expected)


def test_coverage_merged_over_tiles_is_coverage_of_the_whole() -> None:
    gen, real = SETS["300-vs-450x256"]
    r_gen, r_real = prc_radii(gen, tile=80, block=BLOCK), prc_radii(real, tile=80, block=BLOCK)
    whole = coverage_tile(real, gen, r_real, r_gen, block=BLOCK)
    real_cov, gen_cov = np.zeros(len(real), bool), np.zeros(len(gen), bool)
    for t in tiles(len(real), len(gen), 120, block=BLOCK):
        r, g = coverage_tile(real[t.rows], gen[t.cols], r_real[t.rows], r_gen[t.cols], block=BLOCK)
        real_cov[t.rows] |= r
        gen_cov[t.cols] |= g
    assert np.array_equal(real_cov, whole[0]) and np.array_equal(gen_cov, whole[1])


# ------------------------------------------------------------------------------------------------ torch-fidelity


@pytest.mark.parametrize("name", list(SETS))
def test_equals_torch_fidelity(name: str) -> None:
    gen, real = SETS[name]
    assert precision_recall(gen, real) == torch_fidelity_prc(gen, real)


@pytest.mark.parametrize("name", list(SETS))
def test_equals_torch_fidelity_save_cpu_ram_path(name: str) -> None:
    # Its `_part` path computes precision's distances as cdist(gen, real) instead of cdist(real, gen)ᵀ: they can
    # differ by rounding, which flips no decision on these sets.
    gen, real = SETS[name]
    assert precision_recall(gen, real) == torch_fidelity_prc(gen, real, save_cpu_ram=True)


def test_keys_are_torch_fidelity_keys() -> None:
    assert (prc.KEY_METRIC_PRECISION, prc.KEY_METRIC_RECALL, prc.KEY_METRIC_F_SCORE) == (
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
        KEY_METRIC_F_SCORE,
    )


def test_default_block_radii_are_torch_fidelitys_bit_for_bit() -> None:
    x = SETS["500x4096-vgg-like"][1]
    theirs = calc_cdist_full(torch.from_numpy(x), torch.from_numpy(x), 10000).kthvalue(K + 1).values.numpy()
    assert np.array_equal(prc_radii(x), theirs)


def test_block_equal_to_torch_fidelity_batch_gives_its_numbers_in_any_tiling() -> None:
    # The block is the unit of both: with prc_batch_size = block, torch-fidelity makes the same cdist calls.
    gen, real = SETS["300-vs-450x256"]
    theirs_radii = calc_cdist_full(torch.from_numpy(real), torch.from_numpy(real), BLOCK).kthvalue(K + 1).values
    theirs = torch_fidelity_prc(gen, real, prc_batch_size=BLOCK)
    for per_side in (1, 3, 7):
        tile = tile_for(len(real), per_side)
        assert np.array_equal(prc_radii(real, tile=tile, block=BLOCK), theirs_radii.numpy())
        assert precision_recall(gen, real, tile=tile, block=BLOCK) == theirs


def test_small_blocks_give_torch_fidelitys_numbers_on_realistic_data() -> None:
    # Blocks smaller than torch-fidelity's batch may round a distance differently (by ~1e-6 relative); on these
    # sets every decision is at least 6e-5 (relative) away from its radius, so none may flip. At 4096
    # dimensions and 50k samples decisions come closer than rounding: see bench/prc.py.
    for name in ("200x64", "300-vs-450x256"):
        gen, real = SETS[name]
        assert precision_recall(gen, real, tile=3 * BLOCK, block=BLOCK) == torch_fidelity_prc(gen, real)


def test_metric_rounds_like_torch_fidelity() -> None:
    # torch-fidelity takes a float32 mean: 1/3 is float32(1/3), and P + R = 0 gives f_score 0, not an error.
    out = prc_from_coverage(np.array([True, False, False]), np.zeros(4, bool))
    assert out[KEY_METRIC_RECALL] == float(np.float32(1 / 3))
    assert out[KEY_METRIC_PRECISION] == 0.0 and out[KEY_METRIC_F_SCORE] == 0.0


def test_memory_mapped_features_give_the_same_numbers(tmp_path) -> None:
    gen, real = SETS["300-vs-450x256"]
    np.save(tmp_path / "gen.npy", gen)
    np.save(tmp_path / "real.npy", real)
    mapped = (np.load(tmp_path / "gen.npy", mmap_mode="r"), np.load(tmp_path / "real.npy", mmap_mode="r"))
    assert precision_recall(*mapped, tile=80, block=BLOCK) == precision_recall(gen, real, tile=80, block=BLOCK)


# ------------------------------------------------------------------------------------------------ bounded tiles


def test_a_nearest_tile_returns_k_plus_1_sorted_distances_per_row_whatever_n() -> None:
    x = SETS["300-vs-450x256"][1]  # 450 samples; the tile sees 80 × 120 of them
    part = nearest_tile(x[0:80], x[160:280], neighborhood=K, block=BLOCK)
    assert part.shape == (80, K + 1) and part.dtype == np.float32
    assert (np.diff(part, axis=1) >= 0).all()


def test_a_nearest_tile_with_fewer_than_k_plus_1_columns_pads_with_inf() -> None:
    x = SETS["300-vs-450x256"][1]
    part = nearest_tile(x[0:40], x[440:442], neighborhood=K, block=BLOCK)
    assert part.shape == (40, K + 1)
    assert np.isfinite(part[:, :2]).all() and np.isinf(part[:, 2:]).all()


def test_a_coverage_tile_returns_one_boolean_per_row_and_per_column() -> None:
    gen, real = SETS["300-vs-450x256"]
    r, g = coverage_tile(real[0:120], gen[40:120], np.ones(120, np.float32), np.ones(80, np.float32), block=BLOCK)
    assert r.shape == (120,) and g.shape == (80,) and r.dtype == bool and g.dtype == bool


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("n_gen,n_real", [(3, 50), (50, 3), (1, 1)])
def test_a_set_of_k_samples_or_fewer_is_a_clear_error(n_gen: int, n_real: int) -> None:
    rng = np.random.RandomState(0)
    with pytest.raises(MetricInputError, match="needs more than 3 samples"):
        precision_recall(abs_gauss(rng, n_gen, 8), abs_gauss(rng, n_real, 8))


def test_radii_of_k_samples_or_fewer_are_a_clear_error() -> None:
    with pytest.raises(MetricInputError, match="more than 3 samples"):
        prc_radii(np.ones((3, 8), np.float32))
    with pytest.raises(MetricInputError, match="radii are undefined"):
        radii_from_nearest(nearest_tile(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_a_clear_error_naming_the_row(bad: float) -> None:
    gen, real = (a.copy() for a in SETS["300-vs-450x256"])
    real[317, 5] = bad
    with pytest.raises(MetricInputError, match="real features: row 317 is not finite"):
        precision_recall(gen, real, tile=80, block=BLOCK)


def test_features_too_large_for_float32_distances_are_a_clear_error() -> None:
    gen, real = (a.copy() for a in SETS["200x64"])
    gen[3] = 1e20
    with pytest.raises(MetricInputError, match="row 3 is too large"):
        precision_recall(gen, real)


def test_mismatched_dimensions_are_a_clear_error() -> None:
    rng = np.random.RandomState(0)
    with pytest.raises(MetricInputError, match="different dimensions: 64 and 32"):
        precision_recall(abs_gauss(rng, 20, 64), abs_gauss(rng, 20, 32))
    with pytest.raises(MetricInputError, match="different feature dimensions"):
        nearest_tile(abs_gauss(rng, 20, 64), abs_gauss(rng, 20, 32))
    with pytest.raises(MetricInputError, match="different feature dimensions"):
        coverage_tile(abs_gauss(rng, 20, 64), abs_gauss(rng, 20, 32), np.ones(20), np.ones(20))


def test_radii_that_do_not_fit_the_tile_are_a_clear_error() -> None:
    rng = np.random.RandomState(0)
    with pytest.raises(MetricInputError, match="radii for 20 samples"):
        coverage_tile(abs_gauss(rng, 20, 8), abs_gauss(rng, 10, 8), np.ones(19), np.ones(10))


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_a_neighborhood_that_is_not_a_positive_integer_is_a_clear_error(k: object) -> None:
    gen, real = SETS["200x64"]
    with pytest.raises(MetricInputError, match="neighborhood must be a positive integer"):
        precision_recall(gen, real, neighborhood=k)
