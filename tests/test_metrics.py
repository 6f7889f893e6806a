"""evalfarm.metrics: mergeable partials and IS/FID/KID math, checked against torch-fidelity 0.4.0 and numpy/scipy.

Pure math on seeded random arrays; nothing here runs the network.
"""

from __future__ import annotations

import io
from itertools import pairwise

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kernel_mmd,
    kid_features_to_metric,
)

from evalfarm import keys
from evalfarm.config import EvalConfig
from evalfarm.errors import MetricInputError
from evalfarm.metrics import (
    FeatureStats,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    split_assignment,
    trace_sqrt_product,
)
from evalfarm.metrics.kid import polynomial_mmd2
from evalfarm.pipeline import compute_metrics, merge_in_order

from .helpers import rel_err

SEED = 2020  # torch-fidelity's default rng_seed
SPLITS = 10

# torch-fidelity's KID kwargs, spelled as its get_kwarg reads them (torch_fidelity/defaults.py).
TF_KID_KWARGS = {
    "kid_kernel": "poly",
    "kid_kernel_poly_degree": 3,
    "kid_kernel_poly_gamma": None,
    "kid_kernel_poly_coef0": 1,
    "verbose": False,
}


def pool3_like(rng: np.random.RandomState, n: int, d: int, scale: float = 1.0) -> np.ndarray:
    """Non-negative features with mean and spread of the same order, like post-ReLU average-pooled activations."""
    return np.abs(rng.normal(0.3, 1.0, size=(n, d))) * scale


def logits_like(rng: np.random.RandomState, n: int, c: int = 1008) -> np.ndarray:
    """Logits spread enough that the softmax is far from uniform (IS well above its floor of 1)."""
    return rng.normal(0.0, 3.0, size=(n, c))


def split_stats(logits: np.ndarray, split_ids: np.ndarray, splits: int) -> FeatureStats:
    """Statistics that carry only IS split sums worth looking at (their feature rows are zeros)."""
    return FeatureStats.of(np.zeros((len(logits), 1)), logits, split_ids, splits)


def assert_feature_stats_close(a: FeatureStats, b: FeatureStats, rtol: float) -> None:
    assert a.n == b.n
    np.testing.assert_allclose(a.sum, b.sum, rtol=rtol, atol=rtol * np.abs(b.sum).max())
    np.testing.assert_allclose(a.gram, b.gram, rtol=rtol, atol=rtol * np.abs(b.gram).max())


def assert_split_stats_close(a: FeatureStats, b: FeatureStats, rtol: float) -> None:
    np.testing.assert_array_equal(a.split_n, b.split_n)
    np.testing.assert_allclose(a.split_p, b.split_p, rtol=rtol, atol=rtol * np.abs(b.split_p).max())
    np.testing.assert_allclose(a.split_plogp, b.split_plogp, rtol=rtol, atol=rtol * np.abs(b.split_plogp).max())


# --------------------------------------------------------------------------------------------------------------
# FeatureStats: FID sums
# --------------------------------------------------------------------------------------------------------------


def test_feature_stats_merge_equals_stats_of_concatenation_in_any_grouping() -> None:
    rng = np.random.RandomState(0)
    a, b, c = pool3_like(rng, 37, 24), pool3_like(rng, 5, 24), pool3_like(rng, 58, 24)
    whole = FeatureStats.of(np.concatenate([a, b, c]))
    left = (FeatureStats.of(a) + FeatureStats.of(b)) + FeatureStats.of(c)
    right = FeatureStats.of(a) + (FeatureStats.of(b) + FeatureStats.of(c))
    assert_feature_stats_close(left, whole, rtol=1e-12)
    assert_feature_stats_close(right, whole, rtol=1e-12)


def test_feature_accumulator_batch_by_batch_equals_stats_of_all_rows() -> None:
    rng = np.random.RandomState(1)
    a, b = pool3_like(rng, 11, 16).astype(np.float32), pool3_like(rng, 13, 16).astype(np.float32)
    acc = FeatureStats.new(16)
    acc.add(a)
    acc.add(b)
    acc.add(b[:0])  # an empty batch adds nothing
    assert_feature_stats_close(acc, FeatureStats.of(np.concatenate([a, b])), rtol=1e-12)


