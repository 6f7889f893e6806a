"""A shard's feature rows read from its `.npy` file in the feature store, never loaded whole.

The file is memory-mapped once: the mapping pins the content that was verified, even if a rerun of the shard
replaces the file. The pages a read touched are given back at once, so that the rows read, not the rows
stored, bound the reducer's memory (see `metrics.rows`).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import zipfile

import numpy as np

from evalfarm.sources.arrays import read_npy_header

_HASH_CHUNK = 16 << 20  #: bytes hashed per step; their pages are dropped after each step


class NpyFileRows:
    """The rows of a 2-D float32 C-ordered `.npy` file, mapped and read by index; with `at`, of the `.npy`
    that starts at byte `at` of a larger file (a member stored uncompressed in an `.npz`, see `npz_member_at`)."""

    def __init__(self, path: str | os.PathLike[str], at: int | None = None) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            f.seek(at or 0)
            shape, fortran, dtype = read_npy_header(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
            if len(shape) != 2 or fortran or dtype != np.dtype("<f4"):
                raise ValueError(f"{self.path}: expected 2-D C-ordered float32 rows, got {dtype} {shape}")
            end = offset + shape[0] * shape[1] * 4
            if end > size or (at is None and end != size):
                raise ValueError(f"{self.path}: {size} bytes for {shape} float32 rows")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # never empty: it holds the header
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self._offset = offset

    def __len__(self) -> int:
        return self.shape[0]

    def _array(self) -> np.ndarray:
        return np.frombuffer(self._map, np.float32, self.shape[0] * self.shape[1], self._offset).reshape(self.shape)

    def _release(self) -> None:
        self._map.madvise(mmap.MADV_DONTNEED)

    def rows_at(self, index: np.ndarray) -> np.ndarray:
        out = self._array()[index]  # a copy: fancy indexing
        self._release()
        return out

    def slice(self, start: int, stop: int) -> np.ndarray:
        out = np.array(self._array()[start:stop])
        self._release()
        return out

    def file_sha256(self) -> str:
        """SHA-256 of the file's bytes as mapped: what is verified is what is read later."""
        h = hashlib.sha256()
        view = memoryview(self._map)
        try:
            for at in range(0, len(view), _HASH_CHUNK):
                h.update(view[at : at + _HASH_CHUNK])
                self._release()
        finally:
            view.release()
        return h.hexdigest()


def npz_member_at(path: str, name: str) -> int | None:
    """Where member `name` of the `.npz` at `path` starts in the file, when it is stored uncompressed (as
    evalfarm writes them); None when it is absent or compressed (then it must be read as a whole)."""
    with zipfile.ZipFile(path) as z:
        try:
            info = z.getinfo(name)
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as f:  # the local header's own name and extra lengths, which may differ from the directory's
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"{path}: member {name} has no local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len
