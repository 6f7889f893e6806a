"""A shard's feature rows written to their file while the shard runs, not after it.

The rows of a 5000-image shard are 40 MiB: hashing and writing them once the shard's last batch is done
took about 110 ms of the shard's wall time on the benchmark machine, longer than the rest of the farm's own
work on it. The row count is known when the shard starts (one row per image), so the `.npy` header can go
first and each batch's rows after it, from a thread, while the network runs the next batch (SHA-256 and file
writes release the GIL). What is left for the end is the last batch and a rename. The shard also stops
holding its rows in memory.

The file appears under its key only on `close`, whole and with its digest: an aborted or failed shard leaves
nothing, as with any other write to the feature store.
"""

from __future__ import annotations

import logging

import numpy as np

from evalfarm.metrics.stats import write_npy_header
from evalfarm.scheduler.store import FeatureStore, HashingWriter, ThreadedCalls

log = logging.getLogger(__name__)

SPOOL_DEPTH = 8  #: batches waiting to be written; a slow disk then slows the shard instead of filling memory


class _Aborted(Exception):
    """Thrown into the store's writer so that it removes its temporary file."""


class RowSpool:
    """The float32 `.npy` of `n` rows of `dim` features under `key`, written a batch at a time by a thread."""

    def __init__(self, store: FeatureStore, key: str, n: int, dim: int, *, depth: int = SPOOL_DEPTH) -> None:
        self.key, self.n, self.dim = key, n, dim
        self._writer = store.writer(key)
        out = HashingWriter(self._writer.__enter__())
        self._out = out
        self._queued = 0
        self._open = True
        try:
            write_npy_header(out, np.dtype("<f4"), (n, dim))
            self._rows = ThreadedCalls(lambda block: out.write(block.reshape(-1).view(np.uint8)), depth,
                                       f"rows {key}")
        except BaseException as exc:
            self._open = False
            self._writer.__exit__(type(exc), exc, exc.__traceback__)  # removes the temporary file
            raise

    def write(self, rows: np.ndarray) -> None:
        """Queue a batch's rows (copied: the caller may reuse its buffer); a failed write surfaces here."""
        self._rows.raise_failure()
        block = np.array(rows, dtype="<f4", order="C", copy=True)
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise ValueError(f"rows of shape {block.shape} for a file of {self.dim} features")
        if self._queued + len(block) > self.n:
            raise ValueError(f"more than the {self.n} rows {self.key} was opened for")
        self._queued += len(block)
        self._rows.put(block)

    def close(self) -> str:
        """Wait for the rows still queued, put the file in place and return its SHA-256 (the whole file's)."""
        if not self._open:
            raise ValueError(f"{self.key}: the spool was already closed")
        self._rows.stop()
        self._open = False
        error = self._rows.failure
        if error is None and self._queued != self.n:
            error = ValueError(f"{self._queued} rows written to {self.key}, opened for {self.n}")
        if error is not None:
            self._writer.__exit__(_Aborted, _Aborted(), None)
            raise error
        self._writer.__exit__(None, None, None)
        return self._out.hexdigest()

    def abort(self) -> None:
        """Drop what was written (the shard failed or was cancelled); a spool already closed is left as it is.
        Best effort and silent: it runs while the shard's own error is on its way out, and must not replace it
        (a temporary file it could not remove is the janitor's)."""
        if not self._open:
            return
        self._open = False
        self._rows.stop()
        try:
            self._writer.__exit__(_Aborted, _Aborted(), None)
        except _Aborted:
            pass
        except Exception:
            log.warning("could not remove the unfinished rows file of %s", self.key, exc_info=True)
