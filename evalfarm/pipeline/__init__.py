"""The work itself, shared by the embedded runner and the farm's tasks: featurize a range, merge, compute."""

from evalfarm.pipeline.featurize import featurize_extractors, featurize_range
from evalfarm.pipeline.reduce import compute_metrics, kid_subset_size, merge_in_order

__all__ = ["compute_metrics", "featurize_extractors", "featurize_range", "kid_subset_size", "merge_in_order"]