def test_feature_accumulator_gram_is_exactly_symmetric_and_c_ordered() -> None:
    acc = FeatureStats.new(12)
    acc.add(pool3_like(np.random.RandomState(6), 9, 12))
    gram = acc.gram
    np.testing.assert_array_equal(gram, gram.T)
    assert gram.flags["C_CONTIGUOUS"]


def test_feature_stats_mean_and_cov_equal_numpy_float64() -> None:
    rng = np.random.RandomState(2)
    x = pool3_like(rng, 200, 32).astype(np.float32)  # features arrive as float32
    merged = FeatureStats.of(x[:77]) + FeatureStats.of(x[77:])
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(merged.mean(), np.mean(x64, axis=0), rtol=1e-12)
    expected_cov = np.cov(x64, rowvar=False)
    np.testing.assert_allclose(merged.cov(), expected_cov, rtol=1e-9, atol=1e-12 * np.abs(expected_cov).max())


def test_feature_stats_cov_is_exactly_symmetric() -> None:
    rng = np.random.RandomState(3)
    cov = (FeatureStats.of(pool3_like(rng, 50, 20)) + FeatureStats.of(pool3_like(rng, 31, 20))).cov()
    np.testing.assert_array_equal(cov, cov.T)


def test_feature_stats_bytes_round_trip_is_exact() -> None:
    rng = np.random.RandomState(4)
    stats = FeatureStats.of(pool3_like(rng, 23, 12))
    back = FeatureStats.from_bytes(stats.to_bytes())
    assert back.n == stats.n and isinstance(back.n, int)
    assert back.sum.dtype == np.float64 and back.gram.dtype == np.float64
    np.testing.assert_array_equal(back.sum, stats.sum)
    np.testing.assert_array_equal(back.gram, stats.gram)


def test_the_encoding_stores_the_gram_as_its_packed_upper_triangle() -> None:
    stats = FeatureStats.of(pool3_like(np.random.RandomState(5), 9, 6))
    with np.load(io.BytesIO(stats.to_bytes()), allow_pickle=False) as z:
        assert "gram" not in z.files
        np.testing.assert_array_equal(z["gram_upper"], stats.gram.T[np.tril_indices(6)])  # column j: rows 0..j


def test_an_encoding_with_the_whole_gram_still_decodes() -> None:
    stats = FeatureStats.of(pool3_like(np.random.RandomState(6), 9, 6))
    buf = io.BytesIO()
    np.savez(buf, n=np.int64(stats.n), sum=stats.sum, gram=stats.gram)  # what earlier releases wrote
    np.testing.assert_array_equal(FeatureStats.from_bytes(buf.getvalue()).gram, stats.gram)


def test_statistics_streamed_into_an_unseekable_writer_decode_to_the_same_arrays() -> None:
    class Unseekable:
        def __init__(self) -> None:
            self.buf = io.BytesIO()

        def write(self, data) -> int:
            return self.buf.write(data)

        def flush(self) -> None:
            pass

    rng = np.random.RandomState(7)
    stats = FeatureStats.of(pool3_like(rng, 12, 5).astype(np.float32), logits_like(rng, 12, 7),
                            split_assignment(12, 3, SEED), 3)
    out = Unseekable()
    stats.write(out)
    back = FeatureStats.from_bytes(out.buf.getvalue())
    np.testing.assert_array_equal(back.gram, stats.gram)
    np.testing.assert_array_equal(back.features, stats.features)
    np.testing.assert_array_equal(back.split_plogp, stats.split_plogp)


def test_decoded_partials_merge_to_the_same_bits_as_merging_the_originals() -> None:
    rng = np.random.RandomState(8)
    parts = [FeatureStats.of(pool3_like(rng, k, 16)) for k in (5, 11, 7)]
    merged = merge_in_order(FeatureStats.from_bytes(p.to_bytes()) for p in parts)  # triangles added, mirrored once
    np.testing.assert_array_equal(merged.gram, merge_in_order(iter(parts)).gram)
    np.testing.assert_array_equal(merged.gram, merged.gram.T)


