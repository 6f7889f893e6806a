"""How a job computes its metrics: one defaults table, mirrored by the CLI flags and stored with the job."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from evalfarm.keys import DEFAULT_EXTRACTOR, EXTRACTOR_NAMES, INCEPTION

METRICS = ("is", "fid", "kid", "prc")
DEFAULT_METRICS = ("is", "fid", "kid")
PRC_NEIGHBORHOOD = 3  #: torch-fidelity's `prc_neighborhood`
PRC_BLOCK = 10000  #: torch-fidelity's `prc_batch_size`: the distance block (see `evalfarm.metrics.prc`)
#: fields added after jobs were first stored: left out of `to_dict` at their defaults, so that a request's
#: digest (idempotency keys) and a stored job's config read the same as before they existed
_LATER_FIELDS = {"extractors": (), "prc_neighborhood": PRC_NEIGHBORHOOD, "prc_block": PRC_BLOCK, "prc_tile": PRC_BLOCK}
RESIZE_MODES = ("tf", "clean")  #: tf: TF1 bilinear (torch-fidelity); clean: PIL bicubic (clean-fid)
DEFAULT_SEED = 2020  #: torch-fidelity's rng_seed: IS split shuffling and KID subset draws
DEFAULT_SHARD_SIZE = 5000  #: ~minutes per shard on one GPU; keeps redelivery cheap and partials few


@dataclass(frozen=True)
class EvalConfig:
    metrics: tuple[str, ...] = DEFAULT_METRICS
    splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    kid_shrink: bool = False
    """Use min(kid_subset_size, n_samples, n_reference) instead of failing when a set is small."""
    seed: int = DEFAULT_SEED
    resize: str = "tf"
    batch_size: int = 64
    shard_size: int = DEFAULT_SHARD_SIZE
    precision: str = "fp32"
    cache: bool = True
    """Reuse and store reference statistics keyed by content hash, weights and resize mode."""
    extra: dict[str, Any] = field(default_factory=dict)
    extractors: tuple[str, ...] = ()
    """Feature extractors for FID, KID and PRC (IS is Inception's alone). Empty: torch-fidelity's defaults,
    FID-InceptionV3 for IS, FID and KID and VGG16 for PRC."""
    prc_neighborhood: int = PRC_NEIGHBORHOOD
    prc_block: int = PRC_BLOCK
    """Distances are computed in blocks of this many rows and columns. At torch-fidelity's 10000 they are its
    own, bit for bit; another block changes a distance by float32 rounding (a pair right at a radius may flip)."""
    prc_tile: int = PRC_BLOCK
    """Rows and columns of one precision/recall task on the farm (a multiple of the block): its memory bound.
    Results do not depend on it."""

    def __post_init__(self) -> None:
        for name in ("metrics", "extractors"):  # "fid,kid" and lists, as callers of the Python API pass them
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(v.strip().lower() for v in value.split(",") if v.strip())
            object.__setattr__(self, name, tuple(value))
        unknown = set(self.metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"metrics must be a non-empty subset of {','.join(METRICS)}; got {self.metrics}")
        bad = [e for e in self.extractors if e not in EXTRACTOR_NAMES]
        if bad:
            raise ValueError(f"unknown extractor {bad[0]!r}; choose from {', '.join(EXTRACTOR_NAMES)}")
        if len(set(self.extractors)) != len(self.extractors):
            raise ValueError(f"extractors are named twice: {','.join(self.extractors)}")
        if "is" in self.metrics and self.extractors and INCEPTION not in self.extractors:
            raise ValueError(
                f"the Inception Score is defined on {INCEPTION}'s logits only; add {INCEPTION} to the extractors "
                "or drop is from the metrics"
            )
        unused = [e for e in self.extractors if e not in self.featurizers]
        if unused:
            raise ValueError(f"no requested metric uses {', '.join(unused)}: --extractor applies to fid, kid and prc "
                             f"(the metrics here are {','.join(self.metrics)})")
        others = [e for e in self.featurizers if e != INCEPTION]
        if others and self.resize != "tf":
            raise ValueError(f"--resize {self.resize} applies to {INCEPTION} only; {others[0]} resizes as "
                             "torch-fidelity does (TF1 bilinear)")
        if others and self.precision != "fp32":
            raise ValueError(f"--precision {self.precision} applies to {INCEPTION} only; {others[0]} runs in fp32")
        if isinstance(self.prc_neighborhood, bool) or self.prc_neighborhood < 1:
            raise ValueError(f"prc_neighborhood must be a positive integer; got {self.prc_neighborhood!r}")
        if self.prc_block < 1 or self.prc_tile < 1 or self.prc_tile % self.prc_block:
            raise ValueError(f"prc_tile must be a positive multiple of prc_block ({self.prc_block}); got {self.prc_tile}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}; got {self.resize!r}")
        for name in ("splits", "kid_subsets", "kid_subset_size", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.seed < 2**32:  # numpy's RandomState, which draws IS splits and KID subsets
            raise ValueError(f"seed must be in [0, 2**32); got {self.seed}")

    @property
    def needs_reference(self) -> bool:
        return any(m in self.metrics for m in ("fid", "kid", "prc"))

    def extractors_for(self, metric: str) -> tuple[str, ...]:
        """The extractors `metric` is computed on, the first being the one reported under torch-fidelity's key."""
        if metric not in self.metrics:
            return ()
        if metric == "is" or not self.extractors:
            return (DEFAULT_EXTRACTOR[metric],)
        return self.extractors

    @property
    def featurizers(self) -> tuple[str, ...]:
        """Every extractor a shard runs, in a fixed order: each metric's, first come first. With no metrics (a job
        that creates a reference), the named extractors, or Inception."""
        if not self.metrics:
            return self.extractors or (INCEPTION,)
        return tuple(dict.fromkeys(e for m in METRICS for e in self.extractors_for(m)))

    def metrics_on(self, extractor: str) -> tuple[str, ...]:
        return tuple(m for m in METRICS if extractor in self.extractors_for(m))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = list(self.metrics)
        for name, default in _LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        if "extractors" in d:
            d["extractors"] = list(self.extractors)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        d = dict(d)
        d["metrics"] = tuple(d.get("metrics", DEFAULT_METRICS))
        d["extractors"] = tuple(d.get("extractors", ()))
        return cls(**d)

    def with_(self, **changes: Any) -> EvalConfig:
        return replace(self, **changes)


def parse_metrics(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))
    EvalConfig(metrics=names)  # validates
    return names


def default_metrics(extractors: tuple[str, ...]) -> tuple[str, ...]:
    """IS, FID and KID; FID and KID when the extractors named leave out Inception, whose logits IS needs."""
    return DEFAULT_METRICS if not extractors or INCEPTION in extractors else ("fid", "kid")


def parse_extractors(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(e.strip().lower() for e in text.split(",") if e.strip()))
    EvalConfig(metrics=("fid",), extractors=names)  # validates
    return names
