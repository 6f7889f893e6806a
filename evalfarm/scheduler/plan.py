"""Planning: read each side once (count, content hash), decide how it is obtained, and cut it into shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evalfarm.config import EvalConfig
from evalfarm.errors import MetricInputError, SourceError
from evalfarm.metrics import check_kid_inputs
from evalfarm.references import check_compatible, is_stats_file, load_stats_file
from evalfarm.sources import open_source
from evalfarm.store import FeatureStore, reference_key

SAMPLES, REFERENCE = "samples", "reference"


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


@dataclass
class SidePlan:
    """How one side is obtained: featurized in shards, loaded from the store, or read from a stats file."""

    uri: str
    n: int
    content_hash: str | None
    how: str  # "shards" | "stored" | "stats_file"
    store_key: str | None = None
    shards: list[tuple[int, int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan_samples(uri: str, config: EvalConfig) -> SidePlan:
    source = open_source(uri)
    n = len(source)
    if "is" in config.metrics and n < config.splits:
        raise MetricInputError(
            f"Inception Score with {config.splits} splits needs at least {config.splits} samples; "
            f"{uri} has {n}. Pass --splits {n} or fewer."
        )
    return SidePlan(uri, n, source.content_hash(), "shards", shards=shard_ranges(n, config.shard_size))


def plan_reference(
    ref: str, config: EvalConfig, store: FeatureStore, weights_sha256: str, named: Any | None = None
) -> SidePlan:
    """`named` is a db Reference row when `ref` names one."""
    if named is not None:
        check_compatible(f"'{named.name}'", named.weights_sha256, named.resize, weights_sha256, config.resize)
        return SidePlan(named.uri, named.n, named.content_hash, "stored", store_key=named.store_key)
    if is_stats_file(ref):
        if "kid" in config.metrics:
            raise MetricInputError(
                f"{ref} holds only mu/sigma statistics; KID needs reference features. "
                "Drop kid from --metrics, or pass the reference images (or a reference made by `evalfarm ref create`)."
            )
        stats = load_stats_file(ref, weights_sha256, config.resize)
        return SidePlan(ref, stats.n, None, "stats_file")
    try:
        source = open_source(ref)
    except SourceError as exc:
        raise SourceError(f"--ref {ref!r} is neither a named reference nor a readable sample set: {exc}") from exc
    content_hash = source.content_hash()
    key = reference_key(content_hash, weights_sha256, config.resize)
    if config.cache and store.exists(key):
        return SidePlan(ref, len(source), content_hash, "stored", store_key=key)
    return SidePlan(ref, len(source), content_hash, "shards", store_key=key, shards=shard_ranges(len(source), config.shard_size))


def check_sizes(config: EvalConfig, samples: SidePlan, reference: SidePlan | None) -> None:
    """Fail before any featurization when the sizes cannot give the requested metrics."""
    if "kid" in config.metrics and reference is not None and not config.kid_shrink:
        check_kid_inputs(samples.n, reference.n, config.kid_subset_size)
    if config.needs_reference and samples.n < 2:
        raise MetricInputError(f"FID/KID need at least 2 samples; {samples.uri} has {samples.n}.")
