"""Kernel Inception Distance: unbiased MMD² with the cubic polynomial kernel over random subsets.

Subsets are drawn exactly as torch-fidelity draws them: one `RandomState(seed)`, and per subset first
`choice(n1, m, replace=False)` then `choice(n2, m, replace=False)`. Feature products are float32 like
torch-fidelity's; the kernel's cube and the MMD sums are float64, which only removes rounding.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from evalfarm.errors import MetricInputError
from evalfarm.metrics.rows import Rows, rows_at


def _kernel(a: np.ndarray, b: np.ndarray, gamma: float, coef0: float, degree: int) -> np.ndarray:
    # The products run in the features' dtype (float32: fast BLAS, as torch-fidelity computes them);
    # the power and the sums, where cancellation happens, run in float64. The power is repeated
    # multiplication: `** 3` on a float64 array calls pow() per element and costs as much as the product.
    if degree < 1:
        raise ValueError(f"polynomial kernel degree must be at least 1; got {degree}")
    base = (a @ b.T).astype(np.float64)
    base *= gamma
    base += coef0
    k = base.copy()
    for _ in range(degree - 1):
        k *= base
    return k


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    m, d = x.shape
    gamma = 1.0 / d
    k_xx = _kernel(x, x, gamma, coef0, degree)
    k_yy = _kernel(y, y, gamma, coef0, degree)
    k_xy = _kernel(x, y, gamma, coef0, degree)
    off_xx = k_xx.sum() - np.trace(k_xx)
    off_yy = k_yy.sum() - np.trace(k_yy)
    return float((off_xx + off_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def check_kid_inputs(n1: int, n2: int, subset_size: int) -> None:
    if subset_size < 2:
        raise MetricInputError(f"KID subset size must be at least 2; got {subset_size}.")
    if n1 < subset_size or n2 < subset_size:
        raise MetricInputError(
            f"KID subset size {subset_size} is larger than the number of samples "
            f"(samples: {n1}, reference: {n2}). Pass --kid-subset-size {min(n1, n2)} or smaller, "
            f"or --kid-shrink to use the largest size the sets allow."
        )


def kid_draws(n1: int, n2: int, *, subsets: int, subset_size: int,
              seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each subset's rows of both sides, as torch-fidelity draws them. A draw of n rows permutes all n (legacy
    `choice` without replacement): 34 ms at a million rows, 7 s for 100 subsets of both sides."""
    check_kid_inputs(n1, n2, subset_size)
    rng = np.random.RandomState(seed)
    for _ in range(subsets):
        a = rng.choice(n1, subset_size, replace=False)
        yield a, rng.choice(n2, subset_size, replace=False)


def drawn_rows(n1: int, n2: int, *, subsets: int, subset_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row KID will read of each side, sorted: about 10 % of a million samples at 100 × 1000."""
    ones, twos = zip(*kid_draws(n1, n2, subsets=subsets, subset_size=subset_size, seed=seed), strict=True)
    return np.unique(np.concatenate(ones)), np.unique(np.concatenate(twos))


def kernel_inception_distance(
    features1: Rows, features2: Rows, *, subsets: int, subset_size: int, seed: int
) -> tuple[float, float]:
    """(mean, std) of MMD² over subsets; std with ddof 0 as torch-fidelity reports it. Only the rows a subset
    draws are read, so the features may stay in their files, and a side may hold only those rows
    (`metrics.rows`)."""
    mmds = np.empty(subsets)
    draws = kid_draws(len(features1), len(features2), subsets=subsets, subset_size=subset_size, seed=seed)
    for i, (a, b) in enumerate(draws):
        mmds[i] = polynomial_mmd2(rows_at(features1, a), rows_at(features2, b))
    return float(np.mean(mmds)), float(np.std(mmds))
