"""Precision and recall of generated samples (torch-fidelity's PRC) as tiled, exactly mergeable math.

torch-fidelity 0.4.0 (`metric_prc.py`, default `save_cpu_ram=False`): generated features G, real features R,
float32 Euclidean distances from `torch.cdist`; a sample's radius is the (k+1)-th smallest distance to its
own set (k = `prc_neighborhood`, the +1 is the sample itself); recall = fraction of real samples within
(`<=`) some generated sample's radius, precision = fraction of generated samples within some real sample's
radius. Its distance matrices are n²: 10 GB each at 50k. Here they are cut into tiles (rectangles of
rows × columns), each a task with bounded memory, whose small results merge exactly:

1. `nearest_tile(rows, cols)` → the k+1 smallest distances of each row, sorted; `merge_nearest` keeps the
   k+1 smallest of two partials (the k+1 smallest of a union is among the k+1 smallest of its parts);
   `radii_from_nearest` takes the (k+1)-th. Run for G against G and for R against R.
2. `coverage_tile(real, gen, radii_real, radii_gen)` → per real row "inside some generated ball of this
   tile" and per generated column "inside some real ball of this tile": one distance block serves both,
   as torch-fidelity's one `dist_2_1` matrix does. Merge = OR.
3. `prc_from_coverage` → torch-fidelity's three numbers under its key names.

**Tiling invariance.** `torch.cdist` computes large inputs as one GEMM (`|a|² + |b|² − 2a·b`), and MKL's
rounding of a pair depends on the shapes of the whole call (and on the thread count): the same pair cut into
different tiles gets a different float32 distance. So every distance is computed inside a fixed *block*:
block rows [i·block, (i+1)·block) of one set against block columns [j·block, (j+1)·block) of the other,
aligned to global indices. Tiles are whole blocks (`tiles` enforces it), so a pair is always computed by the
same `cdist` call on the same inputs, whichever tile holds it, and the radii, coverage and metric are
bit-identical for any tiling. The default block is torch-fidelity's own `prc_batch_size` (10000): its
`calc_cdist_full` makes exactly these calls, so with block = its batch size the distances, the radii and the
numbers are torch-fidelity's bit for bit (same process settings). A smaller block gives smaller tiles and
the same invariance; its distances then differ from torch-fidelity's by float32 rounding, which can flip
only a pair that sits within rounding of a radius. Across worker processes the blocks must also run under
the same MKL settings: MKL's GEMM rounding changes with the thread count unless `MKL_CBWR=AVX2,STRICT`.
The grid costs nothing at the default block (the calls are torch-fidelity's own) and little down to 2048;
smaller blocks make smaller GEMMs, slower per flop (`bench/prc.py` measures it).

**Memory of one tile** with a tile of |rows| × |cols|: the two feature blocks (4·(|rows| + |cols|)·d bytes),
plus, for one block at a time, its distances (4·block² bytes), `cdist`'s padded copies of the two block
inputs (about 12·block·d bytes) and, in `coverage_tile`, a boolean mask (block² bytes). Nothing grows with
the number of samples; a tile's result is |rows|·(k+1) float32 or |rows| + |cols| booleans.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from evalfarm.errors import MetricInputError

KEY_METRIC_PRECISION = "precision"
KEY_METRIC_RECALL = "recall"
KEY_METRIC_F_SCORE = "f_score"

DEFAULT_NEIGHBORHOOD = 3  #: torch-fidelity's `prc_neighborhood`: a radius reaches the k-th nearest other sample
DEFAULT_BLOCK = 10000  #: torch-fidelity's `prc_batch_size`: the cdist unit; equal to it, distances are its own
DEFAULT_TILE = DEFAULT_BLOCK  #: one block per tile: 400 MB of distances at most, 25 tiles per 50k × 50k matrix
_CHECK_ROWS = 4096  # rows read at a time by check_prc_inputs


@dataclass(frozen=True)
class Tile:
    """One unit of work: rows [row_start, row_stop) of one set against columns [col_start, col_stop)."""

    row_start: int
    row_stop: int
    col_start: int
    col_stop: int

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_stop)

    @property
    def cols(self) -> slice:
        return slice(self.col_start, self.col_stop)


def tiles(n_rows: int, n_cols: int, tile: int = DEFAULT_TILE, *, block: int = DEFAULT_BLOCK) -> list[Tile]:
    """The tiles of an n_rows × n_cols distance matrix, row-major; every edge but the last on a block edge."""
    if block < 1 or tile < 1 or tile % block:
        raise ValueError(f"a PRC tile must be a positive multiple of the block ({block}); got {tile}")
    if n_rows < 1 or n_cols < 1:
        raise ValueError(f"a distance matrix needs rows and columns; got {n_rows} × {n_cols}")
    return [
        Tile(r, min(r + tile, n_rows), c, min(c + tile, n_cols))
        for r in range(0, n_rows, tile)
        for c in range(0, n_cols, tile)
    ]


# -------------------------------------------------------------------------------------------- checks


def _neighbours(neighborhood: int) -> int:
    if isinstance(neighborhood, bool) or not isinstance(neighborhood, (int, np.integer)) or neighborhood < 1:
        raise MetricInputError(f"the PRC neighborhood must be a positive integer; got {neighborhood!r}")
    return int(neighborhood) + 1


def _features(x: np.ndarray, name: str, first_row: int = 0) -> torch.Tensor:
    """float32, C-ordered, finite rows as a CPU tensor (sharing memory when the array allows it)."""
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise MetricInputError(f"PRC needs {name} as a non-empty 2-D array (samples × features); got shape {a.shape}")
    a = np.require(a, np.float32, ["C_CONTIGUOUS", "WRITEABLE", "ALIGNED"])
    t = torch.from_numpy(a)
    # A squared norm is non-finite when a feature is NaN or infinite, or when |x|² overflows float32 (then
    # cdist's |a|² + |b|² − 2a·b is inf − inf): one pass catches all three before they become a number.
    sq = torch.einsum("ij,ij->i", t, t)
    bad = ~torch.isfinite(sq)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        what = "is not finite" if not np.isfinite(a[row]).all() else "is too large for float32 distances"
        raise MetricInputError(f"PRC {name}: row {first_row + row} {what}; check the feature extractor's output")
    return t


def _same_dim(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise MetricInputError(f"PRC {what} have different feature dimensions: {a.shape[1]} and {b.shape[1]}")


def _radii(r: np.ndarray, n: int, name: str) -> torch.Tensor:
    r = np.asarray(r)
    if r.shape != (n,):
        raise MetricInputError(f"PRC {name}: {r.shape} radii for {n} samples")
    r = np.require(r, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])
    if np.isnan(r).any():
        raise MetricInputError(f"PRC {name} contain NaN")
    return torch.from_numpy(r)


def check_prc_inputs(
    features_gen: np.ndarray, features_real: np.ndarray, neighborhood: int = DEFAULT_NEIGHBORHOOD
) -> None:
    """Raise MetricInputError unless PRC can be computed: same dimension, finite, more than k samples a side.

    Reads the features once, a chunk of rows at a time (a memory-mapped set is not loaded whole).
    """
    k1 = _neighbours(neighborhood)
    gen, real = np.asarray(features_gen), np.asarray(features_real)
    for name, a in (("generated features", gen), ("real features", real)):
        if a.ndim != 2:
            raise MetricInputError(f"PRC needs {name} as a 2-D array (samples × features); got shape {a.shape}")
        if a.shape[0] < k1:
            raise MetricInputError(
                f"PRC with neighborhood {k1 - 1} needs more than {k1 - 1} samples a side (each radius reaches "
                f"the {k1 - 1}-th nearest other sample); the {name} have {a.shape[0]}. "
                f"Use more samples or a smaller --prc-neighborhood."
            )
    if gen.shape[1] != real.shape[1]:
        raise MetricInputError(
            f"PRC generated and real features have different dimensions: {gen.shape[1]} and {real.shape[1]}"
        )
    for name, a in (("generated features", gen), ("real features", real)):
        for start in range(0, a.shape[0], _CHECK_ROWS):
            _features(a[start : start + _CHECK_ROWS], name, first_row=start)


# -------------------------------------------------------------------------------------------- tiles


def _blocks(n: int, block: int) -> Iterator[slice]:
    for start in range(0, n, block):
        yield slice(start, min(start + block, n))


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Exactly torch-fidelity's call, on one block of each side: the shapes decide the route (direct below 26
    # rows and columns, GEMM above) and MKL's rounding, so both are fixed by the block grid.
    return torch.cdist(a, b)


def nearest_tile(
    rows: np.ndarray, cols: np.ndarray, *, neighborhood: int = DEFAULT_NEIGHBORHOOD, block: int = DEFAULT_BLOCK
) -> np.ndarray:
    """The k+1 smallest distances from each row to the columns of this tile: float32 [len(rows), k+1], sorted.

    rows and cols are one set's features in a `tiles` tile (rows may include the columns' own samples: the
    self distance is one of the k+1). A tile with fewer than k+1 columns pads with +inf.
    """
    k1 = _neighbours(neighborhood)
    a, b = _features(rows, "rows"), _features(cols, "columns")
    _same_dim(a, b, "rows and columns")
    out = np.empty((a.shape[0], k1), np.float32)
    for rs in _blocks(a.shape[0], block):
        best = None
        for cs in _blocks(b.shape[0], block):
            d = _cdist(a[rs], b[cs])
            take = min(k1, d.shape[1])
            part = torch.topk(d, take, dim=1, largest=False, sorted=True).values.numpy()
            del d
            if take < k1:
                part = np.pad(part, ((0, 0), (0, k1 - take)), constant_values=np.inf)
            best = part if best is None else merge_nearest(best, part)
        out[rs] = best
    return out


def merge_nearest(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The k+1 smallest of two `nearest_tile` partials of the same rows: exact, associative, commutative."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"PRC nearest partials of different rows or k: {a.shape} and {b.shape}")
    return np.sort(np.concatenate([a, b], axis=1), axis=1)[:, : a.shape[1]]


def radii_from_nearest(nearest: np.ndarray) -> np.ndarray:
    """Each sample's radius (float32 [n]) from its partial merged over all column tiles of its set."""
    r = np.ascontiguousarray(np.asarray(nearest, np.float32)[:, -1])
    if not np.isfinite(r).all():
        raise MetricInputError(
            f"PRC radii need more than {nearest.shape[1] - 1} samples in the set (or a partial was not merged "
            f"over every column tile); {int((~np.isfinite(r)).sum())} radii are undefined"
        )
    return r


