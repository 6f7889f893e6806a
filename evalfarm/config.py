"""How a job computes its metrics: one defaults table, mirrored by the CLI flags and stored with the job."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

METRICS = ("is", "fid", "kid")
RESIZE_MODES = ("tf", "clean")  #: tf: TF1 bilinear (torch-fidelity); clean: PIL bicubic (clean-fid)
DEFAULT_SEED = 2020  #: torch-fidelity's rng_seed: IS split shuffling and KID subset draws
DEFAULT_SHARD_SIZE = 5000  #: ~minutes per shard on one GPU; keeps redelivery cheap and partials few


@dataclass(frozen=True)
class EvalConfig:
    metrics: tuple[str, ...] = ("is", "fid", "kid")
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

    def __post_init__(self) -> None:
        unknown = set(self.metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"metrics must be a non-empty subset of {','.join(METRICS)}; got {self.metrics}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}; got {self.resize!r}")
        for name in ("splits", "kid_subsets", "kid_subset_size", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.seed < 2**32:  # numpy's RandomState, which draws IS splits and KID subsets
            raise ValueError(f"seed must be in [0, 2**32); got {self.seed}")

    @property
    def needs_reference(self) -> bool:
        return "fid" in self.metrics or "kid" in self.metrics

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = list(self.metrics)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        d = dict(d)
        d["metrics"] = tuple(d.get("metrics", METRICS))
        return cls(**d)

    def with_(self, **changes: Any) -> EvalConfig:
        return replace(self, **changes)


def parse_metrics(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))
    EvalConfig(metrics=names)  # validates
    return names
