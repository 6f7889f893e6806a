"""Sample sets stored as one uint8 array: `.npy`, or `.npz` as guided-diffusion / ADM samplers write them.

These files are often tens of GB, so images are read by index range without loading the whole array:
a local `.npy` or uncompressed `.npz` member is read with `pread`; a remote one (fsspec) with seek+readinto;
a compressed `.npz` member is decompressed as a stream (see `ArraySource`).
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zipfile
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from evalfarm.errors import SourceError
from evalfarm.sources.base import Source, is_url, open_binary, reason, sha256_file

EXPECTED_LAYOUT = (
    "expected images as NHWC uint8: shape (N, H, W, 3), or (N, H, W) / (N, H, W, 1) grayscale, "
    "or (N, H, W, 4) RGBA (alpha is dropped)"
)
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: signature ... name length, extra length
_LOCAL_HEADER_SIG = b"PK\x03\x04"


def rgb_batch(raw: np.ndarray) -> np.ndarray:
    """(n, H, W[, C]) uint8 to a new C-contiguous (n, H, W, 3) array: a copy, so no memmap view leaks out."""
    raw = np.asarray(raw)  # drops the memmap subclass without copying
    if raw.ndim == 3:
        return np.repeat(raw[..., None], 3, axis=3)
    if raw.shape[3] == 1:
        return np.repeat(raw, 3, axis=3)
    return np.array(raw[..., :3], dtype=np.uint8, order="C")


def _read_exact(fp: IO[bytes], n: int) -> bytes:
    data = bytearray(n)
    _fill(memoryview(data), lambda part, done: fp.readinto(part))
    return bytes(data)


def read_npy_header(fp: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a `.npy` stream at its start; ValueError, naming no content, otherwise."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fp)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(fp)
    except Exception as exc:  # numpy quotes the bytes it rejected; a message must not show the file's content
        raise ValueError("not a .npy array (its header could not be parsed)") from exc
    # 3.0 exists only for structured dtypes with non-latin-1 field names: never an image array
    raise ValueError(f".npy format version {version} cannot hold an image array; {EXPECTED_LAYOUT}")


class _RangeReader:
    """Image ranges of a C-ordered uint8 array, each read into a fresh batch: with `pread` from a local file,
    by seek and `readinto` (under a lock) from a stream (an fsspec file, a zip member).

    Never a mapping: a file truncated under a mapping kills the reading process (SIGBUS), where a short read
    here is a clean error, and nothing of the file stays in the process's memory once a batch is copied out.
    `pread` moves no shared file offset, so threads and forked processes may read a local file at once."""

    def __init__(self, fp: IO[bytes], offset: int, shape: tuple[int, ...], owner: Any = None) -> None:
        self.fp, self.offset, self.shape = fp, offset, shape
        self.owner = owner  # keeps the ZipFile / raw file under a member stream alive
        self.item_bytes = int(np.prod(shape[1:]))
        self.lock = threading.Lock()
        self._pread = isinstance(fp, io.FileIO) and hasattr(os, "preadv")

    @classmethod
    def of_file(cls, path: str, offset: int, shape: tuple[int, ...]) -> _RangeReader:
        return cls(open(path, "rb", buffering=0), offset, shape)  # noqa: SIM115 - closed by `close`

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), np.uint8)
        view = memoryview(out).cast("B")
        at = self.offset + start * self.item_bytes
        if self._pread:
            fd = self.fp.fileno()  # asked at each read: a closed file is then an error, never another file's fd
            _fill(view, lambda part, done: os.preadv(fd, [part], at + done), _CHANGED)
        else:
            with self.lock:
                self.fp.seek(at)
                _fill(view, lambda part, done: self.fp.readinto(part), _CHANGED)
        return out

    def close(self) -> None:
        for obj in (self.fp, self.owner):
            if obj is not None:
                obj.close()


_CHANGED = ": it changed since it was opened"  #: why a range the header promised can end early


def _fill(view: memoryview, read_into: Callable[[memoryview, int], int | None], why: str = "") -> None:
    """Fill `view` by `read_into(the part left, bytes done so far)` calls; a file that ends first is an error."""
    done = 0
    while done < len(view):
        n = read_into(view[done:], done)
        if not n:
            raise EOFError(f"file ends {len(view) - done} bytes early{why}")
        done += n


class ArraySource(Source):
    """Images from a `.npy`, or from one array of a `.npz` (`arr_0`, else its only array).

    Access per kind, set up lazily once per process:
    - local `.npy` / uncompressed `.npz` member (`np.savez`): `pread` of the requested images' bytes at the
      array's data offset (for `.npz`, found through the member's zip local header), so reading image i reads
      only its bytes; such a source is read by a thread in the featurizing process (`copies_ranges`);
    - remote (fsspec) `.npy` / uncompressed member: seek+readinto of the byte range of the requested images;
    - compressed member (`np.savez_compressed`): the member is decompressed as a stream, nothing is cached.
      Reading forward (what an evaluation does, also per DataLoader worker) costs one decompression pass per
      process; reading backwards restarts decompression from the start of the member. Re-save with
      `np.savez` or as `.npy` for fast random access;
    - Fortran-ordered arrays: memory-mapped when local (strided, but bounded memory), otherwise loaded whole.
    """

    _handle_attrs = ("_data",)

    @property
    def copies_ranges(self) -> bool:
        return not (self._remote or self._compressed or self._fortran)

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self._remote = is_url(uri)
        self._path = uri if self._remote else os.path.expanduser(uri)
        lower = uri.lower().rstrip("/")
        if lower.endswith(".npy"):
            self._kind = "npy"
        elif lower.endswith(".npz"):
            self._kind = "npz"
        else:
            raise SourceError(f"{uri} is not a .npy or .npz file")
        self.key: str | None = None  # the .npz array read
        self._member: str | None = None
        self._compressed = False
        self._member_start = 0  # where the member's .npy bytes start in the raw file (uncompressed member)
        self._offset = 0  # where the array data starts: in the raw file, or in a compressed member's stream
        self.shape: tuple[int, ...] = ()
        self._fortran = False
        fp = open_binary(self._path)
        try:
            dtype = self._inspect(fp)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"cannot read {uri}: {reason(exc)}") from exc
        finally:
            fp.close()
        self._check_layout(dtype)

    # -- layout ----------------------------------------------------------------------------------------------

    def _inspect(self, fp: IO[bytes]) -> np.dtype:
        """Read only headers: the array's dtype, shape, order and data offset."""
        if self._kind == "npy":
            self.shape, self._fortran, dtype = read_npy_header(fp)
            self._offset = fp.tell()
            size = os.path.getsize(self._path) if not self._remote else getattr(fp, "size", None)
            self._check_size(size, self._offset, dtype)
            return dtype
        with zipfile.ZipFile(fp) as zf:
            info = zf.getinfo(self._choose_member(zf))
            encrypted = bool(info.flag_bits & 0x1)
            if info.compress_type == zipfile.ZIP_STORED and not encrypted:
                fp.seek(info.header_offset)
                sig, name_len, extra_len = _LOCAL_HEADER.unpack(_read_exact(fp, _LOCAL_HEADER.size))
                if sig != _LOCAL_HEADER_SIG:
                    raise ValueError(f"bad zip local header for member {info.filename!r}")
                self._member_start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
                fp.seek(self._member_start)
                self.shape, self._fortran, dtype = read_npy_header(fp)
                self._offset = fp.tell()
                self._check_size(info.file_size, self._offset - self._member_start, dtype)
            else:
                self._compressed = True
                with zf.open(info) as member:
                    self.shape, self._fortran, dtype = read_npy_header(member)
                    self._offset = member.tell()
                self._check_size(info.file_size, self._offset, dtype)
        return dtype

    def _choose_member(self, zf: zipfile.ZipFile) -> str:
        keys = {name[: -len(".npy")]: name for name in zf.namelist() if name.endswith(".npy")}
        if "arr_0" in keys:
            self.key = "arr_0"
        elif len(keys) == 1:
            (self.key,) = keys
        elif not keys:
            raise SourceError(f"{self.uri} holds no arrays; {EXPECTED_LAYOUT}")
        else:
            raise SourceError(
                f"{self.uri} holds several arrays and none is named 'arr_0': {', '.join(sorted(keys))}; "
                "save the images alone with np.savez(path, images) or as .npy"
            )
        self._member = keys[self.key]
        return self._member

    def _check_size(self, size: int | None, header_bytes: int, dtype: np.dtype) -> None:
        if size is None or dtype.hasobject:
            return
        need = header_bytes + int(np.prod(self.shape)) * dtype.itemsize
        if size < need:
            raise SourceError(f"{self.uri} is truncated: its header needs {need} bytes, it has {size}")

    def _check_layout(self, dtype: np.dtype) -> None:
        what = f"{self.uri}" + (f" (array {self.key!r})" if self.key else "")
        shape = tuple(self.shape)
        if dtype != np.dtype(np.uint8):
            hint = " (scale to [0, 255] and cast with .astype(np.uint8))" if dtype.kind in "fiub" else ""
            raise SourceError(f"{what} has dtype {dtype} and shape {shape}; {EXPECTED_LAYOUT}{hint}")
        if len(shape) == 4 and shape[3] not in (1, 3, 4) and shape[1] in (1, 3, 4):
            raise SourceError(
                f"{what} has shape {shape}, which looks like NCHW; {EXPECTED_LAYOUT} (transpose with "
                "x.transpose(0, 2, 3, 1))"
            )
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3, 4))):
            raise SourceError(f"{what} has shape {shape}; {EXPECTED_LAYOUT}")
        if shape[0] > 0 and (shape[1] == 0 or shape[2] == 0):
            raise SourceError(f"{what} has empty images, shape {shape}; {EXPECTED_LAYOUT}")

    # -- per-process access ----------------------------------------------------------------------------------

    def _backing(self) -> np.ndarray | _RangeReader:
        """This process's view of the array: np.memmap, _RangeReader, or (Fortran order, remote) the array."""
        lock = self._in_this_process()
        with lock:
            if self._data is None:
                try:
                    self._data = self._open_backing()
                except SourceError:
                    raise
                except Exception as exc:
                    raise SourceError(f"cannot read {self.uri}: {reason(exc)}") from exc
            return self._data

    def _open_backing(self) -> np.ndarray | _RangeReader:
        if self.shape[0] == 0:
            return np.empty(self.shape, dtype=np.uint8)
        if not self._remote and not self._compressed:
            if not self._fortran:
                return _RangeReader.of_file(self._path, self._offset, self.shape)
            return np.memmap(self._path, np.uint8, mode="r", offset=self._offset, shape=self.shape, order="F")
        raw = open_binary(self._path)
        try:
            if not self._compressed:
                if self._fortran:
                    raw.seek(self._member_start)
                    return np.lib.format.read_array(raw)
                return _RangeReader(raw, self._offset, self.shape)
            zf = zipfile.ZipFile(raw)
            member = zf.open(self._member or "")
            if self._fortran:
                return np.lib.format.read_array(member)
            return _RangeReader(member, self._offset, self.shape, owner=_Closer(zf, raw))
        except Exception:
            raw.close()
            raise

    # -- Source ----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.shape[0])

    def name_of(self, index: int) -> str:
        return f"{self.uri}[{self._check_index(index)}]"

    def load(self, index: int) -> np.ndarray:
        index = self._check_index(index)
        return self.read(index, index + 1)[0]

    def read(self, start: int, stop: int) -> list[np.ndarray]:
        """One slice for the whole range (fast path); each image is a C-contiguous view of one fresh batch."""
        self._check_range(start, stop)
        if start == stop:
            return []
        data = self._backing()
        try:
            raw = data.read(start, stop) if isinstance(data, _RangeReader) else data[start:stop]
            batch = rgb_batch(raw)
        except Exception as exc:
            raise SourceError(f"cannot read {self.uri}[{start}:{stop}]: {reason(exc)}") from exc
        return list(batch)

    def _compute_hash(self) -> str:
        return sha256_file(self._path)

    def describe_empty(self) -> str:
        what = f"array {self.key!r}" if self.key else "its array"
        return f"{self.uri} contains no images: {what} has shape {tuple(self.shape)}"


class _Closer:
    """Closes a zip member's ZipFile and raw file together."""

    def __init__(self, *objs: Any) -> None:
        self.objs = objs

    def close(self) -> None:
        for obj in self.objs:
            obj.close()
