"""Precision/recall as tile tasks: the two k-NN distance matrices of a job cut into tiles that any worker runs.

The math is `evalfarm.metrics.prc` (tiles whose results merge exactly, the same for any tiling). This module
is its bookkeeping on the farm, the same in embedded mode, where the tiles run in process:

1. The reducer writes each side's features of the extractor as blocks (`prc_block` rows each), blobs of the
   partial store with their digests.
2. Stage "nearest": one task per tile of generated × generated and of real × real; each reads its rows' and
   columns' blocks and stores the k+1 smallest distances of its rows.
3. The reducer merges those per row into each sample's radius (two small blobs).
4. Stage "cover": one task per tile of real × generated; it stores which of its rows and columns fall inside
   a ball of the other set.
5. The reducer ORs the coverage into precision, recall and F-score.

Between stages the reducer hands out the missing tiles (`advance`). A tile sent is marked so for `pending_s`,
the time its message may wait in the queue behind the others before it is presumed lost; a worker that starts
it takes its lease for `lease_s` and renews it while it runs (`start_tile`). A tile whose worker died is handed
out again once its lease expires, a duplicate delivery of a tile that runs or is done does nothing, a tile
whose result was lost (Redis flushed, a file altered) is computed again, and inputs that were lost are written
again from the shards' partials. A task's
memory holds one tile's rows and columns; the reducer's, the radii and coverage (a few bytes per sample).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from evalfarm.config import EvalConfig
from evalfarm.metrics.prc import (
    Tile,
    coverage_tile,
    merge_nearest,
    nearest_tile,
    prc_from_coverage,
    radii_from_nearest,
    tiles,
)
from evalfarm.metrics.rows import Rows, row_slice
from evalfarm.scheduler.partials import PartialStore
from evalfarm.scheduler.plan import REFERENCE, SAMPLES

NEAREST = {SAMPLES: "nearest-samples", REFERENCE: "nearest-reference"}
COVER = "cover"
STAGES = (*NEAREST.values(), COVER)


@dataclass(frozen=True)
class TileWork:
    """One tile task: `extractor/stage/index`, its name in the partial store and in the task's message."""

    extractor: str
    stage: str
    index: int

    @property
    def name(self) -> str:
        return f"{self.extractor}/{self.stage}/{self.index}"

    @classmethod
    def parse(cls, name: str) -> TileWork:
        extractor, stage, index = name.split("/")
        if stage not in STAGES:
            raise ValueError(f"not a precision/recall tile: {name!r}")
        return cls(extractor, stage, int(index))


def stage_tiles(config: EvalConfig, stage: str, n_gen: int, n_real: int) -> list[Tile]:
    if stage == NEAREST[SAMPLES]:
        return tiles(n_gen, n_gen, config.prc_tile, block=config.prc_block)
    if stage == NEAREST[REFERENCE]:
        return tiles(n_real, n_real, config.prc_tile, block=config.prc_block)
    return tiles(n_real, n_gen, config.prc_tile, block=config.prc_block)  # real rows × generated columns


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _load(data: bytes | None) -> np.ndarray | None:
    return None if data is None else np.load(io.BytesIO(data), allow_pickle=False)


def _block(extractor: str, side: str, b: int) -> str:
    return f"{extractor}/rows-{side}/{b}"


def _radii(extractor: str, side: str) -> str:
    return f"{extractor}/radii-{side}"


