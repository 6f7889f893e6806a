"""Merging shard statistics in shard order, and turning a side's statistics into metric values."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from evalfarm import keys
from evalfarm.config import EvalConfig
from evalfarm.errors import MetricInputError
from evalfarm.metrics import FeatureStats, frechet_distance, inception_score, kernel_inception_distance
from evalfarm.metrics.prc import precision_recall


def merge_in_order(parts: Iterable[FeatureStats]) -> FeatureStats:
    """Sum shard statistics as they arrive, in shard order: the order fixes float64 rounding, so it must
    not vary, and memory holds the running sum and one part at a time, not all K."""
    total: FeatureStats | None = None
    for part in parts:
        total = part if total is None else total + part
    if total is None:
        raise MetricInputError("no shard statistics to merge")
    if total.n < 2:
        raise MetricInputError(f"at least 2 samples are needed for feature statistics; got {total.n}.")
    return total


def kid_subset_size(config: EvalConfig, n_samples: int, n_reference: int) -> int:
    if config.kid_shrink:
        return min(config.kid_subset_size, n_samples, n_reference)
    return config.kid_subset_size


def compute_metrics(
    config: EvalConfig,
    samples: FeatureStats,
    reference: FeatureStats | None,
    extractor: str = keys.INCEPTION,
    *,
    prc: dict[str, float] | None = None,
) -> dict[str, float]:
    """The metrics `config` computes on `extractor`'s features of both sides, under torch-fidelity's keys.
    `prc`: precision/recall computed already (by tiles); without it, it is computed here, tile by tile."""
    metrics = config.metrics_on(extractor)
    out: dict[str, float] = {}
    if "is" in metrics:
        out[keys.KEY_IS_MEAN], out[keys.KEY_IS_STD] = inception_score(samples)
    if any(m in metrics for m in ("fid", "kid", "prc")) and reference is None:
        raise MetricInputError("FID, KID and PRC need a reference (--ref).")
    if "fid" in metrics:
        out[keys.KEY_FID] = frechet_distance(samples.mean(), samples.cov(), reference.mean(), reference.cov())
    if "kid" in metrics:
        if reference.rows is None:
            raise MetricInputError(
                "KID needs the reference's features, but this reference holds only mu/sigma statistics "
                "(a pytorch-fid .npz). Use a sample set or a reference created with `evalfarm ref create`."
            )
        out[keys.KEY_KID_MEAN], out[keys.KEY_KID_STD] = kernel_inception_distance(
            samples.rows,
            reference.rows,
            subsets=config.kid_subsets,
            subset_size=kid_subset_size(config, samples.n, reference.n),
            seed=config.seed,
        )
    if "prc" in metrics:
        if reference.rows is None:
            raise MetricInputError(
                "precision/recall needs the reference's features, but this reference holds only mu/sigma statistics."
            )
        out.update(prc if prc is not None else precision_recall(
            samples.features, reference.features, neighborhood=config.prc_neighborhood, tile=config.prc_tile,
            block=config.prc_block))
    for k, v in out.items():
        if not np.isfinite(v):
            raise MetricInputError(f"{k} came out non-finite ({v}); refusing to report it.")
    return out