def test_a_rows_file_holds_the_kept_rows_in_order_as_one_npy() -> None:
    rng = np.random.RandomState(9)
    a, b = pool3_like(rng, 3, 6).astype(np.float32), pool3_like(rng, 4, 6).astype(np.float32)
    acc = FeatureStats.new(6)
    acc.add(a)
    acc.add(b)
    out = io.BytesIO()
    acc.write_rows(out)
    np.testing.assert_array_equal(np.load(io.BytesIO(out.getvalue()), allow_pickle=False), np.concatenate([a, b]))


def test_feature_stats_read_mid_accumulation_then_extended_equal_stats_of_all_rows() -> None:
    rng = np.random.RandomState(41)
    a, b = pool3_like(rng, 7, 10), pool3_like(rng, 9, 10)
    acc = FeatureStats.new(10)
    acc.add(a)
    _ = acc.gram  # mirrored once here; later batches must still land in both triangles
    acc.add(b)
    assert_feature_stats_close(acc, FeatureStats.of(np.concatenate([a, b])), rtol=1e-12)
    np.testing.assert_array_equal(acc.gram, acc.gram.T)


def test_feature_stats_keep_their_rows_in_order_across_merges() -> None:
    rng = np.random.RandomState(42)
    a, b = pool3_like(rng, 3, 6).astype(np.float32), pool3_like(rng, 4, 6).astype(np.float32)
    np.testing.assert_array_equal((FeatureStats.of(a) + FeatureStats.of(b)).features, np.concatenate([a, b]))


def test_feature_stats_bytes_keep_rows_split_sums_and_meta() -> None:
    rng = np.random.RandomState(43)
    stats = FeatureStats.of(pool3_like(rng, 12, 5).astype(np.float32), logits_like(rng, 12, 7),
                            split_assignment(12, 3, SEED), 3)
    stats.meta = {"resize": "tf"}
    back = FeatureStats.from_bytes(stats.to_bytes())
    np.testing.assert_array_equal(back.features, stats.features)
    np.testing.assert_array_equal(back.split_p, stats.split_p)
    assert back.meta == {"resize": "tf"}
    assert FeatureStats.from_bytes(stats.to_bytes(), features=False).features is None


def test_feature_stats_with_and_without_split_sums_do_not_merge() -> None:
    rng = np.random.RandomState(44)
    with_splits = FeatureStats.of(pool3_like(rng, 4, 3), logits_like(rng, 4, 5), np.array([0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="IS split sums"):
        with_splits + FeatureStats.of(pool3_like(rng, 4, 3))


def test_feature_stats_from_moments_give_them_back_exactly_and_refuse_to_merge() -> None:
    rng = np.random.RandomState(45)
    x = pool3_like(rng, 30, 8)
    mu, sigma = x.mean(axis=0), np.cov(x, rowvar=False)
    stats = FeatureStats.from_moments(mu, sigma, n=30)
    assert stats.mean() is mu and stats.cov() is sigma
    with pytest.raises(MetricInputError, match="cannot be merged"):
        stats + FeatureStats.of(x)


# --------------------------------------------------------------------------------------------------------------
# FeatureStats: IS split sums
# --------------------------------------------------------------------------------------------------------------


def test_split_stats_sum_over_parts_equals_stats_of_whole() -> None:
    rng = np.random.RandomState(5)
    logits = logits_like(rng, 103, 50)
    ids = split_assignment(len(logits), SPLITS, SEED)
    whole = split_stats(logits, ids, SPLITS)
    bounds = [0, 40, 41, 103]
    parts = [split_stats(logits[lo:hi], ids[lo:hi], SPLITS) for lo, hi in pairwise(bounds)]
    left = (parts[0] + parts[1]) + parts[2]
    right = parts[0] + (parts[1] + parts[2])
    assert_split_stats_close(left, whole, rtol=1e-12)
    assert_split_stats_close(right, whole, rtol=1e-12)


def test_split_stats_equal_direct_softmax_sums() -> None:
    rng = np.random.RandomState(6)
    logits = logits_like(rng, 40, 30)
    ids = split_assignment(len(logits), 4, SEED)
    stats = split_stats(logits, ids, 4)
    p = scipy.special.softmax(logits, axis=1)
    log_p = scipy.special.log_softmax(logits, axis=1)
    for s in range(4):
        rows = ids == s
        assert stats.split_n[s] == rows.sum()
        np.testing.assert_allclose(stats.split_p[s], p[rows].sum(axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats.split_plogp[s], (p[rows] * log_p[rows]).sum(), rtol=1e-12)


def test_split_stats_bytes_round_trip_is_exact() -> None:
    rng = np.random.RandomState(7)
    logits = logits_like(rng, 25, 17)
    stats = split_stats(logits, split_assignment(25, 5, SEED), 5)
    back = FeatureStats.from_bytes(stats.to_bytes())
    for name in ("split_n", "split_p", "split_plogp"):
        assert getattr(back, name).dtype == getattr(stats, name).dtype
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))


def test_split_stats_stay_finite_when_softmax_underflows() -> None:
    logits = np.zeros((4, 5))
    logits[:, 0] = 2000.0  # every other class has p == 0 exactly
    stats = split_stats(logits, np.array([0, 0, 1, 1]), 2)
    assert np.all(np.isfinite(stats.split_p)) and np.all(np.isfinite(stats.split_plogp))
    mean, std = inception_score(stats)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0)


