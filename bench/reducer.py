"""Section 2: the reducer's math on synthetic features (no network, no services).

- merging K shard partials (FID sums and IS split sums) as the reducer does (`merge_in_order`, streaming);
- tr((Σ1Σ2)^½) by evalfarm's Cholesky + `eigvalsh` route vs `scipy.linalg.sqrtm` (pytorch-fid's route) and vs
  torch-fidelity's `eigvals(Σ1Σ2)`, on full-rank 2048x2048 covariances;
- KID (100 subsets of 1000) on N x 2048 float32 features, evalfarm (float32 products, float64 kernel sums)
  vs torch-fidelity (float32 kernels).
Peak RSS is reset before each step (Linux `clear_refs`) so each figure is that step's own peak.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from common import (
    Report,
    current_rss_mib,
    peak_rss_mib,
    relative_difference,
    reset_peak_rss,
    section_header,
    timed,
)

DIM = 2048
SPLITS, CLASSES = 10, 1008
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020


def feature_model(seed: int, n: int, scale_jitter: float) -> np.ndarray:
    """Features with a power-law spectrum in a random basis: full rank, like pool3 covariances of real sets."""
    rng = np.random.default_rng(0)  # the same basis for both sides, so their covariances are related
    basis, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    own = np.random.default_rng(seed)
    scales = np.arange(1, DIM + 1) ** -0.5 * (1 + scale_jitter * own.random(DIM))
    z = own.standard_normal((n, DIM)) * scales
    return (z @ basis.T + own.random(DIM)).astype(np.float32)


def base_partials(seed: int, scale_jitter: float) -> object:
    """One shard's statistics: FID sums of 2x2048 feature rows (full rank) and IS split sums, no rows kept."""
    from evalfarm.metrics import FeatureStats

    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((2 * DIM, CLASSES)) * 3
    return FeatureStats.of(feature_model(seed, 2 * DIM, scale_jitter), logits, rng.integers(0, SPLITS, 2 * DIM),
                           SPLITS, keep_features=False)


def step_start() -> float:
    """Reset the peak and return the RSS a step starts from (what the process already holds)."""
    reset_peak_rss()
    return current_rss_mib()


def report_peak(report: Report, prefix: str, start_mib: float) -> None:
    peak = peak_rss_mib()
    report.figure(f"{prefix}.peak_rss_mib", peak, "MiB")
    report.figure(f"{prefix}.peak_over_start_mib", peak - start_mib, "MiB")


def bench_merge(report: Report, ks: tuple[int, ...]) -> tuple[object, object]:
    """Time the reducer's streaming merge (`merge_in_order`, as `reduce_job` uses it) of K partials read from disk."""
    from evalfarm.metrics import FeatureStats
    from evalfarm.pipeline import merge_in_order

    part = base_partials(seed=1, scale_jitter=0.0)
    merged = None
    with tempfile.TemporaryDirectory() as tmp:
        stats_file = Path(tmp) / "stats.npz"
        stats_file.write_bytes(part.to_bytes())
        for k in ks:
            start = step_start()
            with timed() as t:
                # each shard's statistics are a fresh read and decode, as the partial store returns them
                merged = merge_in_order(FeatureStats.from_bytes(stats_file.read_bytes()) for _ in range(k))
            report.figure(f"reducer.merge.K{k}.seconds", t[0], "s")
            report_peak(report, f"reducer.merge.K{k}", start)
    report.note("merge reads each shard's 32 MiB Gram from disk (page cache) and sums it at once: peak flat in K")
    return merged, base_partials(seed=2, scale_jitter=0.5)


def fid_by_sqrtm(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """pytorch-fid's route without its `disp` argument (deprecated in SciPy 1.16, gone in 1.18)."""
    from scipy.linalg import sqrtm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def fid_by_eigvals(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """torch-fidelity 0.4.0's route: eigenvalues of the non-symmetric product."""
    diff = mu1 - mu2
    tr = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).astype("complex128")).real)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr)


