"""The plan of a job: how each side is obtained, and its shards. Decided once, at planning, and stored.

Planning reads each side once (count, content hash). A side is featurized in shards, loaded from the
feature store (a named or cached reference), or read from a pytorch-fid statistics file.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from evalfarm.config import EvalConfig
from evalfarm.errors import MetricInputError, ReferenceMismatchError, SourceError
from evalfarm.keys import INCEPTION
from evalfarm.metrics import check_kid_inputs
from evalfarm.scheduler.references import (
    NamedReference,
    check_compatible,
    is_stats_file,
    load_stats_file,
    reference_key,
)
from evalfarm.scheduler.store import FeatureStore
from evalfarm.sources import SampleRoots, Source, open_source

log = logging.getLogger(__name__)

SAMPLES, REFERENCE = "samples", "reference"
SIDES = (SAMPLES, REFERENCE)


class SideSource(str, enum.Enum):
    SHARDS = "shards"  #: featurized by the job, shard by shard
    STORED = "stored"  #: statistics already in the feature store (named or cached reference)
    STATS_FILE = "stats_file"  #: a pytorch-fid mu/sigma file (FID only)


@dataclass(frozen=True)
class SidePlan:
    uri: str
    n: int
    content_hash: str | None
    how: SideSource
    store_keys: dict[str, str] = field(default_factory=dict)
    """Per extractor, where the side's merged statistics are (STORED) or will be cached (SHARDS of a reference)."""
    shards: tuple[tuple[int, int], ...] = ()
    builder: str | None = None
    """STORED statistics that another job (this id) is featurizing right now; the reducer waits for them."""

    @property
    def build_key(self) -> str:
        """What single-flight reference builds are keyed by: the one cache file, or a digest of the set of them."""
        if len(self.store_keys) == 1:
            return next(iter(self.store_keys.values()))
        joined = "\n".join(f"{e}={k}" for e, k in sorted(self.store_keys.items()))
        return "refs/set-" + hashlib.sha256(joined.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        d = {"uri": self.uri, "n": self.n, "content_hash": self.content_hash, "how": self.how.value,
             "store_keys": self.store_keys or None, "shards": [list(s) for s in self.shards] or None,
             "store_key": self.store_keys.get(INCEPTION)}  # what a worker of the previous release reads
        return {**d, "builder": self.builder} if self.builder else d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SidePlan:
        keys = d.get("store_keys") or ({INCEPTION: d["store_key"]} if d.get("store_key") else {})
        return cls(d["uri"], d["n"], d.get("content_hash"), SideSource(d["how"]), dict(keys),
                   tuple((int(a), int(b)) for a, b in d.get("shards") or ()), d.get("builder"))


@dataclass(frozen=True)
class JobPlan:
    """What a job's `plan` column holds, decoded (the JSON keys are those of every stored job)."""

    sides: dict[str, SidePlan] = field(default_factory=dict)
    reference_name: str | None = None
    """A reference job registers its statistics under this name."""
    recomputes: int = 0
    """How often lost partials or a bad cache sent the job back to `running`."""
    notes: tuple[str, ...] = ()
    """What went wrong and was repaired on the way (a corrupt cache file, ...); the result reports them."""
    weights: dict[str, str] = field(default_factory=dict)
    """The SHA-256 of each extractor's weights, pinned at planning: every shard must use the same files."""

    def side(self, side: str) -> SidePlan | None:
        return self.sides.get(side)

    def with_(self, **changes: Any) -> JobPlan:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {side: p.to_dict() for side, p in self.sides.items()}
        if self.sides:
            d.setdefault(REFERENCE, None)
        if self.reference_name:
            d["reference_name"] = self.reference_name
        if self.recomputes:
            d["recomputes"] = self.recomputes
        if self.notes:
            d["notes"] = list(self.notes)
        if self.weights:
            d["weights"] = dict(self.weights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> JobPlan:
        d = d or {}
        sides = {side: SidePlan.from_dict(d[side]) for side in SIDES if d.get(side)}
        return cls(sides, d.get("reference_name"), int(d.get("recomputes", 0)), tuple(d.get("notes", ())),
                   dict(d.get("weights") or {}))


def shard_ranges(n: int, shard_size: int) -> tuple[tuple[int, int], ...]:
    return tuple((s, min(s + shard_size, n)) for s in range(0, n, shard_size))


INDEXES = "indexes"  #: the feature store's folder of sample-set listings (swept by the janitor when unused)


def index_key(content_hash: str) -> str:
    """Where a sample set's listing is kept (`Source.index`), by content: the planner lists a tar once, and
    the workers that featurize its shards open it from this instead of listing it again."""
    return f"{INDEXES}/{content_hash[:32]}.npz"


def keep_index(store: FeatureStore | None, source: Source, content_hash: str) -> None:
    """Written on every plan (the same content may be another file since, with another stamp); a store that
    refuses it costs the workers time, not the job."""
    index = source.index() if store is not None else None
    if index is not None:
        try:
            store.put_bytes(index_key(content_hash), index)
        except Exception as exc:
            log.warning("cannot keep the listing of %s in the feature store (%s); each worker lists it", source.uri, exc)


def plan_samples(uri: str, config: EvalConfig, roots: SampleRoots, store: FeatureStore | None = None) -> SidePlan:
    source = open_source(uri, roots=roots)
    n = len(source)
    if "is" in config.metrics and n < config.splits:
        raise MetricInputError(
            f"Inception Score with {config.splits} splits needs at least {config.splits} samples; "
            f"{uri} has {n}. Pass --splits {n} or fewer."
        )
    content_hash = source.content_hash()
    keep_index(store, source, content_hash)
    return SidePlan(uri, n, content_hash, SideSource.SHARDS, shards=shard_ranges(n, config.shard_size))


def plan_reference(
    ref: str, config: EvalConfig, store: FeatureStore, weights: dict[str, str], named: NamedReference | None,
    roots: SampleRoots,
) -> SidePlan:
    """`named` is the registered reference when `ref` names one (its statistics are read, not a path).
    `weights` holds the SHA-256 of each of the job's extractors' weights."""
    extractors = config.featurizers
    if named is not None:
        stored = named.stored()
        missing = [e for e in extractors if e not in stored]
        if missing:
            raise ReferenceMismatchError(
                f"reference '{named.name}' holds statistics of {', '.join(stored)}, not of {', '.join(missing)}; "
                f"create it again with --extractor {','.join(dict.fromkeys([*stored, *missing]))}"
            )
        for e in extractors:
            check_compatible(f"'{named.name}' ({e})", stored[e][0], named.resize, weights[e], config.resize)
        return SidePlan(named.uri, named.n, named.content_hash, SideSource.STORED,
                        store_keys={e: stored[e][1] for e in extractors})
    roots.check(ref, "ref")
    if is_stats_file(ref):
        if "kid" in config.metrics or "prc" in config.metrics:
            raise MetricInputError(
                f"{ref} holds only mu/sigma statistics; KID and precision/recall need reference features. "
                "Drop them from --metrics, or pass the reference images (or a reference made by `evalfarm ref create`)."
            )
        if extractors != (INCEPTION,):
            raise MetricInputError(f"{ref} holds mu/sigma statistics of {INCEPTION} features (pytorch-fid's format); "
                                   f"pass the reference images for {', '.join(e for e in extractors if e != INCEPTION)}.")
        stats = load_stats_file(ref, weights[INCEPTION], config.resize)
        return SidePlan(ref, stats.n, None, SideSource.STATS_FILE)
    try:
        source = open_source(ref, roots=roots)
    except SourceError as exc:
        raise SourceError(f"--ref {ref!r} is neither a named reference nor a readable sample set: {exc}") from exc
    content_hash = source.content_hash()
    keys = {e: reference_key(content_hash, weights[e], config.resize) for e in extractors}
    if config.cache and all(store.exists(k) for k in keys.values()):
        return SidePlan(ref, len(source), content_hash, SideSource.STORED, store_keys=keys)
    keep_index(store, source, content_hash)
    return SidePlan(ref, len(source), content_hash, SideSource.SHARDS, store_keys=keys,
                    shards=shard_ranges(len(source), config.shard_size))


def check_sizes(config: EvalConfig, samples: SidePlan, reference: SidePlan | None) -> None:
    """Fail before any featurization when the sizes cannot give the requested metrics."""
    if "kid" in config.metrics and reference is not None and not config.kid_shrink:
        check_kid_inputs(samples.n, reference.n, config.kid_subset_size)
    if "prc" in config.metrics and reference is not None:
        for side in (samples, reference):
            if side.n <= config.prc_neighborhood:
                raise MetricInputError(
                    f"precision/recall with neighborhood {config.prc_neighborhood} needs more than "
                    f"{config.prc_neighborhood} samples a side; {side.uri} has {side.n}."
                )
    if config.needs_reference and samples.n < 2:
        raise MetricInputError(f"FID/KID need at least 2 samples; {samples.uri} has {samples.n}.")
