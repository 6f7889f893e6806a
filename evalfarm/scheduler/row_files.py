"""Feature rows read from their `.npy` in the feature store, never loaded whole: a shard's rows file, or the
`features.npy` member of a cached reference's `.npz` (stored uncompressed, so it is a `.npy` at an offset).

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
from typing import BinaryIO

import numpy as np

from evalfarm.sources.arrays import read_npy_header

_HASH_CHUNK = 16 << 20  #: bytes hashed per step; their pages are dropped after each step


class NpyFileRows:
    """The rows of a 2-D float32 C-ordered `.npy` file, mapped and read by index; with `member`, of the `.npy`
    of (offset, length) inside a larger file (see `npz_member`). `file` may be an open binary file, so that
    what was checked and what is mapped are one file even if its path is replaced meanwhile."""

    def __init__(self, file: str | os.PathLike[str] | BinaryIO, member: tuple[int, int] | None = None) -> None:
        if isinstance(file, (str, os.PathLike)):
            self.path = os.fspath(file)
            with open(self.path, "rb") as f:
                self._open(f, member)
        else:
            self.path = str(getattr(file, "name", "<file>"))
            self._open(file, member)

    def _open(self, f: BinaryIO, member: tuple[int, int] | None) -> None:
        at, length = member if member is not None else (0, os.fstat(f.fileno()).st_size)
        f.seek(at)
        shape, fortran, dtype = read_npy_header(f)
        offset = f.tell()
        if len(shape) != 2 or fortran or dtype != np.dtype("<f4"):
            raise ValueError(f"{self.path}: expected 2-D C-ordered float32 rows, got {dtype} {shape}")
        if offset + shape[0] * shape[1] * 4 != at + length or at + length > os.fstat(f.fileno()).st_size:
            raise ValueError(f"{self.path}: {length} bytes for {shape} float32 rows")
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


def npz_member(f: BinaryIO, name: str) -> tuple[int, int] | None:
    """(offset, length) of member `name`'s bytes in the open `.npz` `f`, when it is stored uncompressed (as
    evalfarm writes them); None when it is absent or compressed (then it must be read as a whole). Its CRC is
    not checked here: what is mapped is checked against the statistics' digest instead."""
    with zipfile.ZipFile(f) as z:  # a file passed in stays open
        try:
            info = z.getinfo(name)
        except KeyError:
            return None
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        return None
    f.seek(info.header_offset)  # the local header's own name and extra lengths may differ from the directory's
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"member {name} has no local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size
