"""Feature rows that need not be in memory: a side's rows as the blocks its shards stored, read by index.

KID draws `subsets` subsets of `subset_size` rows, 100 × 1000 by default, while a side of 1M samples ×
2048 float32 is 8 GB. So the reducer leaves each shard's rows where they are (`scheduler.row_files` maps a
shard's `.npy`) and the math reads only the rows it draws, through `rows_at` and `row_slice`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from evalfarm.errors import MetricInputError


class RowReader(Protocol):
    """Rows kept elsewhere (a file), read by index or range."""

    shape: tuple[int, int]

    def __len__(self) -> int: ...

    def rows_at(self, index: np.ndarray) -> np.ndarray: ...

    def slice(self, start: int, stop: int) -> np.ndarray: ...


Block = np.ndarray | RowReader


class ConcatRows:
    """Row blocks (arrays, or files) in order, addressed as one (n, d) array that is never assembled."""

    def __init__(self, blocks: Sequence[Block], dim: int) -> None:
        self.blocks = list(blocks)
        self._starts = np.cumsum([0, *(len(b) for b in self.blocks)])
        self.shape = (int(self._starts[-1]), dim)

    def __len__(self) -> int:
        return self.shape[0]

    def rows_at(self, index: np.ndarray) -> np.ndarray:
        """Rows `index`, in that order (as `array[index]` gives them, so that every sum over them is the same)."""
        index = np.asarray(index, np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((len(index), self.shape[1]), np.float32)
        block_of = np.searchsorted(self._starts, index, side="right") - 1
        for b in np.unique(block_of):
            where = block_of == b
            out[where] = rows_at(self.blocks[b], index[where] - self._starts[b])
        return out

    def slice(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, len(self))
        parts = []
        for b, block in enumerate(self.blocks):
            lo, hi = max(start, self._starts[b]), min(stop, self._starts[b + 1])
            if lo < hi:
                parts.append(row_slice(block, int(lo - self._starts[b]), int(hi - self._starts[b])))
        if not parts:
            return np.empty((0, self.shape[1]), np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class RowNotKept(MetricInputError):
    """A row was read that its side did not keep (`SparseRows`)."""


class SparseRows:
    """Some rows of an (n, d) array, addressed by their index in it: the rows at `index` (sorted, unique),
    held in that order by `kept`. A side whose rows serve KID alone keeps only the rows KID draws; reading any
    other is an error, never another row's values."""

    def __init__(self, kept: Rows, index: np.ndarray, n: int) -> None:
        if len(kept) != len(index):
            raise ValueError(f"{len(kept)} rows kept for {len(index)} indices")
        self.kept, self.index = kept, np.asarray(index, np.int64)
        self.shape = (int(n), int(kept.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def rows_at(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, np.int64)
        at = np.searchsorted(self.index, index)
        found = at < len(self.index)
        found[found] = self.index[at[found]] == index[found]
        if not found.all():
            raise RowNotKept(f"KID drew row {int(index[~found][0])} of {len(self)}, which was not kept: the shards "
                             "kept the rows of another draw")
        return rows_at(self.kept, at)

    def slice(self, start: int, stop: int) -> np.ndarray:
        raise MetricInputError("only the rows KID draws were kept; a range of rows cannot be read")


def check_positions(index: np.ndarray, n: int) -> np.ndarray:
    """`index` when it is sorted, unique integer positions of `n` rows (as a file must hold them)."""
    if index.ndim != 1 or index.dtype.kind not in "iu" or (
            len(index) and (index[0] < 0 or index[-1] >= n or np.any(np.diff(index) <= 0))):
        raise MetricInputError(f"the kept row positions are not sorted positions of {n} rows")
    return index


def rows_in(index: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The entries of sorted `index` in [start, stop), as offsets from `start`: which of a batch's rows to keep."""
    lo, hi = np.searchsorted(index, (start, stop))
    return index[lo:hi] - start


Rows = np.ndarray | RowReader | ConcatRows | SparseRows


def rows_at(rows: Rows, index: np.ndarray) -> np.ndarray:
    """`rows[index]` for an array, a file of rows or blocks of them."""
    return rows[index] if isinstance(rows, np.ndarray) else rows.rows_at(index)


def row_slice(rows: Rows, start: int, stop: int) -> np.ndarray:
    return np.asarray(rows[start:stop]) if isinstance(rows, np.ndarray) else rows.slice(start, stop)
