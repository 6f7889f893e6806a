"""The feature store: float32 features of finished shards and cached reference statistics.

A local directory by default, any fsspec URL (s3://, gs://, ...) for a farm whose workers share no disk.
Writes go to a temporary name and are renamed into place, so a reader never sees half an array and a
shard that runs twice simply replaces its own file. Arrays are `.npy`/`.npz` bytes, never pickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from evalfarm.sources import is_url


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



class HashingWriter:
    """Writes through to `out` and hashes the bytes as they pass (SHA-256): one pass over a value, where
    encoding, hashing and writing it would be three. Unseekable on purpose: a zip written into it streams."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self._sha = out, hashlib.sha256()

    def write(self, data: Any) -> int:
        self._sha.update(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()
