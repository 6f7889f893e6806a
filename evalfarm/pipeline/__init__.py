"""The work itself, shared by the embedded runner and the farm's tasks: featurize a range, reduce partials."""

from evalfarm.pipeline.featurize import ShardOutput, featurize_range
from evalfarm.pipeline.reduce import SideMerge, SideStats, compute_metrics, kid_subset_size

__all__ = ["ShardOutput", "SideMerge", "SideStats", "compute_metrics", "featurize_range", "kid_subset_size"]
