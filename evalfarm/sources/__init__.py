"""Sample sets read by index: image folders, `.npz`/`.npy` arrays, tar and zip archives, local or via fsspec.

Every source yields HxWx3 uint8 RGB arrays decoded exactly as torch-fidelity does, in a fixed order.
"""

from __future__ import annotations

import os

from evalfarm.errors import SourceError
from evalfarm.sources.archive import TarSource, ZipSource
from evalfarm.sources.arrays import ArraySource
from evalfarm.sources.base import IMAGE_EXTENSIONS, Source, is_url, reason, url_to_fs
from evalfarm.sources.folder import FolderSource
from evalfarm.sources.roots import SampleRoots

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArraySource",
    "FolderSource",
    "SampleRoots",
    "Source",
    "TarSource",
    "ZipSource",
    "open_source",
]

_ARRAY_SUFFIXES = (".npz", ".npy")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_ZIP_SUFFIXES = (".zip",)
ACCEPTED_KINDS = (
    f"a folder of images ({', '.join('*.' + e for e in IMAGE_EXTENSIONS)}), a .npz or .npy array "
    "(NHWC uint8), or a .tar, .tar.gz, .tgz or .zip archive of images"
)


def open_source(uri: str, *, recursive: bool = True, roots: SampleRoots | None = None,
                index: bytes | None = None) -> Source:
    """Open a sample set by its kind; fails early, naming the path, on anything it could not evaluate.

    `uri` is a local path or an fsspec URL (`s3://`, `gs://`, `memory://`, `file://` ...). `recursive` only
    applies to folders. An empty set is an error here rather than a metric computed on nothing. With
    `roots`, nothing outside them is read: NotAllowed before the first access (see `sources.roots`). `index`
    is what `index()` of the same archive gave in another process: used if it still describes the file.
    """
    if roots is not None:
        roots.check(uri)
    source = _construct(uri, recursive, roots, index)
    if len(source) == 0:
        raise SourceError(source.describe_empty())
    return source


def _construct(uri: str, recursive: bool, roots: SampleRoots | None, index: bytes | None) -> Source:
    if is_url(uri):
        fs, path = url_to_fs(uri)
        try:
            exists = fs.exists(path)
            is_dir = exists and fs.isdir(path)
        except Exception as exc:
            raise SourceError(f"cannot open {uri}: {reason(exc)}") from exc
    else:
        path = os.path.expanduser(uri)
        exists, is_dir = os.path.exists(path), os.path.isdir(path)
    if not exists:
        raise SourceError(f"{uri} does not exist; expected {ACCEPTED_KINDS}")
    if is_dir:
        return FolderSource(uri, recursive=recursive, roots=roots)
    name = uri.lower().rstrip("/")
    if name.endswith(_ARRAY_SUFFIXES):
        return ArraySource(uri)
    if name.endswith(_TAR_SUFFIXES):
        return TarSource(uri, index)
    if name.endswith(_ZIP_SUFFIXES):
        return ZipSource(uri)
    raise SourceError(f"{uri} is not a supported sample set; expected {ACCEPTED_KINDS}")
