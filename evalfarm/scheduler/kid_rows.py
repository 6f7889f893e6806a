"""Which feature rows a shard keeps when its side's rows serve KID alone: the rows KID will draw.

KID reads 100 subsets of 1000 rows a side, whatever the side's size, and its draw is seeded and fixed once
the job is planned (`metrics.kid.kid_draws` of the two sides' sizes). So a side whose rows nothing else
reads (no precision/recall on that extractor, no reference to cache) keeps only those rows: about 10 % of
a million samples, 4 MiB instead of 40 MiB per 5000-row shard of Inception features, and 0.8 GiB instead
of 8 GiB of a million samples' rows in the store and, for a remote store, in the reducer's TMPDIR. The
reducer reads them through `metrics.rows.SparseRows`, which refuses a row that was not kept: a draw that
differed would fail the job, never give another row's values.

The draw permutes each side's rows once per subset (7 s for a million samples), so it is computed once
per parameter set and kept in the feature store under `kid-draws/`, where every worker (and the next
evaluation of the same sizes, as a training run makes) reads it; each process also keeps the last few.
"""

from __future__ import annotations

import io
import logging
from dataclasses import astuple, dataclass

import numpy as np

from evalfarm.metrics.kid import drawn_rows
from evalfarm.metrics.rows import rows_in
from evalfarm.pipeline.reduce import kid_subset_size
from evalfarm.scheduler.job import JobSnapshot
from evalfarm.scheduler.plan import REFERENCE, SAMPLES
from evalfarm.scheduler.store import FeatureStore

log = logging.getLogger(__name__)

DRAWS = "kid-draws"  #: the feature store's folder of KID draws, by parameters (kept: 1 MiB or less each)


@dataclass(frozen=True)
class Draw:
    """What fixes KID's draw: the two sides' sizes, the subsets and the seed."""

    n_samples: int
    n_reference: int
    subsets: int
    subset_size: int
    seed: int

    @property
    def key(self) -> str:
        return f"{DRAWS}/{'-'.join(map(str, astuple(self)))}.npz"


def kid_only(job: JobSnapshot, side: str, extractor: str) -> bool:
    """Whether KID is the only reader of this side's rows of `extractor` (then only its drawn rows are kept)."""
    metrics = job.config.metrics_on(extractor)
    return ("kid" in metrics and "prc" not in metrics and job.keeps_features(side, extractor)
            and not job.is_reference_job and not (side == REFERENCE and job.config.cache)
            and job.plan.side(REFERENCE) is not None)


def draw_of(job: JobSnapshot) -> Draw:
    n1, n2 = job.plan.side(SAMPLES).n, job.plan.side(REFERENCE).n
    config = job.config
    return Draw(n1, n2, config.kid_subsets, kid_subset_size(config, n1, n2), config.seed)


def shard_rows(store: FeatureStore, job: JobSnapshot, side: str, start: int, stop: int) -> np.ndarray:
    """The positions in [start, stop) of `side` whose rows KID draws, as offsets from `start`."""
    return rows_in(side_rows(store, draw_of(job))[0 if side == SAMPLES else 1], start, stop)


_CACHE_SIZE = 4
_cached: dict[tuple[str, Draw], tuple[np.ndarray, np.ndarray]] = {}


def side_rows(store: FeatureStore, draw: Draw) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' drawn rows, sorted: from this process' last few, the store, or drawn and stored for the
    next process. A draw kept here is used only while the store still has it (`forget` removes it there)."""
    key = (store.root, draw)
    kept = _cached.get(key)
    if kept is not None and store.exists(draw.key):
        return kept
    kept = _load(store, draw)
    if kept is None:
        kept = drawn_rows(draw.n_samples, draw.n_reference, subsets=draw.subsets, subset_size=draw.subset_size,
                          seed=draw.seed)
        buf = io.BytesIO()
        np.savez(buf, samples=kept[0], reference=kept[1], draw=np.array(astuple(draw), np.int64))
        try:
            store.put_bytes(draw.key, buf.getvalue())
        except OSError as exc:  # the next process draws again: slower, never wrong
            log.warning("cannot keep the KID draw %s in the feature store (%s)", draw.key, exc)
    for rows in kept:
        rows.setflags(write=False)
    while len(_cached) >= _CACHE_SIZE:
        del _cached[next(iter(_cached))]
    _cached[key] = kept
    return kept


def forget(store: FeatureStore, draw: Draw) -> str:
    """Remove a stored draw (it was found wrong), here and in the store; returns where it was."""
    _cached.pop((store.root, draw), None)
    store.delete(draw.key)
    return store.describe(draw.key)


def _load(store: FeatureStore, draw: Draw) -> tuple[np.ndarray, np.ndarray] | None:
    """The stored draw, when it is whole and is this draw's; anything else is drawn again (and replaced)."""
    try:
        with np.load(io.BytesIO(store.get_bytes(draw.key)), allow_pickle=False) as z:  # members' CRCs are checked
            params, kept = z["draw"], (z["samples"], z["reference"])
    except FileNotFoundError:
        return None
    except Exception as exc:
        log.warning("the stored KID draw %s is unreadable (%s); drawing it again", draw.key, exc)
        return None
    limit = draw.subsets * draw.subset_size
    ok = params.tolist() == list(astuple(draw)) and all(
        rows.ndim == 1 and rows.dtype.kind == "i" and 0 < len(rows) <= limit and rows[0] >= 0 and rows[-1] < n
        and bool(np.all(np.diff(rows) > 0))
        for rows, n in zip(kept, (draw.n_samples, draw.n_reference), strict=True))
    if not ok:
        log.warning("the stored KID draw %s is not this draw's; drawing it again", draw.key)
        return None
    return kept
