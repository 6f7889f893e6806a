"""The `Source` interface and the helpers every source shares.

A source is an indexed, read-only sample set. Order is part of the contract: IS splits and KID subsets are
drawn by position, so two sources with the same images in another order give other numbers.
Sources travel to DataLoader workers (pickled under spawn, copied under fork), so file handles are opened
lazily, once per process, and never pickled.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import io
import os
import re
import threading
from typing import IO, Any, BinaryIO, ClassVar

import numpy as np
from PIL import Image

from evalfarm.errors import SourceError

IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "bmp")
HASH_CHUNK = 1 << 20

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(://|::)")


def is_url(uri: str) -> bool:
    """True for fsspec URLs (`s3://`, `memory://`, `file://`, chained `simplecache::s3://`)."""
    return bool(_URL_RE.match(uri))


_BYTES_LITERAL = re.compile(r"""b(['"])(?:\\.|(?!\1).)*\1""")
_MAX_REASON = 200


def reason(exc: BaseException) -> str:
    """What went wrong, for a message that names a file: the error without any bytes it echoed from the file
    (numpy quotes the first bytes of a file whose header it rejects), and kept short."""
    text = _BYTES_LITERAL.sub("<file content not shown>", str(exc)) or type(exc).__name__
    if "header" in text.lower():  # numpy quotes a rejected .npy header as plain text
        return "its array header could not be parsed"
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + "…"


def has_image_extension(name: str) -> bool:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return ext in IMAGE_EXTENSIONS


def is_hidden(relpath: str) -> bool:
    """Dot-files and dot-folders (`.DS_Store`, `.ipynb_checkpoints/`, macOS `._x.png`) are not samples."""
    parts = relpath.replace("\\", "/").split("/")
    return any(part.startswith(".") and part not in (".", "..") for part in parts)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """`convert("RGB")` exactly as torch-fidelity does: alpha is dropped, not composited over a background."""
    arr = np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only
    if arr.ndim != 3 or arr.shape[2] != 3:  # pragma: no cover - PIL guarantees this for mode RGB
        raise ValueError(f"unexpected decoded shape {arr.shape}")
    return arr


def decode_image(data: str | bytes | BinaryIO, name: str) -> np.ndarray:
    """Decode one encoded image (path, bytes or file object) to HxWx3 uint8 RGB.

    `img.load()` runs inside the try so truncated files fail here, naming the file, rather than later or not
    at all; `ImageFile.LOAD_TRUNCATED_IMAGES` stays off so a damaged sample is never silently padded.
    """
    src: str | BinaryIO = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with Image.open(src) as img:
            img.load()
            return pil_to_rgb(img)
    except Exception as exc:
        raise SourceError(f"cannot decode image {name}: {reason(exc)}") from exc


def url_to_fs(uri: str) -> tuple[Any, str]:
    """fsspec's (filesystem, path) for a URL; a missing backend (s3fs, gcsfs) becomes a SourceError."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(uri)
    except Exception as exc:
        raise SourceError(f"cannot open {uri}: {reason(exc)}") from exc


def open_binary(uri: str) -> IO[bytes]:
    """Open a local path with plain `open` (fast) or a URL through fsspec; the caller closes it."""
    try:
        if is_url(uri):
            import fsspec

            return fsspec.open(uri, "rb").open()
        return open(uri, "rb")
    except Exception as exc:
        raise SourceError(f"cannot open {uri}: {reason(exc)}") from exc


def sha256_stream(fp: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := fp.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(uri: str) -> str:
    """sha256 of a file's bytes, streamed so multi-GB archives do not need to fit in memory."""
    with open_binary(uri) as fp:
        try:
            return sha256_stream(fp)
        except Exception as exc:
            raise SourceError(f"cannot read {uri}: {reason(exc)}") from exc


class Source(abc.ABC):
    """An ordered, random-access set of RGB images.

    Subclasses list their per-process handles in `_handle_attrs`: they are dropped when pickled and when the
    object finds itself in a new process after fork (an inherited file offset shared by two processes would
    make their seek+read pairs race).
    """

    _handle_attrs: ClassVar[tuple[str, ...]] = ()
    uri: str

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._hash: str | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        for attr in self._handle_attrs:
            setattr(self, attr, None)

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def load(self, index: int) -> np.ndarray:
        """One image as an HxWx3 uint8 RGB, C-contiguous array."""

    def read(self, start: int, stop: int) -> list[np.ndarray]:
        """Images `start` to `stop - 1`; subclasses override it when a range is cheaper than single loads."""
        self._check_range(start, stop)
        return [self.load(i) for i in range(start, stop)]

    @abc.abstractmethod
    def name_of(self, index: int) -> str:
        """What to show a user for item `index` in an error message (file, archive member, path[i])."""

    @abc.abstractmethod
    def _compute_hash(self) -> str: ...

    def content_hash(self) -> str:
        """sha256 hex of the content, independent of where it lives; cached since it reads every byte."""
        if self._hash is None:
            self._hash = self._compute_hash()
        return self._hash

    def index(self) -> bytes | None:
        """What another process can open this source from without listing it again (`open_source(index=)`),
        where listing is costly: a tar's member index. None for the others."""
        return None

    @property
    def copies_ranges(self) -> bool:
        """Whether reading a range is a plain copy from a local file (no decoding, no stream): such a source is
        read by a thread in the featurizing process, not by loader processes, which cost more to start."""
        return False

    def describe_empty(self) -> str:
        """The message `open_source` gives when there is nothing to read; subclasses say where they looked."""
        return f"{self.uri} contains no images"

    def close(self) -> None:
        """Release this process's handles; the next read reopens them."""
        for attr in self._handle_attrs:
            handle = getattr(self, attr, None)
            setattr(self, attr, None)
            close = getattr(handle, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):  # a half-broken handle must not mask the real error
                    close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_pid", None) == os.getpid():  # handles inherited over fork belong to the parent
                self.close()
        except Exception:  # at interpreter exit, module globals may already be gone
            pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    # -- per-process state -----------------------------------------------------------------------------------

    def _in_this_process(self) -> threading.Lock:
        """Drop handles inherited over fork (that closes only this process's descriptors); return the lock."""
        pid = os.getpid()
        if pid != self._pid:
            for attr in self._handle_attrs:
                setattr(self, attr, None)
            self._lock = threading.Lock()  # may have been held by another thread at fork time
            self._pid = pid
        return self._lock

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for attr in self._handle_attrs:
            state[attr] = None
        state.pop("_lock", None)
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    # -- index checks ----------------------------------------------------------------------------------------

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {self.uri} ({n} images)")
        return int(index)

    def _check_range(self, start: int, stop: int) -> None:
        n = len(self)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"range [{start}, {stop}) out of range for {self.uri} ({n} images)")
