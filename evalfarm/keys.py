"""Names shared across the tree. Metric keys are torch-fidelity's, so tooling written for it reads our JSON
unchanged."""

from __future__ import annotations

KEY_IS_MEAN = "inception_score_mean"
KEY_IS_STD = "inception_score_std"
KEY_FID = "frechet_inception_distance"
KEY_KID_MEAN = "kernel_inception_distance_mean"
KEY_KID_STD = "kernel_inception_distance_std"

METRIC_KEYS = (KEY_IS_MEAN, KEY_IS_STD, KEY_FID, KEY_KID_MEAN, KEY_KID_STD)
#: short names accepted by `evalfarm results --metric`
METRIC_ALIASES = {"is": KEY_IS_MEAN, "fid": KEY_FID, "kid": KEY_KID_MEAN}

#: job kinds: evaluate a sample set, or featurize one and register it as a named reference
JOB_EVAL, JOB_REFERENCE = "eval", "reference"

#: the first hex digits of the canonical FID-Inception file's SHA-256 (its name carries them, torch.hub style);
#: results from any other weights are not comparable to published numbers
CANONICAL_INCEPTION_SHA256_PREFIX = "6726825d"


def is_canonical_inception(weights_sha256: str | None) -> bool:
    """Whether numbers computed with these weights are publishable FID/IS/KID values."""
    return bool(weights_sha256) and weights_sha256.startswith(CANONICAL_INCEPTION_SHA256_PREFIX)

#: a metric's family as users name it (`--metric fid`): its value key and, where there is one, its std key
METRIC_FAMILIES: dict[str, tuple[str, str | None]] = {
    "is": (KEY_IS_MEAN, KEY_IS_STD),
    "fid": (KEY_FID, None),
    "kid": (KEY_KID_MEAN, KEY_KID_STD),
}
#: how plots and the dashboard label each family
METRIC_LABELS = {"is": "Inception Score", "fid": "FID", "kid": "KID"}
