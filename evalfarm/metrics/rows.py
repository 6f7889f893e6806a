"""Feature rows that need not be in memory: a side's rows as the blocks its shards stored, read by index.

KID draws `subsets` subsets of `subset_size` rows, 100 × 1000 by default, while a side of 1M samples ×
2048 float32 is 8 GB. So the reducer leaves each shard's rows where they are (`scheduler.row_files` maps a
shard's `.npy`) and the math reads only the rows it draws, through `rows_at` and `row_slice`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


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


Rows = np.ndarray | RowReader | ConcatRows


def rows_at(rows: Rows, index: np.ndarray) -> np.ndarray:
    """`rows[index]` for an array, a file of rows or blocks of them."""
    return rows[index] if isinstance(rows, np.ndarray) else rows.rows_at(index)


def row_slice(rows: Rows, start: int, stop: int) -> np.ndarray:
    return np.asarray(rows[start:stop]) if isinstance(rows, np.ndarray) else rows.slice(start, stop)
