"""Merging shard partials in shard order and turning merged statistics into metric values."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from evalfarm import keys
from evalfarm.config import EvalConfig
from evalfarm.errors import MetricInputError
from evalfarm.metrics import (
    FeatureStats,
    SplitStats,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)
from evalfarm.pipeline.featurize import ShardOutput


@dataclass
class SideStats:
    """Everything the metrics need of one side (samples or reference)."""

    n: int
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None  # float32 (n, 2048), for KID
    split_stats: SplitStats | None = None  # samples only, for IS
    feature_stats: FeatureStats | None = None  # the merged sums, when this side was featurized

    @classmethod
    def from_partials(
        cls,
        feature_stats: Sequence[FeatureStats],
        split_stats: Sequence[SplitStats] = (),
        features: Sequence[np.ndarray] = (),
    ) -> SideStats:
        """Merge partials given in shard order; the order fixes float64 rounding, so it must not vary."""
        fs = _sum(feature_stats)
        if fs.n < 2:
            raise MetricInputError(f"at least 2 samples are needed for feature statistics; got {fs.n}.")
        return cls(
            n=fs.n,
            mu=fs.mean(),
            sigma=fs.cov(),
            features=np.concatenate(features) if features else None,
            split_stats=_sum(split_stats) if split_stats else None,
            feature_stats=fs,
        )


class SideMerge:
    """Sums shard outputs as they are read, in shard order, so memory holds one Gram at a time, not K."""

    def __init__(self, *, keep_features: bool) -> None:
        self.keep_features = keep_features
        self._fs: FeatureStats | None = None
        self._ss: SplitStats | None = None
        self._features: list[np.ndarray] = []

    def add(self, out: ShardOutput) -> None:
        self._fs = out.feature_stats if self._fs is None else self._fs + out.feature_stats
        if out.split_stats is not None:
            self._ss = out.split_stats if self._ss is None else self._ss + out.split_stats
        if self.keep_features:
            self._features.append(out.features)

    def result(self) -> SideStats:
        if self._fs is None:
            raise MetricInputError("no shard outputs to merge")
        return SideStats.from_partials([self._fs], [self._ss] if self._ss is not None else [], self._features)


def _sum(parts: Sequence):  # noqa: ANN202 - FeatureStats or SplitStats
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def kid_subset_size(config: EvalConfig, n_samples: int, n_reference: int) -> int:
    if config.kid_shrink:
        return min(config.kid_subset_size, n_samples, n_reference)
    return config.kid_subset_size


def compute_metrics(config: EvalConfig, samples: SideStats, reference: SideStats | None) -> dict[str, float]:
    out: dict[str, float] = {}
    if "is" in config.metrics:
        if samples.split_stats is None:
            raise MetricInputError("Inception Score needs the samples' logit statistics.")
        out[keys.KEY_IS_MEAN], out[keys.KEY_IS_STD] = inception_score(samples.split_stats)
    if config.needs_reference and reference is None:
        raise MetricInputError("FID and KID need a reference (--ref).")
    if "fid" in config.metrics:
        out[keys.KEY_FID] = frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma)
    if "kid" in config.metrics:
        if reference.features is None:
            raise MetricInputError(
                "KID needs the reference's features, but this reference holds only mu/sigma statistics "
                "(a pytorch-fid .npz). Use a sample set or a reference created with `evalfarm ref create`."
            )
        out[keys.KEY_KID_MEAN], out[keys.KEY_KID_STD] = kernel_inception_distance(
            samples.features,
            reference.features,
            subsets=config.kid_subsets,
            subset_size=kid_subset_size(config, samples.n, reference.n),
            seed=config.seed,
        )
    for k, v in out.items():
        if not np.isfinite(v):
            raise MetricInputError(f"{k} came out non-finite ({v}); refusing to report it.")
    return out
