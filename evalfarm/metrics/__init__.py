"""Pure metric math: no I/O, no services. Shards produce partials; the reducer calls these."""

from evalfarm.metrics.fid import frechet_distance, trace_sqrt_product
from evalfarm.metrics.inception_score import inception_score, split_assignment
from evalfarm.metrics.kid import check_kid_inputs, kernel_inception_distance
from evalfarm.metrics.stats import FeatureStats

__all__ = [
    "FeatureStats",
    "check_kid_inputs",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "split_assignment",
    "trace_sqrt_product",
]
