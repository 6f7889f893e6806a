"""Fréchet Inception Distance from means and covariances.

tr((Σ1 Σ2)^½) is the sum of the square roots of the eigenvalues of Σ1 Σ2, the general route torch-fidelity
takes. With Σ = L Lᵀ (Cholesky), Σ1 Σ2 is similar to the symmetric PSD matrix Lᵀ Σ2 L, so one Cholesky, two
triangular products and one values-only `eigvalsh` replace scipy's `sqrtm` (about 20× faster at d = 2048;
`sqrtm` is slow on CPU, warns about complex parts, and its `disp` argument is gone in SciPy 1.18). When neither
covariance is positive definite (fewer samples than dimensions), Σ1^½ comes from `eigh` instead.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from evalfarm.errors import MetricInputError


def _sum_sqrt_eigvalsh(m: np.ndarray) -> float:
    w = scipy.linalg.eigvalsh(m, overwrite_a=True, check_finite=False, driver="evd")
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def _cholesky_route(spd: np.ndarray, other: np.ndarray) -> float:
    """Raises LinAlgError when `spd` is not numerically positive definite."""
    low = scipy.linalg.cholesky(spd, lower=True, check_finite=False)
    trmm = scipy.linalg.blas.get_blas_funcs("trmm", (low,))
    m = trmm(1.0, low, other, side=0, lower=1, trans_a=1)  # Lᵀ Σ
    m = trmm(1.0, low, m, side=1, lower=1, overwrite_b=1)  # Lᵀ Σ L
    return _sum_sqrt_eigvalsh(m)


def _eigh_route(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    w, v = np.linalg.eigh(sigma1)
    s1h = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1h @ sigma2 @ s1h
    return _sum_sqrt_eigvalsh((m + m.T) / 2)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(Σ1 Σ2)) for symmetric PSD Σ1, Σ2."""
    sigma1 = np.asarray(sigma1, np.float64)
    sigma2 = np.asarray(sigma2, np.float64)
    # Σ1 Σ2 and Σ2 Σ1 share their eigenvalues, so either side may carry the factorization.
    for spd, other in ((sigma1, sigma2), (sigma2, sigma1)):
        try:
            return _cholesky_route(spd, other)
        except np.linalg.LinAlgError:
            continue
    return _eigh_route(sigma1, sigma2)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    if (
        mu1.shape != mu2.shape
        or sigma1.shape != sigma2.shape
        or sigma1.shape != (mu1.shape[-1], mu1.shape[-1])
    ):
        raise MetricInputError(f"statistics do not fit together: mu {mu1.shape} and {mu2.shape}, sigma {sigma1.shape} and {sigma2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.all(np.isfinite(a)):
            raise MetricInputError(f"FID statistics contain non-finite values ({name}).")
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))
