"""The one carrier of a side's statistics: what a shard accumulates, the reducer sums, and the store keeps.

For features X (n×d) and, on the samples side, the logits of each sample's IS split, it holds n, Σx and
XᵀX in float64 (FID), per-split n, Σp and Σ Σ_y p·log p (IS), and optionally the float32 rows of X
(KID), all of them or those at `row_index`. Every sum merges by `+`, so merging shards in a fixed order
gives the statistics of the whole set up to float64 rounding, whatever the number of shards (stylegan3's
`FeatureStats` idea). One encoding, `.npz` without pickles, serves partials and cached references alike. It
holds the symmetric Gram as its packed upper triangle (`gram_upper`): half the bytes, written from `syrk`'s
triangle without mirroring it, since writing a shard's partial is the farm's main cost per shard.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterator, Mapping
from typing import IO

import numpy as np
import scipy.linalg

from evalfarm.errors import MetricInputError
from evalfarm.metrics.rows import ConcatRows, RowReader, Rows, SparseRows, check_positions, row_slice, rows_in

_SPLIT_FIELDS = ("split_n", "split_p", "split_plogp")
_ARRAY_FIELDS = ("n", "sum", "gram", "gram_upper", "features", "row_index", *_SPLIT_FIELDS)
_ROW_BLOCK = 8192  #: rows written per step when they come from files
_WRITE_BYTES = 4 << 20  #: small blocks are joined into writes of about this size


class FeatureStats:
    """Mergeable statistics of (part of) one side; `+` merges, `add` accumulates a batch in place.

    While accumulating, the Gram grows by BLAS `syrk` on its upper triangle, in place: half the products of
    `gram += x.T @ x` and no 32 MiB temporary per batch (on a GPU host this host-side sum, not the network,
    bounded a shard's throughput). `gram` mirrors the triangle once, when it is first read.
    """

    def __init__(
        self,
        n: int,
        sum: np.ndarray,  # noqa: A002 - the statistic's name
        gram: np.ndarray,
        *,
        features: np.ndarray | None = None,
        split_n: np.ndarray | None = None,
        split_p: np.ndarray | None = None,
        split_plogp: np.ndarray | None = None,
        meta: Mapping[str, str] | None = None,
        row_index: np.ndarray | None = None,
    ) -> None:
        self.n = int(n)
        self.sum = np.asarray(sum, np.float64)
        self._gram: np.ndarray | None = np.asarray(gram, np.float64)
        self._upper: np.ndarray | None = None  # Fortran-ordered; the upper triangle, zeros below it
        self.keep_features = features is not None
        self._chunks: list[np.ndarray | RowReader] = [] if features is None else [np.asarray(features, np.float32)]
        self.split_n, self.split_p, self.split_plogp = split_n, split_p, split_plogp
        self.row_index = None if row_index is None else np.asarray(row_index, np.int64)
        """Positions (sorted) of the rows kept, in memory or stored apart, when only some are: a side whose rows
        serve KID alone keeps the rows KID draws (`scheduler.kid_rows`). None: every row."""
        self.meta: dict[str, str] = dict(meta or {})
        """Provenance stored beside the arrays (a cached reference's content hash, weights, resize)."""
        self._moments: tuple[np.ndarray, np.ndarray] | None = None

    # -- building ----------------------------------------------------------------------------------------------

    @classmethod
    def new(cls, dim: int, *, splits: int = 0, classes: int = 0, keep_features: bool = True,
            row_index: np.ndarray | None = None) -> FeatureStats:
        """Zero statistics to `add` batches to; with `splits`, also the IS sums over `classes` logits; with
        `row_index`, only the rows at those positions of what is added are kept."""
        stats = cls(0, np.zeros(dim), np.zeros((0, 0)), row_index=row_index)
        stats._gram, stats._upper = None, np.zeros((dim, dim), np.float64, order="F")
        stats.keep_features = keep_features
        if splits:
            stats.split_n = np.zeros(splits, np.int64)
            stats.split_p = np.zeros((splits, classes), np.float64)
            stats.split_plogp = np.zeros(splits, np.float64)
        return stats

    @classmethod
    def of(
        cls,
        features: np.ndarray,
        logits: np.ndarray | None = None,
        split_ids: np.ndarray | None = None,
        splits: int = 0,
        *,
        keep_features: bool = True,
    ) -> FeatureStats:
        """Statistics of one array of rows (and their logits, split by `split_ids`)."""
        x = np.asarray(features)
        stats = cls.new(x.shape[1], splits=splits, classes=0 if logits is None else np.shape(logits)[1],
                        keep_features=keep_features)
        stats.add(x, logits, split_ids)
        return stats

    @classmethod
    def from_moments(cls, mu: np.ndarray, sigma: np.ndarray, n: int = 0) -> FeatureStats:
        """A side known only by its mean and covariance (a pytorch-fid `mu`/`sigma` file): FID only, no merge."""
        mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        stats = cls(n, mu * n, np.zeros((0, 0)))
        stats._gram, stats._moments = None, (mu, sigma)
        return stats

    def add(self, features: np.ndarray, logits: np.ndarray | None = None, split_ids: np.ndarray | None = None) -> None:
        """Accumulate a batch of rows; with `logits` and `split_ids`, also their IS split sums."""
        self._check_mergeable()
        x = np.asarray(features, dtype=np.float64)
        if not len(x):
            return
        if self._upper is None:  # a copy (the full Gram may be shared), its strict lower triangle zero
            self._upper = np.asfortranarray(np.triu(self.gram))
        if self.keep_features:
            self._chunks.append(np.array(self.kept_of(features), dtype=np.float32))
        self.n += len(x)
        self.sum += x.sum(axis=0)
        syrk = scipy.linalg.blas.get_blas_funcs("syrk", (self._upper,))
        self._upper = syrk(1.0, x, beta=1.0, c=self._upper, trans=1, lower=0, overwrite_c=1)
        self._gram = None
        if logits is not None:
            self._add_logits(logits, split_ids)

    def kept_of(self, batch: np.ndarray) -> np.ndarray:
        """The rows of `batch`, the next to be added, that these statistics keep (all but with a `row_index`)."""
        return batch if self.row_index is None else batch[rows_in(self.row_index, self.n, self.n + len(batch))]

    def _add_logits(self, logits: np.ndarray, split_ids: np.ndarray) -> None:
        """Softmax with one exp, and the sums per split by sorting the batch's rows into runs of one split
        (`reduceat`): `np.add.at` over 1008 columns was most of the cost, 15 ms of a 500-row batch, now 2 ms."""
        if self.split_n is None:
            raise ValueError("these statistics were created without IS splits")
        if len(split_ids) != len(logits):
            raise ValueError(f"{len(split_ids)} split ids for {len(logits)} rows of logits")
        if not len(logits):
            return
        log_p = np.asarray(logits, dtype=np.float64)
        log_p = log_p - log_p.max(axis=1, keepdims=True)
        p = np.exp(log_p)
        total = p.sum(axis=1, keepdims=True)
        p /= total
        log_p -= np.log(total)
        # xlogy semantics: p == 0 (exp underflow) contributes 0; log_p stays finite for finite logits.
        plogp = np.einsum("ij,ij->i", p, log_p)
        order = np.argsort(split_ids, kind="stable")
        ids = np.asarray(split_ids)[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        runs = ids[starts]
        self.split_n[runs] += np.diff(np.r_[starts, len(ids)])
        self.split_p[runs] += np.add.reduceat(p[order], starts, axis=0)
        self.split_plogp[runs] += np.add.reduceat(plogp[order], starts)

    # -- reading -----------------------------------------------------------------------------------------------

    @property
    def gram(self) -> np.ndarray:
        """XᵀX, exactly symmetric and C-ordered."""
        self._check_mergeable()
        if self._gram is None:  # the strict lower triangle of `_upper` is zero: one pass, exact
            upper = self._upper
            self._gram = np.add(upper, upper.T, order="C")
            np.fill_diagonal(self._gram, np.diagonal(upper))
            self._upper = None
        return self._gram

    @property
    def row_count(self) -> int:
        """How many rows are kept (or stored apart): `n`, or fewer with a `row_index`."""
        return self.n if self.row_index is None else len(self.row_index)

    @property
    def features(self) -> np.ndarray | None:
        """The float32 rows, in order, in memory, when they were kept; None otherwise. `rows` reads fewer."""
        if not self.keep_features:
            return None
        if self.row_index is not None:
            raise MetricInputError("only the rows KID draws were kept; these statistics cannot give every row")
        if len(self._chunks) != 1 or not isinstance(self._chunks[0], np.ndarray):
            dim = self.sum.shape[0]
            whole = [row_slice(c, 0, len(c)) for c in self._chunks]
            self._chunks = [np.concatenate(whole) if whole else np.empty((0, dim), np.float32)]
        return self._chunks[0]

    @property
    def rows(self) -> Rows | None:
        """The float32 rows, in order, where they are (memory, or the shards' files): KID reads the rows it draws
        and precision/recall a block at a time, so a side's features are never assembled."""
        if not self.keep_features:
            return None
        kept = self._chunks[0] if len(self._chunks) == 1 else ConcatRows(self._chunks, self.sum.shape[0])
        return kept if self.row_index is None else SparseRows(kept, self.row_index, self.n)

    def attach_features(self, rows: np.ndarray | RowReader) -> None:
        """Give statistics read without their rows the rows they were computed from (stored apart, perhaps left
        in their file: a `RowReader`)."""
        if len(rows) != self.row_count:
            raise ValueError(f"{len(rows)} feature rows for statistics of {self.n} samples that keep "
                             f"{self.row_count}")
        chunk = rows if hasattr(rows, "rows_at") else np.asarray(rows, np.float32)
        self.keep_features, self._chunks = True, [chunk]

    @property
    def has_splits(self) -> bool:
        return self.split_n is not None

    def mean(self) -> np.ndarray:
        return self._moments[0] if self._moments is not None else self.sum / self.n

    def cov(self) -> np.ndarray:
        """Unbiased covariance (ddof 1), as `np.cov(features, rowvar=False)`."""
        if self._moments is not None:
            return self._moments[1]
        mu = self.mean()
        cov = (self.gram - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2  # exact symmetry for the eigen route

    # -- merging -----------------------------------------------------------------------------------------------

    def __add__(self, other: FeatureStats) -> FeatureStats:
        self._check_mergeable()
        other._check_mergeable()
        if self.has_splits != other.has_splits:
            raise ValueError("cannot merge statistics with IS split sums and statistics without them")
        if self.keep_features != other.keep_features:
            raise ValueError("cannot merge statistics that keep their feature rows with statistics that do not")
        if self._upper is not None and other._upper is not None:  # add the triangles; mirror once, when read
            out = FeatureStats(self.n + other.n, self.sum + other.sum, np.zeros((0, 0)))
            out._gram, out._upper = None, np.add(self._upper, other._upper, order="F")
        else:  # the same numbers: each element of a mirrored sum is the sum of the mirrored elements
            out = FeatureStats(self.n + other.n, self.sum + other.sum, self.gram + other.gram)
        if self.has_splits:
            out.split_n = self.split_n + other.split_n
            out.split_p = self.split_p + other.split_p
            out.split_plogp = self.split_plogp + other.split_plogp
        out.keep_features = self.keep_features
        if out.keep_features:
            out._chunks = [*self._chunks, *other._chunks]
        if self.row_index is not None or other.row_index is not None:  # a part that kept every row: all of them
            out.row_index = np.concatenate([self._kept_positions(), other._kept_positions() + self.n])
        return out

    def _kept_positions(self) -> np.ndarray:
        return np.arange(self.n, dtype=np.int64) if self.row_index is None else self.row_index

    def _check_mergeable(self) -> None:
        if self._moments is not None:
            raise MetricInputError("statistics known only by mean and covariance cannot be merged or extended")

    def digest(self) -> str:
        """SHA-256 of every array (not of their encoding): what a cached copy is checked against on read."""
        h = hashlib.sha256()
        arrays = {"n": np.int64(self.n), "sum": self.sum, "gram": self.gram, "row_index": self.row_index,
                  "features": None, "split_n": self.split_n, "split_p": self.split_p, "split_plogp": self.split_plogp}
        for name, array in arrays.items():
            if name == "features" and self.keep_features:  # a block at a time: the rows may be files
                h.update(f"features:<f4:{(self.row_count, self.sum.shape[0])};".encode())
                for block in self.row_blocks():
                    h.update(block)
            elif array is not None:
                a = np.ascontiguousarray(array)
                h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
                h.update(a)
        return h.hexdigest()

    # -- the one encoding --------------------------------------------------------------------------------------

    def upper_columns(self) -> Iterator[np.ndarray]:
        """The Gram's upper triangle column by column (column j: rows 0..j), as views of the array held: in
        this order they are `gram_upper`, the packed triangle the encoding stores."""
        self._check_mergeable()
        dim = self.sum.shape[0]
        if self._upper is not None:  # Fortran order: each column's rows 0..j are contiguous
            return (self._upper[: j + 1, j] for j in range(dim))
        if not np.array_equal(self._gram, self._gram.T):  # its triangle would not stand for it
            raise ValueError("a Gram that is not exactly symmetric cannot be stored as its triangle")
        return (self._gram[j, : j + 1] for j in range(dim))  # C order, symmetric: row j's first j+1 elements

    def write(self, out: IO[bytes], *, features: bool = True) -> None:
        """Stream the `.npz` encoding into `out` (features only if kept and asked for; `meta` as strings).
        The arrays go out in blocks of a few MiB, never assembled whole; `out` may be unseekable (a hashing
        writer), and the zip then carries data descriptors, which Python's zipfile and numpy read."""
        dim = self.sum.shape[0]
        small: dict[str, np.ndarray] = {"n": np.int64(self.n), "sum": self.sum}
        if self.has_splits:
            small.update(split_n=self.split_n, split_p=self.split_p, split_plogp=self.split_plogp)
        if self.row_index is not None:
            small["row_index"] = self.row_index
        small.update({k: np.str_(v) for k, v in self.meta.items()})
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, array in small.items():
                a = np.asarray(array, order="C")  # 0-d stays 0-d (`ascontiguousarray` would make it 1-d)
                _write_member(z, name, a.dtype, a.shape, [a])
            _write_member(z, "gram_upper", np.dtype("<f8"), (dim * (dim + 1) // 2,), self.upper_columns())
            if features and self.keep_features:
                _write_member(z, "features", np.dtype("<f4"), (self.row_count, dim), self.row_blocks())

    def write_rows(self, out: IO[bytes]) -> None:
        """Stream the kept float32 rows into `out` as one `.npy` (a shard's rows file, mapped by the reducer)."""
        if not self.keep_features:
            raise ValueError("these statistics kept no feature rows")
        _write_npy(out, np.dtype("<f4"), (self.row_count, self.sum.shape[0]), self.row_blocks())

    def row_blocks(self) -> Iterator[np.ndarray]:
        """The float32 rows in order, a block at a time, as they are held (read from their files in steps)."""
        for chunk in self._chunks:
            if isinstance(chunk, np.ndarray):
                yield np.ascontiguousarray(chunk, np.float32)
            else:
                for at in range(0, len(chunk), _ROW_BLOCK):
                    yield row_slice(chunk, at, at + _ROW_BLOCK)

    def to_bytes(self, *, features: bool = True) -> bytes:
        """The encoding (`write`) as bytes."""
        buf = io.BytesIO()
        self.write(buf, features=features)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, features: bool = True) -> FeatureStats:
        """Decode `to_bytes` (or an older encoding with the whole `gram`); `features=False` leaves the feature
        rows unread."""
        return cls.load(io.BytesIO(data), features=features)

    @classmethod
    def load(cls, file: str | IO[bytes], *, features: bool = True) -> FeatureStats:
        """Decode the encoding from a path or file, reading only the members used (`features=False` leaves
        the rows, most of a cached reference's bytes, unread)."""
        with np.load(file, allow_pickle=False) as z:
            names = set(z.files)
            splits = {k: z[k] for k in _SPLIT_FIELDS if k in names}
            dim = z["sum"].shape[0]
            packed = z["gram_upper"] if "gram_upper" in names else None
            stats = cls(
                int(z["n"]),
                z["sum"],
                z["gram"] if packed is None else np.zeros((0, 0)),
                features=z["features"] if features and "features" in names else None,
                **splits,
                meta={k: str(z[k]) for k in names - set(_ARRAY_FIELDS)},
                row_index=check_positions(z["row_index"], int(z["n"])) if "row_index" in names else None,
            )
        if packed is not None:
            stats._gram, stats._upper = None, unpack_upper(packed, dim)
        if stats.keep_features and len(stats._chunks[0]) != stats.row_count:
            raise MetricInputError(f"{len(stats._chunks[0])} feature rows stored for {stats.row_count}")
        return stats


def encoded_size(dim: int) -> int:
    """About the bytes of a shard's statistics without rows: their packed Gram triangle (the rest is small)."""
    return dim * (dim + 1) // 2 * 8


def unpack_upper(packed: np.ndarray, dim: int) -> np.ndarray:
    """The Fortran-ordered (dim, dim) upper triangle, zeros below, of `gram_upper` (see `upper_columns`)."""
    if packed.shape != (dim * (dim + 1) // 2,):
        raise MetricInputError(f"a packed Gram of {packed.shape} values for {dim} features")
    upper = np.zeros((dim, dim), np.float64, order="F")
    flat = upper.reshape(-1, order="F")  # a view: column j starts at j * dim
    at = 0
    for j in range(dim):
        flat[j * dim : j * dim + j + 1] = packed[at : at + j + 1]
        at += j + 1
    return upper


def _write_member(z: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...],
                  blocks: Iterator[np.ndarray] | list[np.ndarray]) -> None:
    """One `.npy` member of an `.npz`, its data written block by block."""
    with z.open(f"{name}.npy", "w", force_zip64=True) as member:
        _write_npy(member, dtype, shape, blocks)


def write_npy_header(out: IO[bytes], dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """The header of a C-ordered `.npy` of `shape`: what its data, written after it, is read as."""
    np.lib.format.write_array_header_1_0(
        out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})


def _write_npy(out: IO[bytes], dtype: np.dtype, shape: tuple[int, ...],
               blocks: Iterator[np.ndarray] | list[np.ndarray]) -> None:
    """A C-ordered `.npy` of `shape`, its data written block by block (small blocks joined into writes of a
    few MiB, large ones as they are), never assembled whole."""
    write_npy_header(out, dtype, shape)
    written, expected = 0, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    for data in _coalesced(np.asarray(b, dtype, order="C").reshape(-1).view(np.uint8) for b in blocks):
        out.write(data)
        written += data.nbytes
    if written != expected:
        raise ValueError(f"wrote {written} bytes for an array of {shape} {dtype}")


def _coalesced(blocks: Iterator[np.ndarray], size: int = _WRITE_BYTES) -> Iterator[np.ndarray]:
    """Small byte blocks joined into writes of about `size` (a Gram's 2048 columns would be 2048 writes);
    large ones passed through as they are."""
    pending: list[np.ndarray] = []
    held = 0
    for block in blocks:
        if block.nbytes >= size:
            if pending:
                yield np.concatenate(pending)
                pending, held = [], 0
            yield block
            continue
        pending.append(block)
        held += block.nbytes
        if held >= size:
            yield np.concatenate(pending)
            pending, held = [], 0
    if pending:
        yield np.concatenate(pending)
