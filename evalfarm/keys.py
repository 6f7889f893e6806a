"""Names shared across the tree. Metric keys are torch-fidelity's, so tooling written for it reads our JSON
unchanged."""

from __future__ import annotations

KEY_IS_MEAN = "inception_score_mean"
KEY_IS_STD = "inception_score_std"
KEY_FID = "frechet_inception_distance"
KEY_KID_MEAN = "kernel_inception_distance_mean"
KEY_KID_STD = "kernel_inception_distance_std"

KEY_PRECISION = "precision"
KEY_RECALL = "recall"
KEY_F_SCORE = "f_score"

#: the keys of the default metrics (IS, FID, KID), and of every metric
METRIC_KEYS = (KEY_IS_MEAN, KEY_IS_STD, KEY_FID, KEY_KID_MEAN, KEY_KID_STD)
ALL_METRIC_KEYS = (*METRIC_KEYS, KEY_PRECISION, KEY_RECALL, KEY_F_SCORE)
#: the keys each metric reports (torch-fidelity's names)
KEYS_OF_METRIC: dict[str, tuple[str, ...]] = {
    "is": (KEY_IS_MEAN, KEY_IS_STD),
    "fid": (KEY_FID,),
    "kid": (KEY_KID_MEAN, KEY_KID_STD),
    "prc": (KEY_PRECISION, KEY_RECALL, KEY_F_SCORE),
}

#: `--extractor` names, torch-fidelity 0.4.0's (the table with their networks is `evalfarm.models.extractors`;
#: kept here so that configs validate without importing torch)
INCEPTION = "inception-v3-compat"
VGG16 = "vgg16"
EXTRACTOR_NAMES = (
    INCEPTION,
    "dinov2-vit-s-14",
    "dinov2-vit-b-14",
    "dinov2-vit-l-14",
    "dinov2-vit-g-14",
    "clip-vit-b-32",
    "clip-vit-b-16",
    "clip-vit-l-14",
    "clip-vit-l-14-336px",
    VGG16,
)
#: torch-fidelity's extractor for each metric when none is named: Inception, and VGG16 for precision/recall
DEFAULT_EXTRACTOR = {"is": INCEPTION, "fid": INCEPTION, "kid": INCEPTION, "prc": VGG16}


def weights_env_var(extractor: str) -> str:
    """Where a machine is told the local weight file of an extractor: EVALFARM_WEIGHTS for Inception,
    EVALFARM_WEIGHTS_DINOV2_VIT_L_14 for dinov2-vit-l-14, and so on."""
    return "EVALFARM_WEIGHTS" if extractor == INCEPTION else "EVALFARM_WEIGHTS_" + extractor.upper().replace("-", "_")


def qualified_key(key: str, extractor: str) -> str:
    """A result's name in the results database: torch-fidelity's key when computed on its default extractor for
    that metric, else `key@extractor`, so that a run's history never mixes features of two networks."""
    metric = next(m for m, ks in KEYS_OF_METRIC.items() if key in ks)
    return key if DEFAULT_EXTRACTOR[metric] == extractor else f"{key}@{extractor}"


def split_qualified(name: str) -> tuple[str, str]:
    """(torch-fidelity key, extractor) of a results-database name."""
    key, _, extractor = name.partition("@")
    if not extractor:
        metric = next((m for m, ks in KEYS_OF_METRIC.items() if key in ks), "fid")
        extractor = DEFAULT_EXTRACTOR[metric]
    return key, extractor
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
