"""The feature store: float32 features of finished shards and cached reference statistics.

A local directory by default, any fsspec URL (s3://, gs://, ...) for a farm whose workers share no disk.
Writes go to a temporary name and are renamed into place, so a reader never sees half an array and a
shard that runs twice simply replaces its own file. Arrays are `.npy`/`.npz` bytes, never pickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from evalfarm.sources import is_url

HASH_QUEUE_DEPTH = 16  #: blocks (of up to a few MiB) written but not yet hashed


class FeatureStore:
    """Bytes by key under one root; every write is atomic, so a key holds a whole value or nothing."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        if is_url(self.root) and not self.root.startswith("file://"):
            import fsspec

            self.fs, self.base = fsspec.core.url_to_fs(self.root)
        else:
            self.fs, self.base = None, str(Path(self.root.removeprefix("file://")).expanduser())

    def _path(self, key: str) -> str:
        return f"{self.base}/{key}"

    def describe(self, key: str) -> str:
        """Where `key` lives, for messages: a path or a URL."""
        return self._path(key) if self.fs is None else f"{self.root}/{key}"

    def local_path(self, key: str) -> str | None:
        """The file of `key` when the store is a local directory (it can be mapped); None for a remote store."""
        return self._path(key) if self.fs is None else None

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if self.fs is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[IO[bytes]]:
        """A file to stream `key` into: the value appears whole when the block ends, and not at all if it
        raises (a value of tens of MiB is then written once, never first assembled in memory)."""
        path = self._path(key)
        if self.fs is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    yield f
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
                raise
        else:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with self.fs.open(tmp, "wb") as f:
                    yield f
                self.fs.mv(tmp, path)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.fs.rm(tmp)
                raise

    def reserve(self, key: str, nbytes: int) -> Reserved:
        """A writer for `key` whose file's first `nbytes` are written (zeros, by a thread) from now on, so that its
        real write later only overwrites pages the page cache holds already (see `Reserved`)."""
        return Reserved(self, key, nbytes)

    @contextlib.contextmanager
    def reader(self, key: str) -> Iterator[IO[bytes]]:
        """`key` as a file to read in steps (FileNotFoundError when it is missing)."""
        path = self._path(key)
        with open(path, "rb") if self.fs is None else self.fs.open(path, "rb") as f:
            yield f

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if self.fs is None:
            with open(path, "rb") as f:
                return f.read()
        return self.fs.cat_file(path)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return os.path.exists(path) if self.fs is None else self.fs.exists(path)

    def children(self, prefix: str) -> list[str]:
        """The names directly under `prefix` (no error when there is nothing)."""
        path = self._path(prefix)
        if self.fs is None:
            return sorted(os.listdir(path)) if os.path.isdir(path) else []
        if not self.fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))

    def signature(self, key: str) -> str | None:
        """What changes when `key` is written again (inode, size and modification time; a remote store's ETag or
        time); None when it is missing. Lets a process keep what it read while the value is the same."""
        if self.fs is None:
            try:
                st = os.stat(self._path(key))
            except FileNotFoundError:
                return None
            return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        try:
            info = self.fs.info(self._path(key))
        except FileNotFoundError:
            return None
        stamp = next((info[k] for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified",
                                        "updated", "created") if info.get(k) is not None), None)
        return f"{info.get('size')}:{stamp}"

    def modified_before(self, prefix: str, cutoff: float) -> list[str]:
        """Keys directly under `prefix` last written before `cutoff` (seconds since the epoch). A remote store
        that gives no modification times answers none: nothing is removed on a guess."""
        if self.fs is None:
            path = self._path(prefix)
            if not os.path.isdir(path):
                return []
            old = []
            with os.scandir(path) as entries:  # temporaries of a writer that died are old too
                for e in entries:
                    with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another sweep
                        if e.is_file() and e.stat().st_mtime < cutoff:
                            old.append(f"{prefix}/{e.name}")
            return sorted(old)
        old = []
        for name in self.children(prefix):
            try:
                stamp = self.fs.modified(self._path(f"{prefix}/{name}")).timestamp()
            except (NotImplementedError, FileNotFoundError, OSError, AttributeError):
                continue
            if stamp < cutoff:
                old.append(f"{prefix}/{name}")
        return old

    def delete(self, key: str) -> None:
        """Remove one key; a missing key is not an error."""
        path = self._path(key)
        if self.fs is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        elif self.fs.exists(path):
            self.fs.rm(path)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if self.fs is None:
            shutil.rmtree(path, ignore_errors=True)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)