def bench_fid(report: Report, a: object, b: object, repeats: int) -> None:
    """Best of `repeats` per route; the eigen route runs `repeats` times before and after sqrtm."""
    from evalfarm.metrics import frechet_distance

    args = (a.mean(), a.cov(), b.mean(), b.cov())
    times: list[float] = []

    def eigen() -> float:
        t0 = time.perf_counter()
        value = frechet_distance(*args)
        times.append(time.perf_counter() - t0)
        return value

    # Before and after sqrtm: a load change on a shared machine during the long sqrtm runs favours neither.
    for _ in range(repeats):
        fid_eigen = eigen()
    t_sqrtm = float("inf")
    for _ in range(repeats):
        with timed() as t:
            fid_sqrtm = fid_by_sqrtm(*args)
        t_sqrtm = min(t_sqrtm, t[0])
    for _ in range(repeats):
        eigen()
    t_eigen = min(times)
    report.figure("reducer.fid.eigen_seconds", t_eigen, "s")
    report.figure("reducer.fid.sqrtm_seconds", t_sqrtm, "s")
    report.figure("reducer.fid.speedup_eigen_over_sqrtm", t_sqrtm / t_eigen, "x")
    report.figure("reducer.fid.rel_diff_eigen_vs_sqrtm", relative_difference(fid_eigen, fid_sqrtm))
    with timed() as t:
        fid_eigvals = fid_by_eigvals(*args)
    report.figure("reducer.fid.torch_fidelity_eigvals_seconds", t[0], "s")
    report.figure("reducer.fid.speedup_eigen_over_torch_fidelity_eigvals", t[0] / t_eigen, "x")
    report.note("eigvals (torch-fidelity's route) runs once, after the eigen runs")
    report.figure("reducer.fid.rel_diff_eigen_vs_eigvals", relative_difference(fid_eigen, fid_eigvals))
    report.figure("reducer.fid.value", fid_eigen)


def bench_kid(report: Report, n: int) -> None:
    import torch
    from torch_fidelity.metric_kid import kid_features_to_metric

    from evalfarm.metrics import kernel_inception_distance

    rng = np.random.default_rng(3)
    f1 = np.abs(rng.standard_normal((n, DIM), dtype=np.float32))
    f2 = np.abs(rng.standard_normal((n, DIM), dtype=np.float32)) * np.float32(1.05)
    start = step_start()
    with timed() as t_ours:
        ours = kernel_inception_distance(f1, f2, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=KID_SEED)
    report.figure(f"reducer.kid.N{n}.evalfarm_seconds", t_ours[0], "s")
    report_peak(report, f"reducer.kid.N{n}", start)
    with timed() as t_theirs:
        theirs = kid_features_to_metric(
            torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=KID_SUBSETS, kid_subset_size=KID_SUBSET_SIZE,
            rng_seed=KID_SEED, verbose=False,
        )
    report.figure(f"reducer.kid.N{n}.torch_fidelity_seconds", t_theirs[0], "s")
    report.figure(f"reducer.kid.N{n}.speedup_evalfarm_over_torch_fidelity", t_theirs[0] / t_ours[0], "x")
    report.figure(f"reducer.kid.N{n}.rel_diff_mean_vs_torch_fidelity",
                  relative_difference(ours[0], theirs["kernel_inception_distance_mean"]))


def run(report: Report, *, quick: bool) -> None:
    section_header("2. reducer: partial merge, FID eigen vs sqrtm, KID (synthetic features)")
    ks = (10, 100)
    kid_n = 5000 if quick else 50000
    report.note(f"merge K in {ks} partials of d={DIM}; FID on full-rank covariances; KID {KID_SUBSETS} subsets of "
                f"{KID_SUBSET_SIZE} on N={kid_n}")
    a, b = bench_merge(report, ks)
    start = step_start()
    bench_fid(report, a, b, repeats=1 if quick else 2)
    report_peak(report, "reducer.fid", start)
    bench_kid(report, kid_n)