def _blocks_of(n: int, block: int) -> int:
    return -(-n // block)


# -- written by the reducer ------------------------------------------------------------------------------------------


def write_features(partials: PartialStore, job_id: str, extractor: str, side: str, features: Rows,
                   block: int) -> None:
    """A side's features as blocks of `block` rows, the unit every tile reads (one block in memory at a time)."""
    for b in range(_blocks_of(len(features), block)):
        rows = np.asarray(row_slice(features, b * block, (b + 1) * block), np.float32)
        partials.put_blob(job_id, _block(extractor, side, b), _npy(rows))


def features_written(names: set[str], extractor: str, n_gen: int, n_real: int, block: int) -> bool:
    return all(_block(extractor, side, b) in names
               for side, n in ((SAMPLES, n_gen), (REFERENCE, n_real)) for b in range(_blocks_of(n, block)))


# -- a task ------------------------------------------------------------------------------------------------------------


def _rows(partials: PartialStore, job_id: str, extractor: str, side: str, start: int, stop: int,
          block: int) -> np.ndarray | None:
    parts = []
    for b in range(start // block, _blocks_of(stop, block)):
        rows = _load(partials.get_blob(job_id, _block(extractor, side, b)))
        if rows is None:
            return None
        lo = b * block
        parts.append(rows[max(start, lo) - lo:min(stop, lo + len(rows)) - lo])
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def run_tile(partials: PartialStore, job_id: str, config: EvalConfig, n_gen: int, n_real: int,
             work: TileWork) -> bool:
    """Compute one tile and store its result; False when its inputs were lost (the reducer writes them again)."""
    t = stage_tiles(config, work.stage, n_gen, n_real)[work.index]
    block, e = config.prc_block, work.extractor
    if work.stage == COVER:
        real = _rows(partials, job_id, e, REFERENCE, t.row_start, t.row_stop, block)
        gen = _rows(partials, job_id, e, SAMPLES, t.col_start, t.col_stop, block)
        radii_real = _load(partials.get_blob(job_id, _radii(e, REFERENCE)))
        radii_gen = _load(partials.get_blob(job_id, _radii(e, SAMPLES)))
        if real is None or gen is None or radii_real is None or radii_gen is None:
            return False
        real_covered, gen_covered = coverage_tile(real, gen, radii_real[t.rows], radii_gen[t.cols], block=block)
        partials.put_blob(job_id, work.name, _npy(np.concatenate([real_covered, gen_covered])))
        return True
    side = SAMPLES if work.stage == NEAREST[SAMPLES] else REFERENCE
    rows = _rows(partials, job_id, e, side, t.row_start, t.row_stop, block)
    cols = rows if t.cols == t.rows else _rows(partials, job_id, e, side, t.col_start, t.col_stop, block)
    if rows is None or cols is None:
        return False
    partials.put_blob(job_id, work.name, _npy(nearest_tile(rows, cols, neighborhood=config.prc_neighborhood,
                                                           block=block)))
    return True


# -- the reducer's side ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """Where an extractor's precision/recall stands: its values, or the tiles to run (handed out under a lease),
    or its inputs to write (`rewrite`: the first pass, or they were lost)."""

    values: dict[str, float] | None = None
    run: tuple[str, ...] = ()
    rewrite: bool = False


def advance(partials: PartialStore, job_id: str, config: EvalConfig, extractor: str, n_gen: int, n_real: int,
            pending_s: float) -> Progress:
    names = partials.blob_names(job_id)
    if not features_written(names, extractor, n_gen, n_real, config.prc_block):
        return Progress(rewrite=True)
    radii: dict[str, np.ndarray] = {}
    for side in (SAMPLES, REFERENCE):
        stored = _load(partials.get_blob(job_id, _radii(extractor, side))) if _radii(extractor, side) in names else None
        if stored is not None:
            radii[side] = stored
    todo = [w for side in (SAMPLES, REFERENCE) if side not in radii
            for w in _missing(names, config, extractor, NEAREST[side], n_gen, n_real)]
    if todo:
        return Progress(run=_send(partials, job_id, todo, pending_s))
    for side in (SAMPLES, REFERENCE):
        if side in radii:
            continue
        merged = _merge_nearest(partials, job_id, config, extractor, NEAREST[side], n_gen, n_real)
        if isinstance(merged, list):  # a result lost since it was listed: compute it again
            return Progress(run=_send(partials, job_id, merged, pending_s))
        partials.put_blob(job_id, _radii(extractor, side), _npy(radii_from_nearest(merged)))
        names.add(_radii(extractor, side))
    todo = _missing(names, config, extractor, COVER, n_gen, n_real)
    if todo:
        return Progress(run=_send(partials, job_id, todo, pending_s))
    real_covered, gen_covered = np.zeros(n_real, bool), np.zeros(n_gen, bool)
    lost = []
    for i, t in enumerate(stage_tiles(config, COVER, n_gen, n_real)):
        work = TileWork(extractor, COVER, i)
        both = _load(partials.get_blob(job_id, work.name))
        if both is None:
            lost.append(work)
            continue
        real_covered[t.rows] |= both[: t.row_stop - t.row_start]
        gen_covered[t.cols] |= both[t.row_stop - t.row_start:]
    if lost:
        return Progress(run=_send(partials, job_id, lost, pending_s))
    return Progress(values=prc_from_coverage(real_covered, gen_covered))


def _missing(names: set[str], config: EvalConfig, extractor: str, stage: str, n_gen: int,
             n_real: int) -> list[TileWork]:
    works = (TileWork(extractor, stage, i) for i in range(len(stage_tiles(config, stage, n_gen, n_real))))
    return [w for w in works if w.name not in names]


def _merge_nearest(partials: PartialStore, job_id: str, config: EvalConfig, extractor: str, stage: str,
                   n_gen: int, n_real: int) -> np.ndarray | list[TileWork]:
    n = n_gen if stage == NEAREST[SAMPLES] else n_real
    nearest = np.full((n, config.prc_neighborhood + 1), np.inf, np.float32)
    lost = []
    for i, t in enumerate(stage_tiles(config, stage, n_gen, n_real)):
        work = TileWork(extractor, stage, i)
        part = _load(partials.get_blob(job_id, work.name))
        if part is None:
            lost.append(work)
        else:
            nearest[t.rows] = merge_nearest(nearest[t.rows], part)
    return lost or nearest


def _sent(name: str) -> str:
    return f"sent/{name}"


def _send(partials: PartialStore, job_id: str, works: list[TileWork], pending_s: float) -> tuple[str, ...]:
    """The tiles nobody runs and nobody sent in the last `pending_s`, marked sent: the caller sends them."""
    return tuple(w.name for w in works
                 if not partials.held(job_id, w.name) and partials.lease(job_id, _sent(w.name), pending_s))


def start_tile(partials: PartialStore, job_id: str, name: str, lease_s: float) -> bool:
    """Take a delivered tile's lease: False when its result is stored already or another worker runs it (a
    duplicate delivery, which does nothing). Its message arrived, so it is no longer waiting to be sent."""
    if partials.get_blob(job_id, name) is not None or not partials.lease(job_id, name, lease_s):
        return False
    partials.release(job_id, _sent(name))
    return True