class Reserved:
    """A file of the store, reserved before its content exists: a shard reserves its statistics' file when it
    starts, and a thread writes zeros over its expected size while the shard featurizes. The statistics are
    written over those pages when the shard ends. On the benchmark VM a new 16 MiB file took 4-43 ms to write
    (the kernel finding pages for the page cache) and the same bytes over cached pages 2 ms; that write is on
    the shard's critical path, the reservation is not. A remote store reserves nothing."""

    _ZEROS = bytes(1 << 20)

    def __init__(self, store: FeatureStore, key: str, nbytes: int) -> None:
        self.store, self.key = store, key
        self._tmp: str | None = None
        self._fill: threading.Thread | None = None
        self._stop = threading.Event()
        path = store.local_path(key)
        if path is None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        self._file = os.fdopen(fd, "r+b")
        self._fill = threading.Thread(target=self._zero, args=(fd, nbytes), name=f"reserve {key}", daemon=True)
        self._fill.start()

    def _zero(self, fd: int, nbytes: int) -> None:
        with contextlib.suppress(OSError):  # a disk that is full now fails the real write, with its own error
            for at in range(0, nbytes, len(self._ZEROS)):
                if self._stop.is_set():
                    return
                os.pwrite(fd, self._ZEROS[: min(len(self._ZEROS), nbytes - at)], at)

    @contextlib.contextmanager
    def writer(self) -> Iterator[IO[bytes]]:
        """`FeatureStore.writer` of the key, over the reserved file: whole under its key when the block ends."""
        if self._tmp is None:
            with self.store.writer(self.key) as f:
                yield f
            return
        self._fill.join()
        tmp, self._tmp = self._tmp, None
        try:
            self._file.seek(0)
            yield self._file
            self._file.truncate()  # at what was written: the zeros beyond it go
            self._file.close()
            os.replace(tmp, self.store.local_path(self.key))
        except BaseException:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise

    def abort(self) -> None:
        """Give the reservation up (the shard failed, or never wrote it); nothing is left under the key."""
        if self._tmp is None:
            return
        self._stop.set()
        self._fill.join()
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._tmp)
        self._tmp = None


class ThreadedCalls:
    """`fn(item)` for each item `put`, in order, in a thread of its own, through a queue of `depth` items:
    hashing or writing beside the caller's work (SHA-256 and file writes release the GIL). The first failure
    is kept and raised to the caller by its next `put` (and by `raise_failure`); later items are drained
    without a call, so that a caller never blocks on a full queue."""

    def __init__(self, fn: Callable[[Any], object], depth: int, name: str) -> None:
        self._fn = fn
        self.failure: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.failure is None:
                try:
                    self._fn(item)
                except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread instead
                    self.failure = exc

    def put(self, item: Any) -> None:
        self.raise_failure()
        self._queue.put(item)

    def stop(self) -> None:
        """Wait for the items queued and end the thread (idempotent); raises nothing (see `raise_failure`)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


class HashingWriter:
    """Writes through to `out` and hashes the bytes as they pass (SHA-256): one pass over a value, where
    encoding, hashing and writing it would be three. Unseekable on purpose: a zip written into it streams.

    With `threaded`, a thread hashes while this one encodes and writes (SHA-256 and file writes both release
    the GIL): a 16 MiB Gram is then written in the time of its write alone, not of its write and its hash. The
    bytes given to `write` must then stay unchanged until `hexdigest` or `close` (the encoders here hand over
    bytes objects and arrays they no longer touch)."""

    def __init__(self, out: IO[bytes], *, threaded: bool = False) -> None:
        self.out, self._sha = out, hashlib.sha256()
        self._hasher = ThreadedCalls(self._sha.update, HASH_QUEUE_DEPTH, "sha256") if threaded else None

    def write(self, data: Any) -> int:
        if self._hasher is None:
            self._sha.update(data)
        else:
            self._hasher.put(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        """Wait for the hashing thread, if any, and end it (a write that failed half-way must call this too)."""
        if self._hasher is not None:
            self._hasher.stop()

    def hexdigest(self) -> str:
        """The digest of everything written; raises what the hashing thread met rather than give a wrong one."""
        if self._hasher is not None:
            self._hasher.stop()
            self._hasher.raise_failure()
        return self._sha.hexdigest()