def test_split_ids_of_another_length_than_the_logits_are_refused() -> None:
    with pytest.raises(ValueError, match="3 split ids for 4 rows"):
        split_stats(np.zeros((4, 5)), np.array([0, 1, 0]), 2)


# --------------------------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 37, 100, 1001])
def test_split_assignment_reproduces_torch_fidelity_split_membership(n: int) -> None:
    ids = split_assignment(n, SPLITS, SEED)
    assert ids.shape == (n,)
    perm = np.random.RandomState(SEED).permutation(n)
    for i in range(SPLITS):
        expected = set(perm[i * n // SPLITS : (i + 1) * n // SPLITS].tolist())
        assert set(np.flatnonzero(ids == i).tolist()) == expected


def test_split_assignment_with_fewer_samples_than_splits_raises() -> None:
    with pytest.raises(MetricInputError):
        split_assignment(SPLITS - 1, SPLITS, SEED)


def test_inception_score_equals_torch_fidelity_on_float64_logits() -> None:
    logits = logits_like(np.random.RandomState(8), 237)
    ours = inception_score(split_stats(logits, split_assignment(len(logits), SPLITS, SEED), SPLITS))
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=SPLITS, shuffle=True, rng_seed=SEED)
    assert ours[0] > 2.0  # a non-trivial score: the comparison is not of two floors
    assert rel_err(ours[0], theirs[KEY_METRIC_ISC_MEAN]) < 1e-9
    assert rel_err(ours[1], theirs[KEY_METRIC_ISC_STD]) < 1e-9


def test_inception_score_equals_torch_fidelity_on_float32_logits() -> None:
    logits = logits_like(np.random.RandomState(9), 237).astype(np.float32)
    ours = inception_score(split_stats(logits, split_assignment(len(logits), SPLITS, SEED), SPLITS))
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=SPLITS, shuffle=True, rng_seed=SEED)
    assert rel_err(ours[0], theirs[KEY_METRIC_ISC_MEAN]) < 1e-6
    assert rel_err(ours[1], theirs[KEY_METRIC_ISC_STD]) < 1e-6


def test_inception_score_is_invariant_to_sharding() -> None:
    logits = logits_like(np.random.RandomState(10), 237).astype(np.float32)
    ids = split_assignment(len(logits), SPLITS, SEED)
    whole = inception_score(split_stats(logits, ids, SPLITS))
    bounds = [0, 100, 103, 237]  # three uneven shards
    parts = [split_stats(logits[lo:hi], ids[lo:hi], SPLITS) for lo, hi in pairwise(bounds)]
    sharded = inception_score(parts[0] + parts[1] + parts[2])
    assert rel_err(sharded[0], whole[0]) < 1e-12
    assert rel_err(sharded[1], whole[1]) < 1e-9


