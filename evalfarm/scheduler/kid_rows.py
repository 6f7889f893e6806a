"""Which feature rows a shard keeps when its side's rows serve KID alone: the rows KID will draw.

KID reads 100 subsets of 1000 rows a side, whatever the side's size, and its draw is seeded and fixed once
the job is planned (`metrics.kid.kid_draws` of the two sides' sizes). So a side whose rows nothing else
reads (no precision/recall on that extractor, no reference to cache) keeps only those rows: about 10 % of
a million samples, 4 MiB instead of 40 MiB per 5000-row shard of Inception features, and 0.8 GiB instead
of 8 GiB of a million samples' rows in the store and, for a remote store, in the reducer's TMPDIR. The
reducer reads them through `metrics.rows.SparseRows`, which refuses a row that was not kept: rows kept for
another draw are found there, and never stand in for the rows KID drew.

The draw permutes each side's rows once per subset (7 s for a million samples: planning, which must take
seconds, does not compute it), so the first shard that needs it computes it once per parameter set and keeps
it in the feature store under `kid-draws/`, where every worker (and the next evaluation of the same sizes,
as a training run makes) reads it; each process also keeps the last few. A stored draw that is damaged is
drawn again; one that is whole but wrong (another draw's rows) is found by the reducer, which stores the
right one and has the side's shards run again (`redraw`).
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import astuple, dataclass

import numpy as np

from evalfarm.metrics.kid import drawn_rows
from evalfarm.metrics.rows import check_positions, rows_in
from evalfarm.pipeline.reduce import kid_subset_size
from evalfarm.scheduler.job import JobSnapshot
from evalfarm.scheduler.plan import REFERENCE, SAMPLES
from evalfarm.scheduler.store import FeatureStore

log = logging.getLogger(__name__)

DRAWS = "kid-draws"  #: the feature store's folder of KID draws, by parameters (under 1 MiB each, at a million a side)
_CACHE_SIZE = 4  #: draws a process keeps


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

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Each side's drawn rows, sorted, computed (seconds at a million samples)."""
        return drawn_rows(self.n_samples, self.n_reference, subsets=self.subsets, subset_size=self.subset_size,
                          seed=self.seed)


def kid_only(job: JobSnapshot, side: str, extractor: str) -> bool:
    """Whether KID is the only reader of this side's rows of `extractor` (then only its drawn rows are kept)."""
    metrics = job.config.metrics_on(extractor)
    return ("kid" in metrics and "prc" not in metrics and job.keeps_features(side, extractor)
            and not job.is_reference_job and not (side == REFERENCE and job.config.cache)
            and job.plan.side(REFERENCE) is not None)


def draw_of(job: JobSnapshot) -> Draw:
    """The job's draw, from its plan's sizes (the reducer's merged sides have the same: shards cover them)."""
    n1, n2 = job.plan.side(SAMPLES).n, job.plan.side(REFERENCE).n
    config = job.config
    return Draw(n1, n2, config.kid_subsets, kid_subset_size(config, n1, n2), config.seed)


def shard_rows(store: FeatureStore, job: JobSnapshot, side: str, start: int, stop: int) -> np.ndarray:
    """The positions in [start, stop) of `side` whose rows KID draws, as offsets from `start`."""
    return rows_in(side_rows(store, draw_of(job))[0 if side == SAMPLES else 1], start, stop)


_lock = threading.Lock()
_cached: dict[tuple[str, Draw], tuple[tuple[np.ndarray, np.ndarray], str | None]] = {}
"""Draws this process computed (signature None: trusted) or read (kept while the stored file is unchanged)."""


def side_rows(store: FeatureStore, draw: Draw) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' drawn rows, sorted: kept by this process, read from the store, or drawn and stored."""
    key = (store.root, draw)
    with _lock:
        hit = _cached.get(key)
    if hit is not None and hit[1] is None:
        return hit[0]
    signature = store.signature(draw.key)  # one stat (or remote `info`) per call, read once
    if hit is not None and hit[1] == signature:
        return hit[0]
    rows = _load(store, draw) if signature is not None else None
    if rows is None:
        rows, signature = draw.rows(), None
        _store(store, draw, rows)
    _keep(key, rows, signature)
    return rows


def redraw(store: FeatureStore, draw: Draw) -> bool:
    """The reducer found a row KID draws missing: True when the stored draw was wrong (it is replaced with the
    right one, which every process then reads), False when it was right (the fault is elsewhere)."""
    stored = _load(store, draw)
    if stored is None:  # every process drew its own (none was stored, or it was unusable and drawn again)
        return False
    right = draw.rows()
    if all(np.array_equal(a, b) for a, b in zip(stored, right, strict=True)):
        return False
    _store(store, draw, right)
    _keep((store.root, draw), right, None)
    return True


def _keep(key: tuple[str, Draw], rows: tuple[np.ndarray, np.ndarray], signature: str | None) -> None:
    for side in rows:
        side.setflags(write=False)
    with _lock:
        _cached.pop(key, None)
        while len(_cached) >= _CACHE_SIZE:
            del _cached[next(iter(_cached))]  # the oldest kept
        _cached[key] = (rows, signature)


def _store(store: FeatureStore, draw: Draw, rows: tuple[np.ndarray, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, samples=rows[0].astype(np.int32), reference=rows[1].astype(np.int32),
             draw=np.array(astuple(draw), np.int64))
    try:
        store.put_bytes(draw.key, buf.getvalue())
    except Exception as exc:  # this process keeps its own; the next draws it again: slower, never wrong
        log.warning("cannot keep the KID draw %s in the feature store (%s)", draw.key, exc)


def _load(store: FeatureStore, draw: Draw) -> tuple[np.ndarray, np.ndarray] | None:
    """The stored draw, when it is whole and is this draw's; anything else is drawn again (and replaced)."""
    try:
        with np.load(io.BytesIO(store.get_bytes(draw.key)), allow_pickle=False) as z:  # members' CRCs are checked
            params, rows = z["draw"], (z["samples"], z["reference"])
        if params.tolist() != list(astuple(draw)):
            raise ValueError("the parameters of another draw")
        limit = draw.subsets * draw.subset_size
        for side, n in zip(rows, (draw.n_samples, draw.n_reference), strict=True):
            check_positions(side, n)
            if not 0 < len(side) <= limit:
                raise ValueError(f"{len(side)} rows for {draw.subsets} subsets of {draw.subset_size}")
    except FileNotFoundError:
        return None
    except Exception as exc:
        log.warning("the stored KID draw %s is unusable (%s); drawing it again", draw.key, exc)
        return None
    return rows[0].astype(np.int64), rows[1].astype(np.int64)