def coverage_tile(
    real: np.ndarray,
    gen: np.ndarray,
    radii_real: np.ndarray,
    radii_gen: np.ndarray,
    *,
    block: int = DEFAULT_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """(real_covered [len(real)], gen_covered [len(gen)]) booleans for one tile of real rows × generated columns.

    real_covered[i]: real row i is within (`<=`) the radius of some generated sample of this tile (recall);
    gen_covered[j]: generated column j is within the radius of some real sample of this tile (precision).
    Merge a row's or column's booleans over tiles with OR.
    """
    a, b = _features(real, "real features"), _features(gen, "generated features")
    _same_dim(a, b, "real and generated features")
    ra, rb = _radii(radii_real, a.shape[0], "real radii"), _radii(radii_gen, b.shape[0], "generated radii")
    real_covered = torch.zeros(a.shape[0], dtype=torch.bool)
    gen_covered = torch.zeros(b.shape[0], dtype=torch.bool)
    for rs in _blocks(a.shape[0], block):
        for cs in _blocks(b.shape[0], block):
            # torch-fidelity's dist_2_1 (real × generated) and its transpose: one block serves both sides.
            d = _cdist(a[rs], b[cs])
            mask = torch.le(d, rb[cs])
            real_covered[rs] |= mask.any(dim=1)
            torch.le(d, ra[rs, None], out=mask)
            gen_covered[cs] |= mask.any(dim=0)
            del d, mask
    return real_covered.numpy(), gen_covered.numpy()


# -------------------------------------------------------------------------------------------- metric


def prc_from_coverage(real_covered: np.ndarray, gen_covered: np.ndarray) -> dict[str, float]:
    """torch-fidelity's precision, recall and f_score from the coverage of every sample, merged over tiles."""
    real_covered, gen_covered = np.asarray(real_covered, bool), np.asarray(gen_covered, bool)
    if real_covered.ndim != 1 or gen_covered.ndim != 1 or not real_covered.size or not gen_covered.size:
        raise MetricInputError(
            f"PRC coverage must be two non-empty vectors; got {real_covered.shape}, {gen_covered.shape}"
        )
    # torch-fidelity's `.float().mean().item()`: a float32 mean, so the same float32 rounding of count/n.
    recall = torch.from_numpy(real_covered).float().mean().item()
    precision = torch.from_numpy(gen_covered).float().mean().item()
    f_score = 2 * precision * recall / max(1e-5, precision + recall)
    return {KEY_METRIC_PRECISION: precision, KEY_METRIC_RECALL: recall, KEY_METRIC_F_SCORE: f_score}


# -------------------------------------------------------------------------------------------- in process


def prc_radii(
    features: np.ndarray,
    *,
    neighborhood: int = DEFAULT_NEIGHBORHOOD,
    tile: int | None = None,
    block: int = DEFAULT_BLOCK,
) -> np.ndarray:
    """Every sample's radius within its own set (float32 [n]), tile by tile as the farm runs them.

    `tile` defaults to one block.
    """
    tile = block if tile is None else tile
    n = np.shape(features)[0]
    if n < _neighbours(neighborhood):
        raise MetricInputError(f"PRC with neighborhood {neighborhood} needs more than {neighborhood} samples; got {n}")
    nearest: dict[int, np.ndarray] = {}
    for t in tiles(n, n, tile, block=block):
        part = nearest_tile(features[t.rows], features[t.cols], neighborhood=neighborhood, block=block)
        nearest[t.row_start] = part if t.row_start not in nearest else merge_nearest(nearest[t.row_start], part)
    return radii_from_nearest(np.concatenate([nearest[s] for s in sorted(nearest)]))


def precision_recall(
    features_gen: np.ndarray,
    features_real: np.ndarray,
    *,
    neighborhood: int = DEFAULT_NEIGHBORHOOD,
    tile: int | None = None,
    block: int = DEFAULT_BLOCK,
) -> dict[str, float]:
    """torch-fidelity's PRC of generated against real features, computed tile by tile in this process.

    Any array that slices by rows works (an `np.memmap` of stored features: only a tile's rows are read).
    `tile` defaults to one block (`DEFAULT_TILE` with the default block).
    """
    tile = block if tile is None else tile
    check_prc_inputs(features_gen, features_real, neighborhood)
    radii_gen = prc_radii(features_gen, neighborhood=neighborhood, tile=tile, block=block)
    radii_real = prc_radii(features_real, neighborhood=neighborhood, tile=tile, block=block)
    real_covered = np.zeros(len(radii_real), bool)
    gen_covered = np.zeros(len(radii_gen), bool)
    for t in tiles(len(radii_real), len(radii_gen), tile, block=block):
        r, g = coverage_tile(
            features_real[t.rows], features_gen[t.cols], radii_real[t.rows], radii_gen[t.cols], block=block
        )
        real_covered[t.rows] |= r
        gen_covered[t.cols] |= g
    return prc_from_coverage(real_covered, gen_covered)
