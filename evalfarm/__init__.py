"""evalfarm: IS, FID and KID for large sample sets, sharded, mergeable, and equal to torch-fidelity.

    >>> import evalfarm
    >>> result = evalfarm.evaluate("samples.npz", ref="reference/", metrics=("is", "fid", "kid"))
    >>> result[evalfarm.KEY_FID]
"""

from __future__ import annotations

from typing import Any

from evalfarm._version import __version__
from evalfarm.config import EvalConfig
from evalfarm.errors import (
    Conflict,
    EvalfarmError,
    InvalidField,
    JobError,
    JobNotFound,
    MetricInputError,
    NotAllowed,
    ReferenceMismatchError,
    SourceError,
    WeightsError,
)
from evalfarm.keys import KEY_FID, KEY_IS_MEAN, KEY_IS_STD, KEY_KID_MEAN, KEY_KID_STD
from evalfarm.settings import Settings, get_settings


def evaluate(
    samples: str,
    ref: str | None = None,
    *,
    config: EvalConfig | None = None,
    weights: str | None = None,
    extractor_weights: dict[str, str] | None = None,
    device: str | None = None,
    settings: Settings | None = None,
    progress: bool = False,
    **config_fields: Any,
) -> dict[str, Any]:
    """Run a whole evaluation on this machine (embedded mode) and return the result document.

    `config_fields` are `EvalConfig` fields (metrics, extractors, splits, kid_subset_size, ...), as the CLI flags.
    `weights` is Inception's weight file, `extractor_weights` maps other extractors to theirs.
    """
    from evalfarm.config import default_metrics
    from evalfarm.scheduler.embedded import run_embedded

    if "extractors" in config_fields and config is None and "metrics" not in config_fields:
        config_fields["metrics"] = default_metrics(EvalConfig(metrics=(), extractors=config_fields["extractors"]).extractors)
    cfg = (config or EvalConfig()).with_(**config_fields)
    return run_embedded(samples, ref, cfg, settings=settings, weights=weights, extractor_weights=extractor_weights,
                        device=device, progress=progress)


__all__ = [
    "KEY_FID",
    "KEY_IS_MEAN",
    "KEY_IS_STD",
    "KEY_KID_MEAN",
    "KEY_KID_STD",
    "Conflict",
    "EvalConfig",
    "EvalfarmError",
    "InvalidField",
    "JobError",
    "JobNotFound",
    "MetricInputError",
    "NotAllowed",
    "ReferenceMismatchError",
    "Settings",
    "SourceError",
    "WeightsError",
    "__version__",
    "evaluate",
    "get_settings",
]
