"""A folder of encoded image files (PNG, JPEG, WebP, BMP), local or on an fsspec filesystem."""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import numpy as np

from evalfarm.errors import NotAllowed, SourceError
from evalfarm.sources.base import (
    IMAGE_EXTENSIONS,
    Source,
    decode_image,
    has_image_extension,
    is_hidden,
    is_url,
    reason,
    sha256_stream,
    url_to_fs,
)
from evalfarm.sources.roots import ROOTS_VARIABLE, SampleRoots


class FolderSource(Source):
    """Image files under a folder, in torch-fidelity's order: sorted by resolved (real) path.

    The order matters because IS splits and KID subsets are drawn by position. Dot-files and dot-folders are
    skipped (`.ipynb_checkpoints` copies would count twice). Symlinked folders are not followed (no loops,
    and torch-fidelity does not follow them either); symlinked files are read. Remote folders (fsspec URLs)
    have no real path, so they are sorted by path. With `roots`, a symlinked file that resolves outside them
    is refused before anything is read: a folder inside a root must not be a window onto the rest of the disk.
    """

    _handle_attrs = ("_fs",)

    def __init__(self, uri: str, recursive: bool = True, roots: SampleRoots | None = None) -> None:
        super().__init__(uri)
        self.recursive = recursive
        self._roots = roots
        self._remote = is_url(uri)
        self._root = uri if self._remote else os.path.expanduser(uri)
        paths, relnames = self._list_remote() if self._remote else self._list_local()
        self._paths: list[str] = paths  # what to open: a local path, or a path on the fsspec filesystem
        self._relnames: list[str] = relnames  # '/'-separated, relative to the root: what the hash covers

    def _list_local(self) -> tuple[list[str], list[str]]:
        root = self._root
        if not os.path.isdir(root):
            raise SourceError(f"{self.uri} is not a directory")

        def fail(err: OSError) -> None:  # os.walk skips unreadable folders silently: images would go missing
            raise SourceError(f"cannot list {err.filename or self.uri}: {err.strerror or err}") from err

        found: list[tuple[str, str]] = []
        for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith(".") and has_image_extension(name):
                    path = os.path.join(dirpath, name)
                    real = os.path.realpath(path)
                    self._check_local(path, real)
                    found.append((real, path))
            if not self.recursive:
                break
        found.sort()
        paths = [path for _, path in found]
        relnames = [os.path.relpath(path, root).replace(os.sep, "/") for path in paths]
        return paths, relnames

    def _list_remote(self) -> tuple[list[str], list[str]]:
        fs = self._filesystem()
        _, root = url_to_fs(self.uri)
        root = root.rstrip("/")
        try:
            if not fs.isdir(root):
                raise SourceError(f"{self.uri} is not a directory")
            found = fs.find(root, maxdepth=None if self.recursive else 1, withdirs=False)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"cannot list {self.uri}: {reason(exc)}") from exc
        paths, relnames = [], []
        for path in sorted(found):
            if self._roots is not None and not self._roots.allows(fs.unstrip_protocol(path)):
                raise NotAllowed(  # an http listing, say, may link to another host
                    f"{self.uri} lists {fs.unstrip_protocol(path)}, outside the sample roots of this farm "
                    f"({ROOTS_VARIABLE}); refusing to read it"
                )
            rel = path[len(root) :].lstrip("/") if path.startswith(root) else path.rsplit("/", 1)[-1]
            if not is_hidden(rel) and has_image_extension(rel):
                paths.append(path)
                relnames.append(rel)
        return paths, relnames

    def _check_local(self, path: str, real: str) -> None:
        if self._roots is not None and not self._roots.allows_file(real):
            raise NotAllowed(
                f"{path} links to a file outside the sample roots of this farm ({ROOTS_VARIABLE}); refusing to read it"
            )

    def _local_path(self, path: str) -> str:
        """The file to open: with roots, its real path checked again now (a link swapped in after the listing
        is refused), and opened as resolved."""
        if self._roots is None:
            return path
        real = os.path.realpath(path)
        self._check_local(path, real)
        return real

    def _filesystem(self) -> Any:
        self._in_this_process()
        if self._fs is None:
            self._fs, _ = url_to_fs(self.uri)
        return self._fs

    def __len__(self) -> int:
        return len(self._paths)

    def name_of(self, index: int) -> str:
        path = self._paths[self._check_index(index)]
        return self._filesystem().unstrip_protocol(path) if self._remote else path

    def load(self, index: int) -> np.ndarray:
        path = self._paths[self._check_index(index)]
        if not self._remote:
            return decode_image(self._local_path(path), path)
        name = self.name_of(index)
        try:
            data = self._filesystem().cat_file(path)
        except Exception as exc:
            raise SourceError(f"cannot read image {name}: {reason(exc)}") from exc
        return decode_image(io.BytesIO(data), name)

    def _compute_hash(self) -> str:
        """Relative names plus per-file hashes: independent of where the folder is, sensitive to renames."""
        digest = hashlib.sha256()
        for i, (path, rel) in enumerate(zip(self._paths, self._relnames, strict=True)):
            target = path if self._remote else self._local_path(path)
            try:
                if self._remote:
                    with self._filesystem().open(target, "rb") as fp:
                        file_hash = sha256_stream(fp)
                else:
                    with open(target, "rb") as fp:
                        file_hash = sha256_stream(fp)
            except Exception as exc:
                raise SourceError(f"cannot read image {self.name_of(i)}: {reason(exc)}") from exc
            digest.update(rel.encode("utf-8") + b"\n")
            digest.update(file_hash.encode("ascii"))
        return digest.hexdigest()

    def describe_empty(self) -> str:
        mode = "recursively" if self.recursive else "non-recursively (recursive=False)"
        exts = ", ".join(f"*.{e}" for e in IMAGE_EXTENSIONS)
        return f"{self.uri} contains no images: looked {mode} for {exts} (any case, dot-files skipped)"