def test_inception_score_with_an_empty_split_raises() -> None:
    logits = logits_like(np.random.RandomState(11), 3, 8)
    with pytest.raises(MetricInputError):
        inception_score(split_stats(logits, np.array([0, 1, 1]), 3))


# --------------------------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------------------------


def random_spd(rng: np.random.RandomState, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def torch_fidelity_trace_sqrt(s1: np.ndarray, s2: np.ndarray) -> float:
    """The expression in torch-fidelity's fid_statistics_to_metric."""
    return float(np.sum(np.sqrt(np.linalg.eigvals(s1.dot(s2)).astype("complex128")).real))


def test_trace_sqrt_product_equals_scipy_sqrtm_for_full_rank_spd() -> None:
    rng = np.random.RandomState(12)
    s1, s2 = random_spd(rng, 64), random_spd(rng, 64)
    expected = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert rel_err(trace_sqrt_product(s1, s2), expected) < 1e-8


def test_trace_sqrt_product_matches_torch_fidelity_for_rank_deficient_covariances() -> None:
    rng = np.random.RandomState(13)
    x1, x2 = pool3_like(rng, 20, 64), pool3_like(rng, 20, 64, scale=1.5)
    mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    assert np.linalg.matrix_rank(s1) < 64 and np.linalg.matrix_rank(s2) < 64
    fid = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)[keys.KEY_FID]
    # Error in tr((S1 S2)^1/2) measured on the scale of the FID it enters.
    assert 2 * abs(trace_sqrt_product(s1, s2) - torch_fidelity_trace_sqrt(s1, s2)) < 1e-6 * fid
    assert rel_err(frechet_distance(mu1, s1, mu2, s2), fid) < 1e-6


def test_trace_sqrt_product_is_symmetric_when_only_one_covariance_is_full_rank() -> None:
    rng = np.random.RandomState(17)
    x = pool3_like(rng, 20, 64)
    small, full = np.cov(x, rowvar=False), random_spd(rng, 64)
    expected = torch_fidelity_trace_sqrt(small, full)
    assert rel_err(trace_sqrt_product(small, full), expected) < 1e-8
    assert rel_err(trace_sqrt_product(full, small), expected) < 1e-8


def test_frechet_distance_equals_torch_fidelity() -> None:
    rng = np.random.RandomState(14)
    x1 = pool3_like(rng, 500, 64).astype(np.float32)
    x2 = (pool3_like(rng, 400, 64) * 1.3 + 0.2).astype(np.float32)
    stats = []
    for x in (x1, x2):
        x64 = x.astype(np.float64)
        stats.append({"mu": np.mean(x64, axis=0), "sigma": np.cov(x64, rowvar=False)})
    expected = fid_statistics_to_metric(stats[0], stats[1], False)[keys.KEY_FID]
    ours = frechet_distance(stats[0]["mu"], stats[0]["sigma"], stats[1]["mu"], stats[1]["sigma"])
    assert expected > 1.0
    assert rel_err(ours, expected) < 1e-8


def test_frechet_distance_from_merged_feature_stats_equals_torch_fidelity() -> None:
    rng = np.random.RandomState(15)
    x1, x2 = pool3_like(rng, 300, 48), pool3_like(rng, 250, 48, scale=0.8)
    s1 = FeatureStats.of(x1[:120]) + FeatureStats.of(x1[120:])
    s2 = FeatureStats.of(x2)
    expected = fid_statistics_to_metric(
        {"mu": x1.mean(axis=0), "sigma": np.cov(x1, rowvar=False)},
        {"mu": x2.mean(axis=0), "sigma": np.cov(x2, rowvar=False)},
        False,
    )[keys.KEY_FID]
    assert rel_err(frechet_distance(s1.mean(), s1.cov(), s2.mean(), s2.cov()), expected) < 1e-8


def test_frechet_distance_of_identical_statistics_is_zero() -> None:
    rng = np.random.RandomState(16)
    x = pool3_like(rng, 300, 64)
    mu, sigma = x.mean(axis=0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu.copy(), sigma.copy())) < 1e-6 * np.trace(sigma)


