"""Fréchet Inception Distance from means and covariances.

tr((Σ1 Σ2)^½) is computed as Σ sqrt(eig(Σ1^½ Σ2 Σ1^½)): both matrices are symmetric PSD, so two `eigh`
calls replace scipy's `sqrtm` (slow on CPU, complex warnings, and its `disp` argument is gone in SciPy 1.18).
The eigenvalues equal those of Σ1 Σ2, the general route torch-fidelity takes.
"""

from __future__ import annotations

import numpy as np

from evalfarm.errors import MetricInputError


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(Σ1 Σ2)) for symmetric PSD Σ1, Σ2."""
    s1h = _psd_sqrt(sigma1)
    m = s1h @ sigma2 @ s1h
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


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
