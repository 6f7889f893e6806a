"""Inception Score over splits, from mergeable split statistics.

Split membership reproduces torch-fidelity: samples are permuted by `RandomState(seed).permutation(N)`
and split i holds permuted rows [i*N//S, (i+1)*N//S). The scheduler assigns each sample its split up
front, so shards can accumulate per-split sums independently.
"""

from __future__ import annotations

import numpy as np

from evalfarm.errors import MetricInputError
from evalfarm.metrics.stats import FeatureStats


def split_assignment(n: int, splits: int, seed: int) -> np.ndarray:
    """Split id of every sample, by its original index."""
    if n < splits:
        raise MetricInputError(f"Inception Score needs at least {splits} samples for {splits} splits; got {n}.")
    position = np.empty(n, np.int64)
    position[np.random.RandomState(seed).permutation(n)] = np.arange(n)
    bounds = np.array([(i * n) // splits for i in range(splits + 1)])
    return np.searchsorted(bounds, position, side="right") - 1


def inception_score(stats: FeatureStats) -> tuple[float, float]:
    """(mean, std) over the splits of the samples' statistics; std with ddof 0 as torch-fidelity reports it."""
    if not stats.has_splits:
        raise MetricInputError("Inception Score needs the samples' logit statistics.")
    if np.any(stats.split_n == 0):
        raise MetricInputError("an Inception Score split is empty: there are fewer samples than splits.")
    q = stats.split_p / stats.split_n[:, None]
    qlogq = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(axis=1)
    kl = stats.split_plogp / stats.split_n - qlogq
    scores = np.exp(kl)
    return float(np.mean(scores)), float(np.std(scores))