@pytest.mark.parametrize("bad", ["mu1", "sigma1", "mu2", "sigma2"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_frechet_distance_with_non_finite_statistics_raises(bad: str, value: float) -> None:
    rng = np.random.RandomState(17)
    args = {
        "mu1": rng.normal(size=8),
        "sigma1": random_spd(rng, 8),
        "mu2": rng.normal(size=8),
        "sigma2": random_spd(rng, 8),
    }
    args[bad] = args[bad].copy()
    args[bad].flat[3] = value
    with pytest.raises(MetricInputError, match=bad):
        frechet_distance(**args)


@pytest.mark.parametrize(
    "shapes",
    [((8,), (8, 8), (6,), (6, 6)), ((8,), (8, 8), (8,), (6, 6))],
    ids=["all-dims-differ", "sigma-differs"],
)
def test_frechet_distance_with_mismatched_dimensions_raises(shapes: tuple) -> None:
    rng = np.random.RandomState(18)
    m1, s1, m2, s2 = shapes
    with pytest.raises(MetricInputError):
        frechet_distance(rng.normal(size=m1), random_spd(rng, s1[0]), rng.normal(size=m2), random_spd(rng, s2[0]))


# --------------------------------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------------------------------


def test_polynomial_mmd2_equals_torch_fidelity_kernel_mmd_in_float64() -> None:
    rng = np.random.RandomState(19)
    x, y = pool3_like(rng, 30, 16), pool3_like(rng, 30, 16, scale=1.2)
    assert rel_err(polynomial_mmd2(x, y), kernel_mmd(x, y, **TF_KID_KWARGS)) < 1e-12


def test_kernel_inception_distance_equals_torch_fidelity() -> None:
    rng = np.random.RandomState(20)
    f1 = pool3_like(rng, 120, 64).astype(np.float32)
    f2 = pool3_like(rng, 90, 64, scale=1.3).astype(np.float32)
    ours = kernel_inception_distance(f1, f2, subsets=10, subset_size=50, seed=SEED)
    theirs = kid_features_to_metric(
        torch.from_numpy(f1),
        torch.from_numpy(f2),
        kid_subsets=10,
        kid_subset_size=50,
        rng_seed=SEED,
        **TF_KID_KWARGS,
    )
    assert theirs[KEY_METRIC_KID_MEAN] > 0.1  # distributions differ: a value, not rounding noise
    assert rel_err(ours[0], theirs[KEY_METRIC_KID_MEAN]) < 1e-4
    assert rel_err(ours[1], theirs[KEY_METRIC_KID_STD]) < 1e-3


@pytest.mark.parametrize(("n1", "n2"), [(120, 30), (40, 90), (45, 35)])
def test_kid_subset_larger_than_a_set_raises_naming_both_counts(n1: int, n2: int) -> None:
    rng = np.random.RandomState(21)
    with pytest.raises(MetricInputError) as info:
        kernel_inception_distance(pool3_like(rng, n1, 8), pool3_like(rng, n2, 8), subsets=2, subset_size=50, seed=SEED)
    message = str(info.value)
    assert str(n1) in message and str(n2) in message


def test_polynomial_mmd2_of_a_set_against_itself_shuffled_is_near_zero() -> None:
    rng = np.random.RandomState(22)
    x = pool3_like(rng, 200, 32)
    m = len(x)
    same = polynomial_mmd2(x, x[rng.permutation(m)])
    k = (x @ x.T / x.shape[1] + 1) ** 3
    # The unbiased estimator on identical sets is not exactly 0: it is -2 (mean diag K - mean K) / (m - 1),
    # whatever the row order, and that is small on the kernel's scale.
    assert rel_err(same, -2 * (np.mean(np.diag(k)) - k.mean()) / (m - 1)) < 1e-10
    assert abs(same) < 1e-2 * k.mean()


def test_kid_of_two_draws_from_one_distribution_is_near_zero_and_of_different_ones_is_not() -> None:
    rng = np.random.RandomState(22)
    a, b, c = pool3_like(rng, 300, 32), pool3_like(rng, 300, 32), pool3_like(rng, 300, 32, scale=1.3)
    same_mean, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=100, seed=SEED)
    diff_mean, diff_std = kernel_inception_distance(a, c, subsets=20, subset_size=100, seed=SEED)
    assert abs(same_mean) < same_std
    assert diff_mean > 5 * diff_std


# --------------------------------------------------------------------------------------------------------------
# Reducer: EvalConfig -> metrics
# --------------------------------------------------------------------------------------------------------------


def side(features: np.ndarray) -> FeatureStats:
    return FeatureStats.of(features)


def test_compute_metrics_kid_shrink_uses_the_smaller_set_size() -> None:
    rng = np.random.RandomState(23)
    f1 = pool3_like(rng, 30, 16).astype(np.float32)
    f2 = pool3_like(rng, 25, 16, scale=1.2).astype(np.float32)
    config = EvalConfig(metrics=("kid",), kid_shrink=True, kid_subset_size=1000, kid_subsets=5)
    out = compute_metrics(config, side(f1), side(f2))
    expected = kernel_inception_distance(f1, f2, subsets=5, subset_size=25, seed=config.seed)
    assert (out[keys.KEY_KID_MEAN], out[keys.KEY_KID_STD]) == expected


def test_compute_metrics_without_kid_shrink_rejects_a_small_set() -> None:
    rng = np.random.RandomState(24)
    config = EvalConfig(metrics=("kid",), kid_shrink=False, kid_subset_size=1000, kid_subsets=5)
    with pytest.raises(MetricInputError, match="30"):
        compute_metrics(config, side(pool3_like(rng, 30, 16)), side(pool3_like(rng, 25, 16)))


def test_compute_metrics_rejects_non_finite_fid_statistics() -> None:
    rng = np.random.RandomState(25)
    samples, reference = side(pool3_like(rng, 30, 16)), side(pool3_like(rng, 25, 16))
    samples.sum[0] = np.nan  # so the mean is NaN there
    with pytest.raises(MetricInputError):
        compute_metrics(EvalConfig(metrics=("fid",)), samples, reference)


def test_compute_metrics_refuses_a_non_finite_kid() -> None:
    rng = np.random.RandomState(26)
    f1 = pool3_like(rng, 30, 16)
    f1[4, 2] = np.nan  # every subset of 30 out of 30 includes it
    config = EvalConfig(metrics=("kid",), kid_subset_size=30, kid_subsets=3)
    with pytest.raises(MetricInputError, match="non-finite"):
        compute_metrics(config, side(f1), side(pool3_like(rng, 30, 16)))


def test_frechet_distance_rejects_a_mean_that_does_not_fit_its_covariance():
    from evalfarm.errors import MetricInputError
    from evalfarm.metrics import frechet_distance

    mu, sigma = np.zeros(64), np.eye(32)
    with pytest.raises(MetricInputError, match="do not fit"):
        frechet_distance(mu, sigma, mu, sigma)


def test_merge_in_order_of_shard_statistics_equals_statistics_of_all_samples() -> None:
    rng = np.random.RandomState(31)
    x = pool3_like(rng, 90, 32).astype(np.float32)
    logits = logits_like(rng, 90)
    splits = split_assignment(90, 3, SEED)
    merged = merge_in_order(
        FeatureStats.of(x[lo:hi], logits[lo:hi], splits[lo:hi], 3) for lo, hi in ((0, 25), (25, 26), (26, 90))
    )
    whole = FeatureStats.of(x, logits, splits, 3)
    assert merged.n == 90
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-12)
    np.testing.assert_allclose(merged.cov(), whole.cov(), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(merged.features, x)
    np.testing.assert_allclose(inception_score(merged), inception_score(whole), rtol=1e-12)


def test_merge_of_statistics_without_features_holds_no_features() -> None:
    x = pool3_like(np.random.RandomState(32), 10, 8)
    merged = merge_in_order([FeatureStats.of(x, keep_features=False), FeatureStats.of(x, keep_features=False)])
    assert merged.features is None
